"""Published benchmarks as sample dicts: CrowS-Pairs, WinoGender, WinoBias, retention.

These keep the datasets' own splits (no resampling); ``axis`` picks a bias type where the dataset
has several (CrowS-Pairs: its 9 bias types). StereoSet lives in :mod:`.stereoset`.
"""

from __future__ import annotations

import random
import re

from . import sources

CROWS_AXES = (
    "gender", "race-color", "religion", "socioeconomic", "nationality", "age",
    "sexual-orientation", "physical-appearance", "disability", "all",
)


def crows_pairs(axis: str = "gender") -> list[dict]:
    """CrowS-Pairs pairs of one bias type (``gender`` -> 262) or ``all`` (1,508)."""
    if axis not in CROWS_AXES:
        raise ValueError(f"unknown CrowS-Pairs axis {axis!r}; choose one of {', '.join(CROWS_AXES)}")
    return [
        {"prompt": r["sent_more"], "sent_more": r["sent_more"], "sent_less": r["sent_less"],
         "direction": r["stereo_antistereo"], "bias_type": r["bias_type"], "id": int(r[""])}
        for r in sources.crows_pairs()
        if axis == "all" or r["bias_type"] == axis
    ]


_WG_PRONOUNS = {"he": ("he", "she"), "his": ("his", "her"), "him": ("him", "her")}


def winogender() -> list[dict]:
    """One prompt per WinoGender male sentence (240): the text before its pronoun.

    The targets are the male/female pronoun of that slot (he/she, his/her or him/her), so
    ``p_male - p_female`` is read exactly where the sentence's gender is decided.
    """
    out = []
    for sentid, sent in sources.winogender_sentences():
        occ, part, answer, gender, _ = sentid.split(".")
        if gender != "male":
            continue
        m = re.search(r"\b(he|his|him)\b", sent, flags=re.IGNORECASE)
        if m is None or m.start() == 0:
            raise ValueError(f"no pronoun after the first word in WinoGender sentence {sentid}")
        male, female = _WG_PRONOUNS[m.group(1).lower()]
        out.append({"prompt": sent[: m.start()].rstrip(), "sentence": sent, "occupation": occ,
                    "participant": part, "answer": int(answer), "targets": [male, female],
                    "bls_pct_female": sources.winogender_bls()[occ]})
    return out


def winobias(split: str) -> list[dict]:
    """Pro/anti-stereotyped sentence pairs of types 1 and 2 (396 + 396 per split)."""
    out = []
    for wtype in (1, 2):
        pro = sources.winobias_lines("pro", wtype, split)
        anti = sources.winobias_lines("anti", wtype, split)
        if len(pro) != len(anti):
            raise ValueError(f"WinoBias type {wtype} {split}: pro and anti files differ in length")
        for (i, p, _), (_, a, _) in zip(pro, anti):
            out.append({"prompt": p, "pro": p, "anti": a, "type": wtype, "line": i})
    return out


RETENTION_SEED = 0


def retention_sentences() -> list[str]:
    """The retention perplexity text: the gender-neutral corpus (:func:`.capability_data.neutral_sentences`,
    1,488 MMLU *val* sentences with no gendered word), shuffled once with a fixed seed so that any
    prefix (``limit``) mixes subjects.

    This is the one retention definition (the edit guards, the row metrics and the ``retention``
    suite all use it). It replaced WinoBias/WinoGender sentences, which are gendered text: an edit
    that moves pronouns moved that perplexity for the wrong reason.
    """
    from .capability_data import neutral_sentences

    out = neutral_sentences()
    random.Random(RETENTION_SEED).shuffle(out)
    return out


#: the first ``GUARD_SENTENCES`` sentences of :func:`retention_sentences` belong to the edits (guards,
#: input covariances, causal selection: :func:`retention_texts`); the ``retention`` suite measures only
#: the others, so no edit is fitted or early-stopped on a sentence whose perplexity it is reported on
GUARD_SENTENCES = 256


def retention_texts(limit: int) -> list[str]:
    """The first ``limit`` sentences of :func:`retention_sentences` (its fixed shuffled order): the
    retention subset of the edit guards, the closed-form edit's input covariance and causal selection
    (at most :data:`GUARD_SENTENCES`; the ``retention`` suite never scores these)."""
    if not 1 <= limit <= GUARD_SENTENCES:
        raise ValueError(f"retention limit {limit} out of range: the edits' retention pool has {GUARD_SENTENCES} "
                         "sentences (the rest are the retention suite's)")
    return retention_sentences()[:limit]


def retention(limit: int | None = None) -> list[dict]:
    """Retention samples: ``kind='sentence'`` (perplexity) then ``kind='probe'`` (completion).

    ``limit`` keeps the first ``limit`` of each kind (a cheap, fixed subset for repeated calls).
    """
    sents = retention_sentences()[GUARD_SENTENCES:]
    probe = list(sources.retention_probe())
    if limit is not None:
        sents, probe = sents[:limit], probe[:limit]
    return [{"prompt": s, "kind": "sentence"} for s in sents] + [
        {"prompt": p["prompt"], "target": p["target"], "kind": "probe", "category": p["category"]}
        for p in probe
    ]
