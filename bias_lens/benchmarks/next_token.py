"""Next-token log-probabilities of targets for the benchmark runners.

:func:`next_token_logprobs` is :func:`bias_lens.scoring.target_logprobs` with the shared-prefix
cache on (the benchmarks' prompts carry no position-addressing hooks): one scorer, one fast path
(last-position unembedding, shared-prefix key/value cache; see :mod:`bias_lens.scoring`).
Multi-token targets are teacher-forced there too.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from jaxtyping import Float
from torch import Tensor

from ..scoring import MIN_SHARED_PREFIX, shared_prefix_len, target_logprobs
from ..targets import TargetSet

__all__ = ["MIN_SHARED_PREFIX", "next_token_logprobs"]

_shared_prefix_len = shared_prefix_len  # old private name


def next_token_logprobs(
    lm: Any, prompts: Sequence[str], targets: TargetSet, *, batch_size: int = 32, progress: bool = False,
    shared_prefix: bool = True,
) -> Float[Tensor, "prompt target"]:
    """float64 ``log p(target | prompt)`` at each prompt's last real token, in input order."""
    return target_logprobs(lm, prompts, targets, batch_size=batch_size, progress=progress, shared_prefix=shared_prefix)
