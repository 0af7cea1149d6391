"""The suite registry: ``load_split``, ``sample_prompts``, ``split_sizes``, ``to_jsonl``.

Generated suites (GenBiasPro-CG, GenBiasEval, GenHintEval, DAMA, religion) are rebuilt at call
time from the shipped sources with a seed (default 0) and cached; the same seed always gives the
same samples in the same order (``to_jsonl`` bytes are tested to be identical). Published suites
keep their own splits.
"""

from __future__ import annotations

import copy
import json
import logging
import random
from collections.abc import Callable
from functools import lru_cache

from . import commonwords, external, generated, stereoset

SUITES: tuple[str, ...] = (
    "genbiaspro-cg", "genbiaseval", "genhinteval", "dama", "stereoset", "crows-pairs",
    "winogender", "winobias", "retention",
)
#: also offered, not in ``--suite all``: a religion axis, the DAMA variant split, GenBiasEval with held-out templates, the whole official StereoSet dev,
#: CommonWords (the interpretable-neuron-editing paper's design, rebuilt: docs/neuron_editing.md)
EXTRA_SUITES: tuple[str, ...] = ("religion", "dama-filtered", "genbiaseval-heldout", "stereoset-intra", "stereoset-inter", "commonwords")
#: general-capability suites (:mod:`.capability`); gsm8k and humaneval are opt-in and slow
CAPABILITY_SUITES: tuple[str, ...] = ("mmlu", "arithmetic", "perplexity", "gsm8k", "humaneval")
#: every suite name ``evaluate`` accepts
ALL_SUITES = SUITES + EXTRA_SUITES + CAPABILITY_SUITES
#: what ``bias-lens evaluate --suite all`` runs: the bias suites and the religion axis
EVALUATE_ALL = SUITES + ("religion",)

_GENERATED: dict[str, Callable[[int], dict[str, list[dict]]]] = {
    "genbiaspro-cg": generated.build_genbiaspro_cg,
    "genbiaseval": generated.build_genbiaseval,
    "genbiaseval-heldout": generated.build_genbiaseval_heldout,
    "genhinteval": generated.build_genhinteval,
    "dama": generated.build_dama,
    "dama-filtered": generated.build_dama_filtered,
    "commonwords": commonwords.build_commonwords,
    "religion": generated.build_religion,
}
_SPLITS: dict[str, tuple[str, ...]] = {
    **{s: ("train", "dev", "test") for s in _GENERATED},
    "stereoset": ("dev", "test"),
    "stereoset-intra": ("dev",),
    "stereoset-inter": ("dev",),
    "crows-pairs": ("test",),
    "winogender": ("test",),
    "winobias": ("dev", "test"),
    "retention": ("test",),
    "mmlu": ("val", "test"),
    "arithmetic": ("train", "dev", "test"),
    "perplexity": ("test",),
    "gsm8k": ("test",),
    "humaneval": ("test",),
}
_AXES: dict[str, tuple[str, ...]] = {
    "stereoset": stereoset.STEREOSET_AXES,
    "stereoset-intra": stereoset.OFFICIAL_AXES,
    "stereoset-inter": stereoset.OFFICIAL_AXES,
    "crows-pairs": external.CROWS_AXES,
}


#: robustness re-writes of a suite's test items, loadable and scorable like splits but not part of the
#: partition that ``splits_of`` / ``split_sizes`` describe (they repeat the test items' ids)
_ROBUST: dict[str, dict[str, tuple[str, ...]]] = {"stereoset": stereoset.ROBUST_SPLITS}


def check_suite(suite: str, split: str | None = None, axis: str = "gender") -> None:
    """Raise ValueError naming the valid choices for an unknown suite, split or axis."""
    if suite not in _SPLITS:
        raise ValueError(f"unknown suite {suite!r}; choose one of {', '.join(ALL_SUITES)}")
    robust = _ROBUST.get(suite, {})
    if split is not None and split not in _SPLITS[suite] and split not in robust:
        valid = ", ".join((*_SPLITS[suite], *robust))
        raise ValueError(f"suite {suite!r} has no split {split!r}; choose one of {valid}")
    if axis != "gender" and axis not in _AXES.get(suite, ()):
        valid = ", ".join(_AXES.get(suite, ("gender",)))
        raise ValueError(f"suite {suite!r} has no bias axis {axis!r}; choose one of {valid}")
    if split in robust:
        stereoset.check_robust(split, axis)
        return
    if split is not None and split not in _splits_for(suite, axis):
        raise ValueError(f"suite {suite!r} with axis {axis!r} has only split(s) {', '.join(_splits_for(suite, axis))}")


