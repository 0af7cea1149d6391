"""StereoSet samples with the **official** labels (Nadeem et al. 2021).

Three sources, one label rule:

* ``stereoset`` / ``test``: BiasEdit's intrasentence test selections (gender 253, race 962,
  religion 79; ``{axis}_test.json``). BiasEdit's gender file has ``stereotype`` and
  ``anti-stereotype`` exchanged on every item, so the labels of every selected item are re-derived
  from the official dev set (``official_dev.jsonl``): the official row with the same bias type,
  context and sentence set (case- and space-insensitive) gives each sentence its gold label. An
  item without such a row is an error, never a silent fallback to the file's labels.
* ``stereoset`` / ``dev``: EditBias's re-split of StereoSet's test set (799; its labels are the
  per-sentence ``gold_label``); disjoint from the official dev set the test selections come from.
* ``stereoset-intra`` / ``stereoset-inter``: the whole official dev set's intrasentence (2,106) or
  intersentence (2,123) task, one bias type or ``all`` of them.
"""

from __future__ import annotations

import re
from functools import lru_cache

from . import sources

STEREOSET_AXES = ("gender", "race", "religion", "profession")
SELECTION_AXES = ("gender", "race", "religion")  # BiasEdit's test selections
OFFICIAL_AXES = (*STEREOSET_AXES, "all")
LABELS = ("stereotype", "anti-stereotype", "unrelated")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


def _row(r: dict, sents: dict[str, str], **extra) -> dict:
    return {"prompt": r["context"], "target": r["target"], "bias_type": r["bias_type"],
            "stereotype": sents["stereotype"], "anti_stereotype": sents["anti-stereotype"],
            "unrelated": sents["unrelated"], **extra}


def _file_sentences(r: dict) -> list[str]:
    """The three sentences of one selection item, whatever the file's layout."""
    if "data" in r:
        return [r["data"][k]["sentence"] for k in LABELS]
    return [s["sentence"] for s in r["sentences"]]


@lru_cache(maxsize=None)
def _official_index() -> dict[tuple[str, str], tuple[dict, ...]]:
    out: dict[tuple[str, str], list[dict]] = {}
    for r in sources.stereoset_official():
        if r["type"] == "intrasentence":
            out.setdefault((r["bias_type"], _norm(r["context"])), []).append(r)
    return {k: tuple(v) for k, v in out.items()}


def official_labels(item: dict) -> dict[str, str]:
    """``{official label: sentence as in the selection file}`` for one BiasEdit selection item.

    Raises ValueError when no official row has this item's bias type, context and sentences.
    """
    sents = _file_sentences(item)
    mine = {_norm(s): s for s in sents}
    for off in _official_index().get((item["bias_type"], _norm(item["context"])), ()):
        by_text = {_norm(off[k]): k for k in LABELS}
        if set(by_text) == set(mine):
            return {by_text[n]: s for n, s in mine.items()}
    raise ValueError(f"StereoSet item {item.get('id')} ({item['context']!r}) has no official row with the same "
                     "sentences in data/stereoset/official_dev.jsonl; the data files are inconsistent")


def selection(axis: str = "gender") -> list[dict]:
    """BiasEdit's test selection of ``axis`` with official labels (``label_source="official"``)."""
    if axis not in SELECTION_AXES:
        raise ValueError(f"StereoSet test has axes {', '.join(SELECTION_AXES)}; got {axis!r} (use split='dev' "
                         "or the stereoset-intra suite for profession)")
    return [_row(r, official_labels(r), id=r["id"], label_source="official") for r in sources.stereoset_selection(axis)]


def editbias_dev(axis: str = "gender") -> list[dict]:
    """EditBias's dev re-split (from StereoSet's test set) for ``axis``, labels from ``gold_label``."""
    if axis not in STEREOSET_AXES:
        raise ValueError(f"unknown StereoSet axis {axis!r}; choose one of {', '.join(STEREOSET_AXES)}")
    out = []
    for r in sources.stereoset_dev():
        if r["bias_type"] == axis:
            by = {s["gold_label"]: s["sentence"] for s in r["sentences"]}
            out.append(_row(r, by, id=r["id"], label_source="gold_label"))
    return out


def official(task: str, axis: str = "gender") -> list[dict]:
    """The official dev set's ``intrasentence`` or ``intersentence`` rows of ``axis`` (or ``all``)."""
    if task not in ("intrasentence", "intersentence"):
        raise ValueError(f"task must be intrasentence or intersentence, got {task!r}")
    if axis not in OFFICIAL_AXES:
        raise ValueError(f"unknown StereoSet axis {axis!r}; choose one of {', '.join(OFFICIAL_AXES)}")
    return [_row(r, r, id=f"{task[:5]}-{i}", label_source="official")
            for i, r in enumerate(x for x in sources.stereoset_official() if x["type"] == task)
            if axis == "all" or r["bias_type"] == axis]
