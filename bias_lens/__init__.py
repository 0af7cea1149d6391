"""bias_lens: locate social bias inside language models and edit exactly those weights.

Quick start::

    from bias_lens import load_model, resolve_targets, target_probs
    lm = load_model("smollm2-135m")               # the embedded model, offline
    he_she = resolve_targets(lm.tokenizer, "he,she")
    target_probs(lm, ["The nurse laughed because"], he_she)

The names below are imported on first use (PEP 562), so ``import bias_lens`` (and the
``bias-lens`` command's ``--help``/``--version``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from .lens import LensModel, load_model
    from .scoring import target_logprobs, target_probs
    from .targets import TargetSet, resolve_targets

__version__ = "0.1.0"

_LAZY = {
    "LensModel": ".lens", "load_model": ".lens",
    "target_logprobs": ".scoring", "target_probs": ".scoring",
    "TargetSet": ".targets", "resolve_targets": ".targets",
}

__all__ = ["LensModel", "load_model", "TargetSet", "resolve_targets", "target_logprobs", "target_probs", "__version__"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    if not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f".{name}", __name__)  # ``bias_lens.lens`` after ``import bias_lens``
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
