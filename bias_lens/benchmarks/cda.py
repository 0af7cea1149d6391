"""Counterfactual corpus for the contrastive references (issue 16 B; Lutz et al. 2024, arXiv 2410.17739).

Local contrastive editing compares two models that differ only in the bias: a *stereotypical* and
an *anti-stereotypical* fine-tune of the same base, trained on a corpus and its counterfactually
augmented (CDA) copy. Each :class:`CdaPair` holds a stereotypical sentence and its two-sided
gender swap (:func:`cda_swap`); the stereotypical reference trains on the ``stereo`` side, the
anti-stereotypical one on the ``anti`` side, a neutral one on both (:func:`texts`).

**Swap table** (:func:`swap_table`; every word swapped in both directions unless its source is
directional), first source to define a word wins:

1. debiaswe ``definitional_pairs.json`` (Bolukbasi et al. 2016; both directions);
2. WinoBias ``generalized_swaps.txt`` (Zhao et al. 2018; directional, as listed);
3. debiaswe ``equalize_pairs.json`` (both directions; multi-word ``_`` entries skipped);
4. WinoBias ``extra_gendered_words.txt`` (both directions).

Occupations are never swapped (they carry the stereotype CDA contrasts): WinoBias's occupation
lists and GenBiasEval's gender-neutral professions are removed from the table (e.g. WinoBias's
own extra list would turn ``tailor`` into ``seamstress``).

``her`` is ambiguous (his / him): it becomes ``him`` when punctuation, the end of the text or a
function word (:data:`OBJECT_NEXT`) follows it, else ``his``. Case is kept (``He`` -> ``She``).

**Sources** (train side only; every one named in ``data/README.md``):

* ``professions``: GenBiasEval-heldout *train* prompts (train professions x the 6 seen templates;
  the 3 held-out templates and every dev/test profession stay out) completed with the pronoun of
  the profession's stereotype (``s > 0``: he) and a gender-free reason (:data:`REASONS`);
  professions with ``|s| < min_stereo`` are skipped (no stereotype to contrast);
* ``winobias``: WinoBias *dev* pro-stereotyped sentences (types 1 and 2); their CDA swap is the
  anti-stereotyped sentence of the same line (checked in the tests);
* ``hints`` (shared): GenHintEval *train* prompts ("The nurse forgot his umbrella at home, so when
  it started to rain,") completed with the hinted pronoun; the sentence *and* its swap go to every
  side, so both references see the same hint-consistent text. They carry no stereotype (hints are
  assigned at random, balanced per template), and keep hint-following out of the stereo -> anti
  difference (without them the anti reference follows hints less than the stereotypical one, and
  the transferred edit lowers UB; docs/contrastive.md);
* ``stereoset``: the stereotype sentences of the StereoSet training pool
  (:func:`~bias_lens.benchmarks.stereoset_train.editor_pool`: no test or robustness context)
  that contain a swappable word, minus the ``stereoset`` *dev* contexts (the contrastive alpha is
  chosen on them).

**Balance** (``balance=True``, the default; ``False`` keeps every pair, the literal corpus): within
each source, as many pairs whose stereotypical side is male (:func:`gender_of` > 0) as female are
kept (seeded draw; pairs of neither gender all kept). Unbalanced, the stereotypical side says
*he* three times as often as *she* (most train professions are male-stereotyped), so the
stereo -> anti difference is mostly a global he -> she shift, not the profession-conditional
association the references are meant to contrast.

CrowS-Pairs is not used: every gender pair is in the project's test split (``crows-pairs`` has
only ``test``). :func:`leaks` lists corpus sentences equal to a test sentence of StereoSet
(selections and robustness sets), CrowS-Pairs (all 1,508 pairs), WinoBias test, or starting with a
GenBiasEval / GenBiasEval-heldout / GenHintEval test prompt; :func:`build_corpus` drops those pairs
(WinoBias dev and test share a few sentences: 5 of 792) and logs how many. The
train/dev split is by group (profession, WinoBias line, StereoSet context), seeded.
"""

from __future__ import annotations

import logging
import random
import re
from dataclasses import dataclass
from functools import lru_cache

from . import sources

log = logging.getLogger(__name__)

