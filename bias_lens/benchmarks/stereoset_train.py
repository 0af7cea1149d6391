"""StereoSet intrasentence items to *train* on (BiasEdit's editor), disjoint from every test selection.

BiasEdit trains its editors on ``train.json`` / ``dev.json``, an 8:1 split of StereoSet's hidden
test set, and tests on selections from the official dev set. Its ``train.json`` is not available
offline; the pool here is every intrasentence item that is *not* in a test selection:

* EditBias's dev re-split (``data/stereoset/dev.json``, 799 items from StereoSet's test set, labels
  from each sentence's ``gold_label``), and
* the official dev set's intrasentence rows whose context is in none of BiasEdit's gender / race /
  religion test selections (812: 810 profession, 2 gender), official labels.

``pool="official_rest"`` is the literal reading of "the rest of the official dev set" alone (only 2
gender items); ``pool="union"`` (default) adds EditBias's dev items. Items are deduplicated by
(bias type, normalised context), and any item whose normalised context equals a test selection's
or a robustness set's context (of any axis; :func:`test_contexts`) is dropped, so no test context
is ever trained on. :func:`editor_splits`
splits the pool 8:1 (BiasEdit's ratio) by a seeded shuffle of *contexts*, so a context never lies
on both sides.
"""

from __future__ import annotations

import random
import re

from . import stereoset

POOLS = ("union", "official_rest")


def norm_context(text: str) -> str:
    """Case- and whitespace-insensitive form of a context (the key that keeps test contexts out)."""
    return re.sub(r"\s+", " ", text.strip().lower())


def test_contexts() -> set[str]:
    """Normalised contexts of every BiasEdit test selection (gender, race, religion) and of its
    robustness sets (the gender reversal set, the synonym sets), whose rewritten contexts can
    coincide with a trainable item's (e.g. the reversal of a test item)."""
    rows = [r for axis in stereoset.SELECTION_AXES for r in stereoset.selection(axis)]
    rows += [r for split, axes in stereoset.ROBUST_SPLITS.items() for axis in axes for r in stereoset.robust(split, axis)]
    return {norm_context(r["prompt"]) for r in rows}


def editor_pool(pool: str = "union") -> list[dict]:
    """The trainable intrasentence items (StereoSet row format, ``source`` added); see the module docstring."""
    if pool not in POOLS:
        raise ValueError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    banned = test_contexts()
    rows = [{**r, "source": "official_dev"} for r in stereoset.official("intrasentence", "all")]
    if pool == "union":
        rows += [{**r, "source": "editbias_dev"} for axis in stereoset.STEREOSET_AXES for r in stereoset.editbias_dev(axis)]
    out, seen = [], set()
    for r in rows:
        key = (r["bias_type"], norm_context(r["prompt"]))
        if key[1] in banned or key in seen:
            continue
        seen.add(key)
        out.append(r)
    return out


def editor_splits(seed: int = 0, pool: str = "union", dev_fraction: float = 1 / 9,
                  bias_types: tuple[str, ...] | None = None) -> tuple[list[dict], list[dict]]:
    """(train, dev) of :func:`editor_pool`: contexts shuffled with ``seed``, the first ``dev_fraction``
    of them dev. ``bias_types`` keeps only those types (default: all, as BiasEdit trains one editor
    on every bias type)."""
    if not 0 < dev_fraction < 1:
        raise ValueError(f"dev_fraction must lie in (0, 1), got {dev_fraction}")
    rows = editor_pool(pool)
    if bias_types is not None:
        bad = sorted(set(bias_types) - set(stereoset.STEREOSET_AXES))
        if bad:
            raise ValueError(f"unknown bias types {bad}; choose from {', '.join(stereoset.STEREOSET_AXES)}")
        rows = [r for r in rows if r["bias_type"] in bias_types]
    contexts = sorted({norm_context(r["prompt"]) for r in rows})
    random.Random(seed).shuffle(contexts)
    dev_ctx = set(contexts[: max(1, round(dev_fraction * len(contexts)))])
    train = [r for r in rows if norm_context(r["prompt"]) not in dev_ctx]
    dev = [r for r in rows if norm_context(r["prompt"]) in dev_ctx]
    return train, dev
