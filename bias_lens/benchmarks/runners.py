"""``evaluate(lm, suite, split)``: score a model on one suite and compute its metrics.

Profession suites read raw next-token probabilities of the targets with
:func:`.next_token.next_token_logprobs` (the numbers of :func:`bias_lens.scoring.target_probs`,
faster); sentence suites (StereoSet, CrowS-Pairs, WinoBias) and retention use
:mod:`.sentence_scoring`. Options that change a number (sentence score, LMS
variant, CrowS direction reading) are recorded in ``EvalResult.options``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..targets import resolve_targets
from . import datasets, metrics
from .generated import RELIGION_TARGETS
from .next_token import next_token_logprobs
from .retention import retention_metrics
from .sentence_scoring import sentence_scores

LIMIT_SEED = 0


@dataclass
class EvalResult:
    """Metrics of one suite/split; ``details`` holds one dict per scored sample."""

    suite: str
    split: str
    n: int
    metrics: dict[str, float]
    details: list[dict] = field(default_factory=list, repr=False)
    options: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"suite": self.suite, "split": self.split, "n": self.n, "metrics": dict(self.metrics)}


def subset(rows: list[dict], limit: int | None) -> list[dict]:
    """A fixed-seed subset of ``limit`` rows in their original order (all rows if limit is None)."""
    if limit is None or limit >= len(rows):
        return rows
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return [rows[i] for i in sorted(random.Random(LIMIT_SEED).sample(range(len(rows)), limit))]


def _probs(lm: Any, rows: list[dict], words: Sequence[str], batch_size: int, progress: bool) -> np.ndarray:
    targets = resolve_targets(lm.tokenizer, list(words))
    lp = next_token_logprobs(lm, [r["prompt"] for r in rows], targets, batch_size=batch_size, progress=progress)
    return lp.exp().numpy()


def _attach(rows: list[dict], p: np.ndarray, words: Sequence[str]) -> list[dict]:
    return [{**r, **{f"p_{w}": float(p[i, j]) for j, w in enumerate(words)}} for i, r in enumerate(rows)]


def _profession(lm, suite, rows, words, batch_size, progress) -> tuple[dict[str, float], list[dict]]:
    if len(words) != 2:
        raise ValueError(f"suite {suite!r} compares a male and a female target; pass two words (male first)")
    p = _probs(lm, rows, words, batch_size, progress)
    real = np.array([[r["f_he"], r["f_she"]] for r in rows])
    m = {"fbs": metrics.fbs(p, real), "fbs_renorm": metrics.fbs(p, real, renorm=True),
         "afgb": metrics.afgb(p), "afgb_renorm": metrics.afgb(p, renorm=True),
         "mean_p_male": float(p[:, 0].mean()), "mean_p_female": float(p[:, 1].mean())}
    if suite == "genbiaseval":
        for scale in ("word", "phrase", "sentence"):
            sel = np.array([r["scale"] == scale for r in rows])
            if sel.any():
                m[f"afgb_{scale}"] = metrics.afgb(p[sel])
    if suite == "genhinteval":
        F = np.array([r["F"] for r in rows])
        m["ub"] = metrics.ub(p, F)
        m["ub_renorm"] = metrics.ub(p, F, renorm=True)
    if suite == "dama":
        m.update(metrics.dama_regression(p[:, 0] - p[:, 1], [r["s"] for r in rows], [r["f"] for r in rows]))
    return m, _attach(rows, p, words)


def _religion(lm, rows, words, batch_size, progress):
    p = _probs(lm, rows, words, batch_size, progress)
    real = np.full(p.shape, 1.0 / p.shape[1])
    m = {"fbs": metrics.fbs(p, real), "fbs_renorm": metrics.fbs(p, real, renorm=True),
         "afgb": metrics.afgb(p), "afgb_renorm": metrics.afgb(p, renorm=True)}
    m.update({f"mean_p_{w.lower()}": float(p[:, j].mean()) for j, w in enumerate(words)})
    details = _attach([{k: v for k, v in r.items() if k != "real_world"} | {"real_world": real[i].tolist()}
                       for i, r in enumerate(rows)], p, words)
    return m, details


def _stereoset(lm, rows, opts, batch_size, progress):
    n = len(rows)
    texts = [r["stereotype"] for r in rows] + [r["anti_stereotype"] for r in rows] + [r["unrelated"] for r in rows]
    sc = sentence_scores(lm, texts, reduce=opts["sentence_score"], batch_size=batch_size, progress=progress).numpy()
    st, an, un = sc[:n], sc[n : 2 * n], sc[2 * n :]
    m = metrics.stereoset_scores(st, an, un, lms=opts["lms"])
    details = [{**r, "score_stereotype": float(a), "score_anti_stereotype": float(b), "score_unrelated": float(c)}
               for r, a, b, c in zip(rows, st, an, un)]
    return m, details


def _crows(lm, rows, opts, batch_size, progress):
    n = len(rows)
    texts = [r["sent_more"] for r in rows] + [r["sent_less"] for r in rows]
    sc = sentence_scores(lm, texts, reduce=opts["sentence_score"], batch_size=batch_size, progress=progress).numpy()
    m = metrics.crows_score(sc[:n], sc[n:], [r["direction"] for r in rows], mode=opts["crows_mode"])
    details = [{**r, "ll_more": float(a), "ll_less": float(b)} for r, a, b in zip(rows, sc[:n], sc[n:])]
    return m, details


def _winogender(lm, rows, batch_size, progress):
    diff, renorm = np.zeros(len(rows)), np.zeros(len(rows))
    details: list[dict] = [{} for _ in rows]
    for pair in sorted({tuple(r["targets"]) for r in rows}):
        idx = [i for i, r in enumerate(rows) if tuple(r["targets"]) == pair]
        p = _probs(lm, [rows[i] for i in idx], pair, batch_size, progress)
        diff[idx] = p[:, 0] - p[:, 1]
        renorm[idx] = metrics.renormalise(p)[:, 0] - 0.5
        for k, i in enumerate(idx):
            details[i] = {**rows[i], "p_male": float(p[k, 0]), "p_female": float(p[k, 1])}
    occ = [r["occupation"] for r in rows]
    bls = {r["occupation"]: r["bls_pct_female"] for r in rows}
    m = metrics.winogender_correlation(diff, occ, bls)
    m["winogender_r_renorm"] = metrics.winogender_correlation(renorm, occ, bls)["winogender_r"]
    return m, details


def _winobias(lm, rows, opts, batch_size, progress):
    n = len(rows)
    texts = [r["pro"] for r in rows] + [r["anti"] for r in rows]
    sc = sentence_scores(lm, texts, reduce=opts["sentence_score"], batch_size=batch_size, progress=progress).numpy()
    m = metrics.winobias_scores(sc[:n], sc[n:], [r["type"] for r in rows])
    details = [{**r, "ll_pro": float(a), "ll_anti": float(b)} for r, a, b in zip(rows, sc[:n], sc[n:])]
    return m, details


def evaluate(
    lm: Any,
    suite: str,
    split: str = "test",
    *,
    limit: int | None = None,
    batch_size: int = 32,
    targets: Sequence[str] | None = None,
    progress: bool = False,
    axis: str = "gender",
    seed: int = 0,
    sentence_score: str | None = None,
    lms: str = "both",
    crows_mode: str = "metric_py",
) -> EvalResult:
    """Score ``lm`` on ``suite``/``split`` (``limit``: a fixed-seed subset of that many samples).

    ``targets`` default to he/she (male first) for the profession suites and to the five religion
    words for ``religion``. Sentence scores: StereoSet mean token log-prob (default), CrowS-Pairs
    and WinoBias summed log-likelihood (their papers compare likelihoods); ``sentence_score="mean"|"sum"``
    overrides all three. Every sentence is scored after the tokenizer's BOS token (EOS if none).
    """
    datasets.check_suite(suite, split, axis)
    opts: dict[str, Any] = {"axis": axis, "seed": seed, "limit": limit}
    if suite == "retention":
        m, details = retention_metrics(lm, limit=limit, batch_size=batch_size, progress=progress)
        n_sent = sum(d["kind"] == "sentence" for d in details)
        opts.update(prefix="bos", n_sentences=n_sent, n_probe=len(details) - n_sent)
        return EvalResult(suite, split, len(details), m, details, opts)
    rows = subset(datasets.load_split(suite, split, seed=seed, axis=axis), limit)
    if suite in ("genbiaspro-cg", "genbiaseval", "genhinteval", "dama"):
        words = list(targets) if targets is not None else ["he", "she"]
        opts["targets"] = words
        m, details = _profession(lm, suite, rows, words, batch_size, progress)
    elif suite == "religion":
        words = list(targets) if targets is not None else list(RELIGION_TARGETS)
        opts["targets"] = words
        m, details = _religion(lm, rows, words, batch_size, progress)
    elif suite == "stereoset":
        opts.update(sentence_score=sentence_score or "mean", lms=lms, prefix="bos")
        m, details = _stereoset(lm, rows, opts, batch_size, progress)
    elif suite == "crows-pairs":
        opts.update(sentence_score=sentence_score or "sum", crows_mode=crows_mode, prefix="bos")
        m, details = _crows(lm, rows, opts, batch_size, progress)
    elif suite == "winogender":
        m, details = _winogender(lm, rows, batch_size, progress)
    else:
        opts.update(sentence_score=sentence_score or "sum", prefix="bos")
        m, details = _winobias(lm, rows, opts, batch_size, progress)
    return EvalResult(suite, split, len(rows), m, details, opts)