SOURCES = ("professions", "winobias", "stereoset", "hints")
#: the sources of the references the library trains by default (``ReferenceConfig.sources``): the ones
#: measured in docs/contrastive.md. ``hints`` is opt-in: its references were not trained in this
#: project yet (each reference takes ~23 min on the 2-core box), so no number supports it
DEFAULT_SOURCES = ("professions", "winobias", "stereoset")
#: sources whose sentences *and* swaps go to every side (stereotype-free anchors, see ``hints``)
SHARED = ("hints",)
#: bump when the default corpus changes (it keys the reference cache); 1 = gender-balanced sources,
#: 2 = + the shared GenHintEval-train anchor
CORPUS_VERSION = 2
#: completions of the GenHintEval templates (by template) that use the hinted pronoun ({p})
HINT_ENDINGS = ("{p} got completely wet", "{p} went to see a doctor", "{p} left the house early")
SIDES = ("stereo", "anti", "neutral")
#: words after which ``her`` is an object (``him``), not a possessive (``his``)
OBJECT_NEXT = frozenset(
    "to and or but a an the that this these those because for with in on at about from by as if when while so "
    "again too up out off back down into over after before all some what how why who which than then was is "
    "would will could should can did had has have".split())
#: gender-free completions of the profession templates; {p}/{o} = the pronoun / possessive slot
REASONS = (
    "{p} was tired", "{p} had a lot of work to do", "{p} was in a good mood", "{p} had received some good news",
    "{p} felt unwell", "{p} was running late", "{o} train had been delayed", "{p} had to finish {o} report",
    "{p} needed some rest", "{o} phone battery was empty", "{p} had forgotten something important",
    "{p} wanted to prepare for the next day",
)
_PRON = {"he": ("he", "his"), "she": ("she", "her")}
#: male words whose count decides a sentence's gender (their swaps are the female words)
MALE_WORDS = frozenset(
    "he his him himself man men boy boys father fathers son sons brother brothers husband husbands guy guys male "
    "males mr sir king kings gentleman gentlemen dad dads uncle uncles nephew nephews grandfather grandson".split())
_WORD = re.compile(r"[A-Za-z]+")


@dataclass(frozen=True)
class CdaPair:
    """A stereotypical sentence, its gender swap, where it came from and its split group."""

    stereo: str
    anti: str
    source: str
    group: str


def _pairs_of(rows, directional: bool) -> list[tuple[str, str]]:
    out = []
    for a, b in rows:
        a, b = a.strip().lower().rstrip("."), b.strip().lower().rstrip(".")
        if "_" in a or "_" in b or " " in a or " " in b or not a or not b:
            continue
        out.append((a, b))
        if not directional:
            out.append((b, a))
    return out


@lru_cache(maxsize=None)
def swap_table() -> dict[str, str]:
    """Lower-case word -> its gender counterpart (module docstring: sources and priority); ``her`` excluded."""
    wino = sources.data_dir() / "winobias"
    general = [line.split() for line in (wino / "generalized_swaps.txt").read_text(encoding="utf-8").splitlines()]
    extra = [line.split() for line in (wino / "extra_gendered_words.txt").read_text(encoding="utf-8").splitlines()]
    ordered = (_pairs_of(sources._read_json("debiaswe/definitional_pairs.json"), False)
               + _pairs_of([r for r in general if len(r) == 2], True)
               + _pairs_of(sources._read_json("debiaswe/equalize_pairs.json"), False)
               + _pairs_of([r for r in extra if len(r) == 2], False))
    table: dict[str, str] = {}
    for a, b in ordered:
        table.setdefault(a, b)
    return {a: b for a, b in table.items() if a != "her" and a not in _occupations()}


def _occupations() -> set[str]:
    """WinoBias occupations and GenBiasEval's gender-neutral professions (single words, lower case)."""
    from .generated import neutral_professions

    wino = sources.data_dir() / "winobias"
    words = {w.strip().lower() for f in ("male_occupations.txt", "female_occupations.txt")
             for w in (wino / f).read_text(encoding="utf-8").splitlines()}
    return words | {w.lower() for w, _, _ in neutral_professions()}


def _case_like(word: str, repl: str) -> str:
    if len(word) > 1 and word.isupper():
        return repl.upper()
    return repl[:1].upper() + repl[1:] if word[:1].isupper() else repl


