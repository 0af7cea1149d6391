"""``evaluate(lm, suite, split)``: score a model on one suite and compute its metrics.

Profession suites read raw next-token probabilities of the targets with
:func:`.next_token.next_token_logprobs` (= :func:`bias_lens.scoring.target_logprobs` with the
shared-prefix cache on: the one scorer) and compute the gap metrics with the torch metric functions
of :mod:`.metrics` (the code the edit losses use); sentence suites (StereoSet, CrowS-Pairs, WinoBias) and retention use
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
from . import commonwords, datasets, metrics
from .generated import RELIGION_TARGETS
from .next_token import next_token_logprobs
from .retention import retention_metrics
from .sentence_scoring import conditional_scores, reduce_logprobs, sentence_scores, token_logprobs

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
        """JSON-ready summary (suite, split, n, metrics); the per-sample ``details`` are left out."""
        return {"suite": self.suite, "split": self.split, "n": self.n, "metrics": dict(self.metrics)}


def subset(rows: list[dict], limit: int | None) -> list[dict]:
    """A fixed-seed subset of ``limit`` rows in their original order (all rows if limit is None)."""
    if limit is None or limit >= len(rows):
        return rows
    if limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    return [rows[i] for i in sorted(random.Random(LIMIT_SEED).sample(range(len(rows)), limit))]


def _probs(lm: Any, rows: list[dict], words: Sequence[str], batch_size: int, progress: bool,
           multi_token: bool = False) -> np.ndarray:
    """Raw next-token probabilities ``[sample, target]``; multi-token targets only when asked
    (``multi_token=True``: their teacher-forced sequence probability, recorded in the options)."""
    targets = resolve_targets(lm.tokenizer, list(words)).require(single_token=not multi_token)
    lp = next_token_logprobs(lm, [r["prompt"] for r in rows], targets, batch_size=batch_size, progress=progress)
    return lp.exp().numpy()


def _attach(rows: list[dict], p: np.ndarray, words: Sequence[str]) -> list[dict]:
    return [{**r, **{f"p_{w}": float(p[i, j]) for j, w in enumerate(words)}} for i, r in enumerate(rows)]


def gap_metrics(p: np.ndarray, real: np.ndarray) -> dict[str, float]:
    """FBS and AFGB raw (the papers' literal metrics) and renormalised over the targets, and the
    target ``mass`` (mean summed probability): raw scores can fall just by lowering every target."""
    return {"fbs": metrics.fbs(p, real), "fbs_renorm": metrics.fbs(p, real, renorm=True),
            "afgb": metrics.afgb(p), "afgb_renorm": metrics.afgb(p, renorm=True), "mass": metrics.mass(p)}


def _profession(lm, suite, rows, words, batch_size, progress, multi_token=False):
    if len(words) != 2:
        raise ValueError(f"suite {suite!r} compares a male and a female target; pass two words (male first)")
    p = _probs(lm, rows, words, batch_size, progress, multi_token)
    real = np.array([[r["f_he"], r["f_she"]] for r in rows])
    m = {**gap_metrics(p, real), "mean_p_male": float(p[:, 0].mean()), "mean_p_female": float(p[:, 1].mean())}
    if suite in ("genbiaseval", "genbiaseval-heldout"):
        for scale in ("word", "phrase", "sentence"):
            sel = np.array([r["scale"] == scale for r in rows])
            if sel.any():
                m[f"afgb_{scale}"] = metrics.afgb(p[sel])
                m[f"afgb_{scale}_renorm"] = metrics.afgb(p[sel], renorm=True)
    if suite == "genhinteval":
        F = np.array([r["F"] for r in rows])
        m["ub"] = metrics.ub(p, F)
        m["ub_renorm"] = metrics.ub(p, F, renorm=True)
    if suite in ("dama", "dama-filtered"):
        s_, f_ = [r["s"] for r in rows], [r["f"] for r in rows]
        m.update(metrics.dama_regression(p[:, 0] - p[:, 1], s_, f_))
        q = metrics.renormalise(p)
        m.update({f"{k}_renorm": v for k, v in metrics.dama_regression(q[:, 0] - q[:, 1], s_, f_).items()})
    return m, _attach(rows, p, words)


def _religion(lm, rows, words, batch_size, progress, multi_token=False):
    p = _probs(lm, rows, words, batch_size, progress, multi_token)
    real = np.full(p.shape, 1.0 / p.shape[1])
    m = gap_metrics(p, real)
    m.update({f"mean_p_{w.lower()}": float(p[:, j].mean()) for j, w in enumerate(words)})
    details = _attach([{k: v for k, v in r.items() if k != "real_world"} | {"real_world": real[i].tolist()}
                       for i, r in enumerate(rows)], p, words)
    return m, details


def stereoset_sentence_scores(lm: Any, rows: Sequence[dict], reduces: dict[str, str], *, batch_size: int = 32,
                              progress: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Intrasentence StereoSet: per ``key -> reduce`` (see :func:`reduce_logprobs`), the
    (stereotype, anti-stereotype, unrelated) sentence scores of ``rows``, all from one forward."""
    n = len(rows)
    texts = [r["stereotype"] for r in rows] + [r["anti_stereotype"] for r in rows] + [r["unrelated"] for r in rows]
    lps = token_logprobs(lm, texts, batch_size=batch_size, progress=progress)
    out = {}
    for key, reduce in reduces.items():
        sc = reduce_logprobs(lps, reduce).numpy()
        out[key] = (sc[:n], sc[n : 2 * n], sc[2 * n :])
    return out


def _stereoset(lm, rows, opts, batch_size, progress, inter: bool = False):
    """SS / LMS / ICAT (and per bias type when several are present). Intrasentence: each whole
    sentence scored; intersentence: each candidate scored conditioned on the context sentence."""
    n = len(rows)
    if inter:
        texts = [r["stereotype"] for r in rows] + [r["anti_stereotype"] for r in rows] + [r["unrelated"] for r in rows]
        sc = conditional_scores(lm, [r["prompt"] for r in rows] * 3, texts, reduce=opts["sentence_score"],
                                batch_size=batch_size, progress=progress).numpy()
        st, an, un = sc[:n], sc[n : 2 * n], sc[2 * n :]
    else:
        reduce_logprobs([], opts["sentence_score"])  # validate before any forward
        st, an, un = stereoset_sentence_scores(lm, rows, {"": opts["sentence_score"]}, batch_size=batch_size,
                                               progress=progress)[""]
    m = metrics.stereoset_scores(st, an, un, lms=opts["lms"])
    types = np.array([r["bias_type"] for r in rows])
    if len(set(types.tolist())) > 1:
        for t in sorted(set(types.tolist())):
            sel = types == t
            m.update({f"{k}_{t}": v for k, v in metrics.stereoset_scores(st[sel], an[sel], un[sel], lms=opts["lms"]).items()})
    details = [{**r, "score_stereotype": float(a), "score_anti_stereotype": float(b), "score_unrelated": float(c)}
               for r, a, b, c in zip(rows, st, an, un)]
    return m, details


def crows_sentence_scores(lm: Any, rows: Sequence[dict], *, reduce: str = "sum", batch_size: int = 32,
                          progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """CrowS-Pairs: the (``sent_more``, ``sent_less``) sentence scores of ``rows`` from one forward
    (``reduce`` as :func:`~.sentence_scoring.sentence_scores`; the suite's default is the summed log-prob)."""
    n = len(rows)
    texts = [r["sent_more"] for r in rows] + [r["sent_less"] for r in rows]
    sc = sentence_scores(lm, texts, reduce=reduce, batch_size=batch_size, progress=progress).numpy()
    return sc[:n], sc[n:]


def _crows(lm, rows, opts, batch_size, progress):
    more, less = crows_sentence_scores(lm, rows, reduce=opts["sentence_score"], batch_size=batch_size, progress=progress)
    m = metrics.crows_score(more, less, [r["direction"] for r in rows], mode=opts["crows_mode"])
    details = [{**r, "ll_more": float(a), "ll_less": float(b)} for r, a, b in zip(rows, more, less)]
    return m, details


def _winogender(lm, rows, batch_size, progress):
    diff, renorm, mass = np.zeros(len(rows)), np.zeros(len(rows)), np.zeros(len(rows))
    probs = np.zeros((len(rows), 2))
    details: list[dict] = [{} for _ in rows]
    for pair in sorted({tuple(r["targets"]) for r in rows}):
        idx = [i for i, r in enumerate(rows) if tuple(r["targets"]) == pair]
        p = _probs(lm, [rows[i] for i in idx], pair, batch_size, progress)
        probs[idx] = p
        diff[idx] = p[:, 0] - p[:, 1]
        renorm[idx] = metrics.renormalise(p)[:, 0] - 0.5
        mass[idx] = p.sum(1)
        for k, i in enumerate(idx):
            details[i] = {**rows[i], "p_male": float(p[k, 0]), "p_female": float(p[k, 1])}
    occ = [r["occupation"] for r in rows]
    bls = {r["occupation"]: r["bls_pct_female"] for r in rows}
    m = metrics.winogender_correlation(diff, occ, bls)
    m["winogender_r_renorm"] = metrics.winogender_correlation(renorm, occ, bls)["winogender_r"]
    m["mass"] = float(mass.mean())
    m.update(metrics.winogender_entropy(probs))  # the paper's entropy difference (default reading)
    return m, details


def _winobias(lm, rows, opts, batch_size, progress):
    n = len(rows)
    texts = [r["pro"] for r in rows] + [r["anti"] for r in rows]
    sc = sentence_scores(lm, texts, reduce=opts["sentence_score"], batch_size=batch_size, progress=progress).numpy()
    m = metrics.winobias_scores(sc[:n], sc[n:], [r["type"] for r in rows])
    details = [{**r, "ll_pro": float(a), "ll_anti": float(b)} for r, a, b in zip(rows, sc[:n], sc[n:])]
    return m, details


PROFESSION_SUITES = ("genbiaspro-cg", "genbiaseval", "genbiaseval-heldout", "genhinteval", "dama", "dama-filtered")
STEREOSET_SUITES = ("stereoset", "stereoset-intra", "stereoset-inter")


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
    multi_token: bool = False,
    **capability: Any,
) -> EvalResult:
    """Score ``lm`` on ``suite``/``split`` (``limit``: a fixed-seed subset of that many samples).

    ``targets`` default to he/she (male first) for the profession suites and to the five religion
    words for ``religion``; they must be distinct and single-token unless ``multi_token=True``
    (then each is scored by its teacher-forced sequence probability). Sentence scores: StereoSet
    mean token log-prob (default; ``"geomean"`` = the official code's geometric-mean probability,
    same SS; ``"mean_prob"`` = BiasEdit's mean probability), CrowS-Pairs and WinoBias summed
    log-likelihood; ``sentence_score`` overrides all three. Every sentence is scored after the
    tokenizer's BOS token (EOS if none). Capability suites (mmlu, arithmetic, perplexity, gsm8k,
    humaneval) take their own keywords (``limit_per_subject``, ``shots``, ...; see
    :mod:`.capability`).
    """
    datasets.check_suite(suite, split, axis)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if capability and suite not in datasets.CAPABILITY_SUITES:
        raise ValueError(f"options {', '.join(sorted(capability))} apply to the capability suites only, not {suite!r}")
    opts: dict[str, Any] = {"axis": axis, "seed": seed, "limit": limit}
    if suite in datasets.CAPABILITY_SUITES:
        from .capability import evaluate_capability

        m, details, extra = evaluate_capability(lm, suite, split, limit=limit, batch_size=batch_size,
                                                progress=progress, **capability)
        return EvalResult(suite, split, len(details), m, details, {**opts, **extra})
    if suite == "retention":
        m, details = retention_metrics(lm, limit=limit, batch_size=batch_size, progress=progress)
        n_sent = sum(d["kind"] == "sentence" for d in details)
        opts.update(prefix="bos", n_sentences=n_sent, n_probe=len(details) - n_sent)
        return EvalResult(suite, split, len(details), m, details, opts)
    rows = subset(datasets.load_split(suite, split, seed=seed, axis=axis), limit)
    m, details = _dispatch(lm, suite, rows, opts, targets, batch_size, progress, multi_token,
                           dict(sentence_score=sentence_score, lms=lms, crows_mode=crows_mode))
    return EvalResult(suite, split, len(rows), m, details, opts)


def _dispatch(lm, suite, rows, opts, targets, batch_size, progress, multi_token, score_opts):
    """Run one bias suite's scorer; records every number-changing option in ``opts``."""
    if suite in PROFESSION_SUITES or suite == "religion":
        default = ["he", "she"] if suite != "religion" else list(RELIGION_TARGETS)
        words = list(targets) if targets is not None else default
        # the five religion words are several tokens in many vocabularies: scored as sequences by default
        multi_token = multi_token or (targets is None and suite == "religion")
        opts.update(targets=words, multi_token=multi_token)
        if suite == "religion":
            return _religion(lm, rows, words, batch_size, progress, multi_token)
        return _profession(lm, suite, rows, words, batch_size, progress, multi_token)
    if suite == "commonwords":
        if targets is not None:
            raise ValueError("commonwords scores each row on its own pair (man/woman or he/she); do not pass targets")
        opts.update(targets="per-row: man,woman | he,she", multi_token=multi_token)
        return commonwords.run_commonwords(lm, rows, batch_size, progress, multi_token)
    if targets is not None:
        raise ValueError(f"targets apply to the profession suites and religion, not {suite!r}")
    if suite in STEREOSET_SUITES:
        opts.update(sentence_score=score_opts["sentence_score"] or "mean", lms=score_opts["lms"], prefix="bos",
                    task="intersentence" if suite == "stereoset-inter" else "intrasentence")
        return _stereoset(lm, rows, opts, batch_size, progress, inter=suite == "stereoset-inter")
    if suite == "crows-pairs":
        opts.update(sentence_score=score_opts["sentence_score"] or "sum", crows_mode=score_opts["crows_mode"],
                    prefix="bos")
        return _crows(lm, rows, opts, batch_size, progress)
    if suite == "winogender":
        return _winogender(lm, rows, batch_size, progress)
    opts.update(sentence_score=score_opts["sentence_score"] or "sum", prefix="bos")
    return _winobias(lm, rows, opts, batch_size, progress)
