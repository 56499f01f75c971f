"""A crash in the middle of a checkpoint write, for the tests (the hook lives here, not in ``simvg``).

``install(n)`` wraps ``simvg.utils.checkpoint.atomic_torch_save`` (and the copies that modules imported by name):
the n-th call from then on runs the real save, which writes the whole temporary file beside the destination
(flushed and fsynced), and the process is killed at the instant it would rename that file over the destination
(``os.replace``, the publishing step). Other writes (``atomic_write_bytes``, text files) do not count. A save that
were not atomic (writing straight to the destination, or copying instead of renaming) never reaches that rename:
the process then is not killed, which the tests notice.

As a script, ``python tests/kill_during_save.py N ARGS...`` runs ``simvg ARGS...`` (``simvg.cli.main``) with the
hook installed and the kill a real ``SIGKILL`` (exit status -9 seen from the parent), e.g.
``python tests/kill_during_save.py 2 train cfg.yaml``. Processes that the command spawns (DDP workers) do not
inherit the hook. In-process tests pass a ``kill`` that raises instead, and ``monkeypatch.setattr`` as ``patch`` so
that everything is undone after the test.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import simvg.cli
from simvg.utils import checkpoint


def sigkill() -> None:
    """What a crash does: the process ends now, no ``finally`` block or clean-up runs."""
    os.kill(os.getpid(), signal.SIGKILL)


def install(n: int, kill: Callable[[], None] = sigkill, patch: Callable[[Any, str, Any], None] = setattr) -> None:
    """Call ``kill()`` during the n-th ``atomic_torch_save`` from now on, after its temporary file is complete and
    before the rename that publishes it; ``patch(owner, name, value)`` replaces the function (``setattr``, or
    ``monkeypatch.setattr`` in a test)."""
    real_save = checkpoint.atomic_torch_save
    calls = 0

    def save(obj: Any, path: str | Path) -> None:
        nonlocal calls
        calls += 1
        if calls != n:
            real_save(obj, path)
            return
        real_replace = os.replace

        def replace(src: Any, dst: Any) -> None:
            if Path(dst) == Path(path):  # the temporary file, about to become `path`
                kill()
            real_replace(src, dst)

        os.replace = replace  # os is one module object: this is the os.replace that checkpoint.py calls
        try:
            real_save(obj, path)
        finally:  # reached only when `kill` raises instead of killing (in-process tests)
            os.replace = real_replace

    # `from simvg.utils.checkpoint import atomic_torch_save` binds the function in the importing module too; the
    # modules imported after this line get the wrapper from `checkpoint` itself.
    for name, module in list(sys.modules.items()):
        if (name == "simvg" or name.startswith("simvg.")) and getattr(module, "atomic_torch_save", None) is real_save:
            patch(module, "atomic_torch_save", save)


if __name__ == "__main__":
    install(int(sys.argv[1]))
    sys.exit(simvg.cli.main(sys.argv[2:]))