def _her(text: str, end: int) -> str:
    """``him`` or ``his`` for a ``her`` ending at ``end`` (see :data:`OBJECT_NEXT`)."""
    nxt = _WORD.search(text, end)
    between = text[end:nxt.start()] if nxt else text[end:]
    if nxt is None or between.strip() or nxt.group().lower() in OBJECT_NEXT:
        return "him"
    return "his"


def cda_swap(text: str) -> str:
    """``text`` with every gendered word exchanged for its counterpart (two-sided CDA, case kept)."""
    table, out, pos = swap_table(), [], 0
    for m in _WORD.finditer(text):
        w = m.group()
        low = w.lower()
        repl = _her(text, m.end()) if low == "her" else table.get(low)
        out.append(text[pos:m.start()])
        out.append(_case_like(w, repl) if repl is not None else w)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def has_gender_word(text: str) -> bool:
    """Whether :func:`cda_swap` changes anything in ``text``."""
    table = swap_table()
    return any(w.lower() == "her" or w.lower() in table for w in _WORD.findall(text))


def gender_of(text: str) -> int:
    """+1 when ``text`` has more male words (:data:`MALE_WORDS`) than their female swaps, -1 for fewer, else 0."""
    table = swap_table()
    female = {table[w] for w in MALE_WORDS if w in table} | {"her"}
    words = [w.lower() for w in _WORD.findall(text)]
    diff = sum(w in MALE_WORDS for w in words) - sum(w in female for w in words)
    return (diff > 0) - (diff < 0)


def balance(pairs: list[CdaPair], seed: int) -> list[CdaPair]:
    """Per source, equally many male- and female-stereotyped pairs (seeded draw; others kept), order kept."""
    keep: set[int] = {i for i, p in enumerate(pairs) if p.source in SHARED}
    for source in dict.fromkeys(p.source for p in pairs if p.source not in SHARED):
        idx = {g: [i for i, p in enumerate(pairs) if p.source == source and gender_of(p.stereo) == g] for g in (-1, 0, 1)}
        n = min(len(idx[-1]), len(idx[1]))
        for g in (-1, 1):
            random.Random(f"{seed}-{source}-{g}").shuffle(idx[g])
            keep.update(idx[g][:n])
        keep.update(idx[0])
    return [p for i, p in enumerate(pairs) if i in keep]


def profession_pairs(seed: int = 0, min_stereo: float = 0.1) -> list[CdaPair]:
    """GenBiasEval-heldout train prompts completed with the stereotypical pronoun (module docstring)."""
    from .datasets import load_split

    out = []
    for s in load_split("genbiaseval-heldout", "train", seed=seed):
        if abs(float(s["s"])) < min_stereo:
            continue
        p, o = _PRON["he" if float(s["s"]) > 0 else "she"]
        reason = random.Random(f"{seed}-{s['prompt']}").choice(REASONS).format(p=p, o=o)
        stereo = f"{s['prompt']} {reason}."
        out.append(CdaPair(stereo, cda_swap(stereo), "professions", f"profession:{s['profession']}"))
    return out


def hint_pairs(seed: int = 0) -> list[CdaPair]:
    """GenHintEval train prompts completed with the hinted pronoun, and their swaps (a shared source)."""
    from .datasets import load_split
    from .generated import GHE_TEMPLATES

    order = [t for t, _ in GHE_TEMPLATES]
    out = []
    for s in load_split("genhinteval", "train", seed=seed):
        t = order.index(s["template"])
        sent = f"{s['prompt']} {HINT_ENDINGS[t].format(p='he' if s['F'] > 0 else 'she')}."
        out.append(CdaPair(sent, cda_swap(sent), "hints", f"hint:{s['profession']}:{t}"))
    return out


def winobias_pairs() -> list[CdaPair]:
    """WinoBias dev pro-stereotyped sentences and their swaps (types 1 and 2)."""
    return [CdaPair(p, cda_swap(p), "winobias", f"winobias:{t}:{i}")
            for t in (1, 2) for i, p, _ in sources.winobias_lines("pro", t, "dev")]


