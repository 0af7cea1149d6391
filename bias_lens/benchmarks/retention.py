"""Retention probes: does an edited model still model English and recall simple facts?

* Perplexity over the gender-neutral corpus (:func:`.external.retention_sentences`: 1,488 MMLU
  val sentences with no gendered word, in a fixed shuffled order) after its first
  :data:`.external.GUARD_SENTENCES` (256, the edits' own pool for guards and covariances): 1,232
  sentences, each conditioned on the tokenizer's BOS token (EOS when it has none).
* A factual / arithmetic completion probe of 160 items written for the project
  (``data/retention/probe.jsonl``: capitals, arithmetic, everyday facts), scored by the summed
  log-prob of the target continuation and by greedy top-1 exact match of all its tokens.

``limit`` keeps the first ``limit`` sentences and the first ``limit`` probe items (both lists are
in a fixed mixed order), so the edit layer can call a cheap, always-identical subset.
"""

from __future__ import annotations

from typing import Any

from . import external, metrics
from .sentence_scoring import continuation_scores, token_logprobs


def retention_metrics(
    lm: Any, *, limit: int | None = None, batch_size: int = 32, progress: bool = False
) -> tuple[dict[str, float], list[dict]]:
    """``perplexity``, ``mean_token_logprob``, ``probe_logprob`` (mean), ``probe_accuracy`` (0..1)."""
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    rows = external.retention(limit)
    sents = [r for r in rows if r["kind"] == "sentence"]
    probe = [r for r in rows if r["kind"] == "probe"]
    lps = token_logprobs(lm, [r["prompt"] for r in sents], batch_size=batch_size, progress=progress)
    lp, hit = continuation_scores(lm, [r["prompt"] for r in probe], [r["target"] for r in probe], batch_size=batch_size)
    n_tok = sum(len(t) for t in lps)
    out = {
        "perplexity": metrics.perplexity(lps),
        "mean_token_logprob": float(sum(float(t.sum()) for t in lps) / n_tok),
        "probe_logprob": float(lp.mean()),
        "probe_accuracy": float(hit.double().mean()),
    }
    details = [{**r, "logprob_sum": float(t.sum()), "n_tokens": len(t)} for r, t in zip(sents, lps)]
    details += [{**r, "logprob": float(a), "correct": bool(b)} for r, a, b in zip(probe, lp, hit)]
    return out, details
