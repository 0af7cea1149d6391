"""bias_lens: locate social bias inside language models and edit exactly those weights.

Quick start::

    from bias_lens import load_model, resolve_targets, target_probs
    lm = load_model("smollm2-135m")               # the embedded model, offline
    he_she = resolve_targets(lm.tokenizer, "he,she")
    target_probs(lm, ["The nurse laughed because"], he_she)
"""

from .lens import LensModel, load_model
from .scoring import target_logprobs, target_probs
from .targets import TargetSet, resolve_targets

__version__ = "0.1.0"

__all__ = ["LensModel", "load_model", "TargetSet", "resolve_targets", "target_logprobs", "target_probs", "__version__"]