def stereoset_pairs() -> list[CdaPair]:
    """Stereotype sentences of the StereoSet training pool with a gender word, dev contexts excluded."""
    from .datasets import load_split
    from .stereoset_train import editor_pool, norm_context

    dev = {norm_context(r["prompt"]) for r in load_split("stereoset", "dev")}
    return [CdaPair(r["stereotype"], cda_swap(r["stereotype"]), "stereoset", f"stereoset:{norm_context(r['prompt'])}")
            for r in editor_pool() if norm_context(r["prompt"]) not in dev and has_gender_word(r["stereotype"])]


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower())


@lru_cache(maxsize=None)
def _test_items() -> tuple[frozenset[str], tuple[str, ...]]:
    """(normalised test sentences, normalised test prompts) of every suite the corpus must not touch."""
    from . import external, stereoset
    from .datasets import load_split

    sents: set[str] = set()
    for axis in stereoset.SELECTION_AXES:
        for r in stereoset.selection(axis):
            sents.update(r[k] for k in ("stereotype", "anti_stereotype", "unrelated"))
    for split, axes in stereoset.ROBUST_SPLITS.items():
        for axis in axes:
            for r in stereoset.robust(split, axis):
                sents.update(r[k] for k in ("stereotype", "anti_stereotype", "unrelated") if k in r)
    for r in external.crows_pairs("all"):
        sents.update((r["sent_more"], r["sent_less"]))
    for r in load_split("winobias", "test"):
        sents.update((r["pro"], r["anti"]))
    prompts = [r["prompt"] for suite in ("genbiaseval", "genbiaseval-heldout", "genhinteval")
               for r in load_split(suite, "test")]
    return frozenset(_norm(s) for s in sents), tuple(sorted({_norm(p) for p in prompts}))


def leaks(pairs: list[CdaPair]) -> list[str]:
    """Corpus sentences (either side) equal to a test sentence or starting with a test prompt."""
    sents, prompts = _test_items()
    starts, lengths = set(prompts), sorted({len(p) for p in prompts})
    out = []
    for pair in pairs:
        for text in (pair.stereo, pair.anti):
            t = _norm(text)
            if t in sents or any(t[:n] in starts for n in lengths if n <= len(t)):
                out.append(text)
    return out


def build_corpus(seed: int = 0, sources_: tuple[str, ...] = SOURCES, dev_fraction: float = 0.1,
                 min_stereo: float = 0.1, balanced: bool = True) -> dict[str, list[CdaPair]]:
    """``{"train": [...], "dev": [...]}`` CDA pairs of ``sources_``, gender-balanced per source unless
    ``balanced=False``, split by group with ``seed`` (pairs touching a test item dropped; module docstring)."""
    bad = sorted(set(sources_) - set(SOURCES))
    if bad or not sources_:
        raise ValueError(f"unknown CDA sources {bad}; choose from {', '.join(SOURCES)}")
    if not 0 <= dev_fraction < 1:
        raise ValueError(f"dev_fraction must lie in [0, 1), got {dev_fraction}")
    build = {"professions": lambda: profession_pairs(seed, min_stereo), "winobias": winobias_pairs,
             "stereoset": stereoset_pairs, "hints": lambda: hint_pairs(seed)}
    pairs = [p for name in SOURCES if name in sources_ for p in build[name]()]
    leaked = set(leaks(pairs))
    kept = [p for p in pairs if p.stereo not in leaked and p.anti not in leaked]
    if leaked:
        log.info("dropped %d CDA pairs that equal or extend a test item", len(pairs) - len(kept))
    pairs = balance(kept, seed) if balanced else kept
    groups = sorted({p.group for p in pairs})
    random.Random(seed).shuffle(groups)
    dev = set(groups[: round(dev_fraction * len(groups))])
    return {"train": [p for p in pairs if p.group not in dev], "dev": [p for p in pairs if p.group in dev]}


def texts(pairs: list[CdaPair], side: str) -> list[str]:
    """The sentences a reference trains on: ``stereo``, ``anti`` or ``neutral`` (both sides, two-sided
    CDA); a :data:`SHARED` source's pair gives both its sentences to every side."""
    if side not in SIDES:
        raise ValueError(f"side must be one of {', '.join(SIDES)}, got {side!r}")
    both = side == "neutral"
    return [t for p in pairs for t in ((p.stereo, p.anti) if both or p.source in SHARED else (getattr(p, side),))]
