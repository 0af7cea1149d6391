"""Bias benchmarks and metrics: datasets built reproducibly from ``data/``, pure metric functions,
and ``evaluate(lm, suite, split)`` runners. See ``docs/benchmarks.md`` for every dataset choice."""

from __future__ import annotations

from .datasets import ALL_SUITES, CAPABILITY_SUITES, EVALUATE_ALL, EXTRA_SUITES, SUITES, load_split, sample_prompts, split_sizes, splits_of, to_jsonl
from .runners import EvalResult, evaluate

__all__ = [
    "ALL_SUITES", "CAPABILITY_SUITES", "EVALUATE_ALL", "EXTRA_SUITES", "SUITES", "EvalResult", "evaluate", "load_split", "sample_prompts",
    "split_sizes", "splits_of", "to_jsonl",
]
