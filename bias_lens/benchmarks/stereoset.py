"""StereoSet samples with the **official** labels (Nadeem et al. 2021).

Four sources, one label rule (the official dev set's):

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
* ``stereoset`` / ``reverse`` (gender) and ``synonym`` (gender, race, religion): BiasEdit's
  robustness re-writes of the test selections (``gender_test_reverse.json``,
  ``syn/{axis}_test_syn.json``; BiasEdit scores each file's ``data`` sentences). Their labels come
  from the official row of the item's *original* through the sentence ids, which every re-write
  keeps; the files' own labels are never read (``label_source`` says which rule was used):

  - ``reverse`` (253): the gender words of context and sentences are exchanged (in the contexts
    ``her``->``his`` 33 times, ``she``->``he`` 33, ``male``->``female`` 27, ...; every context and
    sentence differs from its original), item and sentence ids are those of ``gender_test.json``.
    The original is the ``gender_test.json`` item with the same id and its official labels (as
    for ``test``); a reversed sentence takes the **flipped** official label of
    the original sentence with the same id (stereotype <-> anti-stereotype; unrelated stays):
    the attribute that was stereotypical for one gender is anti-stereotypical when the sentence is
    about the other. Official "The mommy was caring toward her young children." (stereotype) gives
    "The daddy was caring toward his young children." as anti-stereotype and "The daddy was
    uncaring ..." as stereotype. The shipped file agrees on all 253 items (759 sentence ids): it keeps
    ``gender_test.json``'s keys, which are the official labels exchanged. A mechanical swap
    can read oddly ("He, himself, is a girl" becomes the stereotype); the rule is kept uniform.
  - ``synonym`` (gender 255, race 962, religion 79): the BLANK word of each sentence is replaced
    by a synonym (``data``; 639 / 2,361 / 187 sentences differ from the original), while the item's
    ``sentences`` keep the original text. The original is the official row with the same bias type
    and context whose three sentences equal the item's ``sentences`` (the ``test`` rule); a
    synonym sentence takes the official label of the original sentence with the same id
    (``label_source="official"``). Gender has two items more than its test selection, the official
    rows "There BLANK gentlement in Congress" and "Gentlement are supposed to be BLANK!"
    (ids ``24df2ca0...``, ``426b1685...``).

  An item that cannot be mapped (no original, no official row, ids that do not line up) is left
  out, counted in :class:`RobustSet` and logged as a warning with its id; with the shipped files
  the count is 0 for every split.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache

from . import sources

log = logging.getLogger(__name__)

STEREOSET_AXES = ("gender", "race", "religion", "profession")
SELECTION_AXES = ("gender", "race", "religion")  # BiasEdit's test selections
OFFICIAL_AXES = (*STEREOSET_AXES, "all")
LABELS = ("stereotype", "anti-stereotype", "unrelated")
#: BiasEdit's robustness splits of ``stereoset`` and the axes each exists for
ROBUST_SPLITS: dict[str, tuple[str, ...]] = {"reverse": ("gender",), "synonym": SELECTION_AXES}
_FLIP = {"stereotype": "anti-stereotype", "anti-stereotype": "stereotype", "unrelated": "unrelated"}


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


@dataclass(frozen=True)
class RobustSet:
    """One robustness split after label mapping: the rows to score and the ids of the items left out."""

    split: str
    axis: str
    rows: tuple[dict, ...]
    unmapped: tuple[str, ...]

    @property
    def n_items(self) -> int:
        """Items in the source file (mapped + unmapped)."""
        return len(self.rows) + len(self.unmapped)


def check_robust(split: str, axis: str) -> None:
    """Raise ValueError naming the valid choices for an unknown robustness split or an axis it lacks."""
    if split not in ROBUST_SPLITS:
        raise ValueError(f"unknown StereoSet robustness split {split!r}; choose one of {', '.join(ROBUST_SPLITS)}")
    if axis not in ROBUST_SPLITS[split]:
        raise ValueError(f"StereoSet split {split!r} exists for axis {', '.join(ROBUST_SPLITS[split])} only, "
                         f"not {axis!r}")


def _data_entries(item: dict) -> list[dict]:
    """The ``{"sentence", "id"}`` entries of an item's ``data`` (the sentences BiasEdit scores)."""
    return [item["data"][k] for k in LABELS]


def _official_by_id(original: dict, entries: Sequence[dict]) -> dict[str, str]:
    """``{sentence id: official label}`` of an original item whose sentences are ``entries``.

    Raises ValueError (from :func:`official_labels`) when no official row has these sentences.
    """
    view = {"id": original["id"], "bias_type": original["bias_type"], "context": original["context"],
            "sentences": list(entries)}
    ids = {_norm(e["sentence"]): e["id"] for e in entries}
    return {ids[_norm(text)]: label for label, text in official_labels(view).items()}


def _relabel(item: dict, official: dict[str, str], flip: bool) -> dict[str, str] | None:
    """``{label: re-written sentence}`` through the sentence ids; None when the ids do not line up."""
    out: dict[str, str] = {}
    for e in _data_entries(item):
        label = official.get(e["id"])
        if label is None:
            return None
        out[_FLIP[label] if flip else label] = e["sentence"]
    return out if set(out) == set(LABELS) else None


def _originals(split: str, items: Sequence[dict]) -> Iterator[tuple[dict, dict | None, list[dict] | None]]:
    """``(item, original item, original sentence entries)``; None where the original is missing."""
    if split == "reverse":
        by_id = {r["id"]: r for r in sources.stereoset_selection("gender")}
        for item in items:
            orig = by_id.get(item["id"])
            yield item, orig, _data_entries(orig) if orig is not None else None
    else:
        for item in items:
            yield item, item, item.get("sentences")


def map_robust(split: str, axis: str, items: Sequence[dict]) -> RobustSet:
    """Give the items of one robustness file official labels (rules: module docstring); pure."""
    check_robust(split, axis)
    rows: list[dict] = []
    lost: list[str] = []
    for item, orig, entries in _originals(split, items):
        sents = None
        if orig is not None and entries:
            try:
                sents = _relabel(item, _official_by_id(orig, entries), flip=split == "reverse")
            except ValueError:
                sents = None
        if sents is None:
            lost.append(str(item.get("id")))
            continue
        source = "official_reversed" if split == "reverse" else "official"
        rows.append(_row(item, sents, id=item["id"], label_source=source))
    return RobustSet(split, axis, tuple(rows), tuple(lost))


def robust_set(split: str, axis: str = "gender") -> RobustSet:
    """The robustness split ``split`` of ``axis`` mapped from the shipped file; unmapped items logged."""
    check_robust(split, axis)
    items = sources.stereoset_reverse() if split == "reverse" else sources.stereoset_synonym(axis)
    out = map_robust(split, axis, items)
    if out.unmapped:
        log.warning("StereoSet %s/%s: %d of %d items have no official labels and are left out: %s",
                    split, axis, len(out.unmapped), out.n_items, ", ".join(out.unmapped))
    else:
        log.debug("StereoSet %s/%s: all %d items mapped to official labels", split, axis, out.n_items)
    return out


def robust(split: str, axis: str = "gender") -> list[dict]:
    """Rows of a robustness split (``reverse`` or ``synonym``) with official-derived labels."""
    return [dict(r) for r in robust_set(split, axis).rows]
