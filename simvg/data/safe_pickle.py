"""A restricted unpickler for annotation pickles such as the refer API's Python-2 ``refs(unc).p``.

``pickle.load`` runs whatever callable a file names (``os.system`` via a REDUCE opcode, for instance), so a
downloaded pickle is code, not data. This loader admits only what annotation files are made of: dicts, lists,
tuples, sets, str, bytes, numbers, bool and None. Lists, dicts, tuples, strings and numbers are built by pickle
opcodes without naming any global; the few globals an honest file may name (``set``/``frozenset``, and
``_codecs.encode`` that Python 3 uses for bytes at protocol <= 2) are on an allow-list. Any other global is
refused with ``UserError("refusing to unpickle <module.name> from <file>")``.

Python-2 ``str`` objects are decoded as latin-1 (the only encoding that never fails); ``fix_latin1`` recovers
UTF-8 text from them.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path
from typing import Any

from simvg.errors import UserError

_ALLOWED = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("__builtin__", "set"): set,
    ("__builtin__", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("__builtin__", "bytearray"): bytearray,
}


def _codecs_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 pickles bytes at protocol <= 2 as _codecs.encode(str, "latin1"); only text codecs are allowed
    if encoding.lower().replace("-", "").replace("_", "") not in ("latin1", "iso88591", "utf8", "ascii"):
        raise pickle.UnpicklingError(f"codec {encoding!r} not allowed")
    return text.encode(encoding)


class RestrictedUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` that resolves only allow-listed globals."""

    def __init__(self, file: io.BufferedIOBase, name: str) -> None:
        super().__init__(file, encoding="latin1")
        self.name = name

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            return _codecs_encode
        raise UserError(f"refusing to unpickle {module}.{name} from {self.name}")

    def persistent_load(self, pid: Any) -> Any:
        raise UserError(f"refusing to unpickle a persistent id from {self.name}")


def safe_load(path: str | Path) -> Any:
    """Load a pickle file of plain data; raises ``UserError`` for anything else or a damaged file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: file not found")
    with path.open("rb") as f:
        try:
            return RestrictedUnpickler(f, str(path)).load()
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            raise UserError(f"{path}: not a readable pickle of plain data ({exc})") from None


def fix_latin1(text: str) -> str:
    """Undo the latin-1 decoding of a Python-2 UTF-8 byte string (leaves real latin-1 text alone)."""
    try:
        return text.encode("latin1").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):
        return text