def _splits_for(suite: str, axis: str) -> tuple[str, ...]:
    """StereoSet's test selections are gender, race and religion; profession lives in dev only."""
    if suite == "stereoset" and axis not in stereoset.SELECTION_AXES:
        return ("dev",)
    return _SPLITS[suite]


def splits_of(suite: str, axis: str = "gender") -> tuple[str, ...]:
    """The splits a suite has for a bias axis (StereoSet's non-gender axes: dev only)."""
    check_suite(suite, None, axis)
    return _splits_for(suite, axis)


@lru_cache(maxsize=32)
def _generated(suite: str, seed: int) -> dict[str, list[dict]]:
    return _GENERATED[suite](seed)


@lru_cache(maxsize=32)
def _external(suite: str, split: str, axis: str) -> list[dict]:
    if suite == "stereoset":
        if split in stereoset.ROBUST_SPLITS:
            return stereoset.robust(split, axis)
        return stereoset.selection(axis) if split == "test" else stereoset.editbias_dev(axis)
    if suite in ("stereoset-intra", "stereoset-inter"):
        return stereoset.official("intrasentence" if suite == "stereoset-intra" else "intersentence", axis)
    if suite == "crows-pairs":
        return external.crows_pairs(axis)
    if suite == "winogender":
        return external.winogender()
    if suite == "winobias":
        return external.winobias(split)
    return external.retention()


def load_split(suite: str, split: str, *, seed: int = generated.DEFAULT_SEED, axis: str = "gender") -> list[dict]:
    """The samples of one split: dicts with ``prompt`` plus the suite's metadata (a fresh copy).

    ``seed`` re-draws the generated suites' splits; ``axis`` picks the bias type of StereoSet
    and CrowS-Pairs. StereoSet also loads BiasEdit's robustness splits ``reverse`` (gender) and
    ``synonym`` (gender, race, religion), which ``split_sizes`` leaves out (:mod:`.stereoset`).
    Capability suites are loaded by :mod:`.capability` (their items are not prompts of one kind);
    ``split_sizes`` reports their sizes.
    """
    check_suite(suite, split, axis)
    if suite in CAPABILITY_SUITES:
        raise ValueError(f"{suite!r} is a capability suite; evaluate it with evaluate(lm, {suite!r}, split)")
    rows = _generated(suite, int(seed))[split] if suite in _GENERATED else _external(suite, split, axis)
    return copy.deepcopy(rows)


def split_sizes(suite: str, *, seed: int = generated.DEFAULT_SEED, axis: str = "gender") -> dict[str, int]:
    """Number of samples per split, e.g. ``{"train": 1280, "dev": 256, "test": 1024}``."""
    check_suite(suite, None, axis)
    if suite in CAPABILITY_SUITES:
        from .capability import capability_sizes

        return dict(capability_sizes(suite))
    if suite in _GENERATED:
        return {k: len(v) for k, v in _generated(suite, int(seed)).items()}
    return {sp: len(_external(suite, sp, axis)) for sp in _splits_for(suite, axis)}


def sample_prompts(suite: str, split: str = "train", n: int = 200, seed: int = 0, *, axis: str = "gender") -> list[str]:
    """``n`` prompts drawn without replacement with ``random.Random(seed)`` (all, in order, if n >= size)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    prompts = [s["prompt"] for s in load_split(suite, split, axis=axis)]
    if n >= len(prompts):
        if n > len(prompts):
            logging.getLogger(__name__).warning(
                "asked for %d prompts but %s/%s has only %d: using all %d (pass a smaller --n-samples to silence this)",
                n, suite, split, len(prompts), len(prompts))
        return prompts
    idx = sorted(random.Random(seed).sample(range(len(prompts)), n))
    return [prompts[i] for i in idx]


def to_jsonl(rows: list[dict]) -> bytes:
    """Canonical JSON-lines bytes of samples (sorted keys, UTF-8): the byte-identity check and file format."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")
