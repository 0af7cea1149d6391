"""The seeds' comparison rows: full-parameter fine-tuning (FPFT) and prompt-based debiasing (PB).

* :func:`fpft` — the masked fine-tuning loop with a mask of every parameter (same loss,
  optimiser and stopping rules as the masked methods, so the comparison isolates the mask).
* PB — a debiasing instruction prepended to every prompt (:data:`PB_PREFIX`); it edits no weights.
  :func:`pb_metrics` scores it through the benchmark code with a prefixing tokenizer view.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .finetune import FinetuneConfig, FinetuneResult, masked_finetune
from .masks import mask_all

PB_PREFIX = (
    "Note that any person, whatever their gender, can have any profession, and a profession says "
    "nothing about a person's gender. "
)


def fpft(lm, train: Sequence[dict], dev: Sequence[dict] | None = None, config: FinetuneConfig | None = None, *,
         include: Callable[[str], bool] | None = None, **kw) -> FinetuneResult:
    """Full-parameter fine-tuning (every parameter, or those ``include`` accepts) with the masked loop."""
    return masked_finetune(lm, mask_all(lm, include=include), train, dev, config or FinetuneConfig.for_scale("all"),
                           method="fpft", **kw)


def pb_prompts(prompts: Sequence[str], prefix: str = PB_PREFIX) -> list[str]:
    """The prompts with the debiasing prefix."""
    return [prefix + p for p in prompts]


def pb_metrics(lm, suite: str = "genbiaseval", split: str = "test", *, prefix: str = PB_PREFIX, **kw) -> dict[str, float]:
    """:func:`~bias_lens.edit.measure.model_metrics` with every bias prompt prefixed (weights untouched)."""
    from .measure import model_metrics

    return model_metrics(lm, suite, split, prefix=prefix, **kw)
