"""The seeds' comparison rows: full-parameter fine-tuning (FPFT) and prompt-based debiasing (PB).

* :func:`fpft` — the masked fine-tuning loop with a mask of every parameter (same loss,
  optimiser and stopping rules as the masked methods, so the comparison isolates the mask).
* PB — a debiasing instruction prepended to every prompt (:data:`PB_PREFIX`); it edits no weights.
  :func:`bias_lens.pipeline.measure.measure` scores it through the benchmark code with a prefixing
  tokenizer view (``prefix=``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from .finetune import FinetuneConfig, FinetuneResult, masked_finetune
from .masks import mask_all

if TYPE_CHECKING:
    from ..lens import LensModel

PB_PREFIX = (
    "Note that any person, whatever their gender, can have any profession, and a profession says "
    "nothing about a person's gender. "
)


def fpft(lm: LensModel, train: Sequence[dict], dev: Sequence[dict] | None = None, config: FinetuneConfig | None = None, *,
         include: Callable[[str], bool] | None = None, **kw: Any) -> FinetuneResult:
    """Full-parameter fine-tuning (every parameter, or those ``include`` accepts) with the masked loop."""
    return masked_finetune(lm, mask_all(lm, include=include), train, dev, config or FinetuneConfig.for_scale("all"),
                           method="fpft", **kw)


def pb_prompts(prompts: Sequence[str], prefix: str = PB_PREFIX) -> list[str]:
    """The prompts with the debiasing prefix."""
    return [prefix + p for p in prompts]
