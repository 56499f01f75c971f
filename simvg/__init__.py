"""simvg: SimVG visual grounding (Dai et al., NeurIPS 2024), re-implemented.

Public API (loaded lazily, so ``import simvg`` stays light and never imports torch by itself)::

    from simvg import Grounder, create_model, load_model
    grounder = Grounder.from_checkpoint()          # the embedded default model, on CPU
    model = load_model("SimVG_ViT-B.pth")          # any model file, the authors' released checkpoints included
    result = grounder.ground("photo.jpg", "the dog on the left")
    result.boxes, result.scores, result.to_dict()
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY = {
    "create_model": "simvg.models",
    "load_model": "simvg.artifact",
    "list_models": "simvg.models",
    "Grounder": "simvg.inference.grounder",
    "GroundingResult": "simvg.inference.grounder",
    "UserError": "simvg.errors",
}

__all__ = ["Grounder", "GroundingResult", "UserError", "__version__", "create_model", "list_models", "load_model"]

if TYPE_CHECKING:
    from simvg.artifact import load_model
    from simvg.errors import UserError
    from simvg.inference.grounder import Grounder, GroundingResult
    from simvg.models import create_model, list_models


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # cache: the next access does not come here
        return value
    raise AttributeError(f"module 'simvg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
