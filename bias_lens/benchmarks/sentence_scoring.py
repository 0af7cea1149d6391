"""Batched per-token log-probabilities of whole sentences and of completions.

Built on :func:`bias_lens.scoring.iter_batches` (right padding, length-sorted batches, original
order restored) and :func:`bias_lens.scoring.batch_token_logprobs` (the one sequence
log-likelihood, also behind multi-token targets and causal selection's retention guard). From each batch only ``log p(token_t | tokens_<t)`` of the real tokens and a
greedy-match flag are kept (a logsumexp and a gather; no full log-softmax copy is stored).

Sentence prefix: a sentence's first token has no left context. ``prefix="bos"`` (default)
prepends the tokenizer's BOS token (EOS when it has none, as GPT-2's ``<|endoftext|>``) so every
token of the sentence is scored; ``prefix="none"`` scores tokens 2..n only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from ..scoring import batch_token_logprobs, check_prompts, iter_batches, tokenize


def prefix_ids(tokenizer: Any, prefix: str = "bos") -> list[int]:
    """The token ids put before every sentence (``[]`` for ``prefix="none"``)."""
    if prefix == "none":
        return []
    if prefix != "bos":
        raise ValueError(f"prefix must be 'bos' or 'none', got {prefix!r}")
    tid = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tid is None:
        raise ValueError("tokenizer has neither a BOS nor an EOS token; use prefix='none'")
    return [int(tid)]


def sentence_ids(tokenizer: Any, texts: Sequence[str], prefix: str = "bos") -> list[list[int]]:
    """Token ids of each text (no special tokens) after :func:`prefix_ids` -- the sequences scored
    by :func:`token_logprobs`."""
    pre = prefix_ids(tokenizer, prefix)
    return [pre + list(t) for t in tokenizer(check_prompts(texts), add_special_tokens=False)["input_ids"]]


@torch.no_grad()
def score_sequences(
    lm: Any, seqs: Sequence[Sequence[int]], starts: Sequence[int], *, batch_size: int = 32, progress: bool = False
) -> tuple[list[Tensor], list[bool]]:
    """For each id sequence, float64 ``log p(ids[t] | ids[:t])`` for ``t in [start, len)`` and whether
    every one of those tokens is also the model's argmax (greedy exact match)."""
    if any(not 1 <= s < len(q) for s, q in zip(starts, seqs, strict=True)):
        raise ValueError("each start must satisfy 1 <= start < len(sequence)")
    lps: list[Tensor] = [torch.empty(0)] * len(seqs)
    hits: list[bool] = [False] * len(seqs)
    batches = iter_batches(lm.tokenizer, [], batch_size, device=lm.device, token_ids=seqs)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, total=-(-len(seqs) // batch_size), desc="scoring", leave=False)
    for b in batches:
        lp, ok = batch_token_logprobs(lm, b)
        lp, ok = lp.cpu(), ok.cpu()
        for i, r in enumerate(b.rows):
            n = int(b.last[i])  # predictions for tokens 1..n sit at positions 0..n-1
            lps[r] = lp[i, starts[r] - 1 : n].clone()
            hits[r] = bool(ok[i, starts[r] - 1 : n].all())
    return lps, hits


def token_logprobs(
    lm: Any, texts: Sequence[str], *, prefix: str = "bos", batch_size: int = 32, progress: bool = False
) -> list[Tensor]:
    """Per-token log-probs of each text (conditioned on ``prefix``; see the module docstring)."""
    seqs = sentence_ids(lm.tokenizer, texts, prefix)
    start = 1  # with a prefix: every text token; without: tokens 2..n
    if any(len(s) <= start for s in seqs):
        raise ValueError("a text is too short to score (needs 2 tokens with prefix='none')")
    return score_sequences(lm, seqs, [start] * len(seqs), batch_size=batch_size, progress=progress)[0]


#: how a sentence's token log-probs become one score (all "higher = more likely")
REDUCERS = ("mean", "geomean", "mean_prob", "sum")


def reduce_logprobs(lps: Sequence[Tensor], reduce: str = "mean") -> Tensor:
    """One float64 score per sentence from its token log-probs.

    ``mean``: mean token log-prob (this project's default); ``geomean``: the geometric-mean token
    probability ``exp(mean log p)`` of the official StereoSet code (same order as ``mean``, so the
    same SS); ``mean_prob``: the arithmetic mean of token probabilities (BiasEdit's evaluator);
    ``sum``: the sentence log-likelihood (CrowS-Pairs, WinoBias).
    """
    if reduce not in REDUCERS:
        raise ValueError(f"sentence score must be one of {', '.join(REDUCERS)}, got {reduce!r}")
    fn = {"mean": lambda t: t.mean(), "geomean": lambda t: t.mean().exp(), "mean_prob": lambda t: t.exp().mean(),
          "sum": lambda t: t.sum()}[reduce]
    return torch.tensor([float(fn(t)) for t in lps], dtype=torch.float64)


def sentence_scores(
    lm: Any, texts: Sequence[str], *, reduce: str = "mean", prefix: str = "bos", batch_size: int = 32,
    progress: bool = False,
) -> Tensor:
    """One score per text (see :func:`reduce_logprobs` for ``reduce``)."""
    reduce_logprobs([], reduce)  # validate before any forward
    lps = token_logprobs(lm, texts, prefix=prefix, batch_size=batch_size, progress=progress)
    return reduce_logprobs(lps, reduce)


def conditional_scores(
    lm: Any, contexts: Sequence[str], texts: Sequence[str], *, reduce: str = "mean", prefix: str = "bos",
    batch_size: int = 32, progress: bool = False,
) -> Tensor:
    """One score per ``text`` conditioned on its ``context`` (StereoSet intersentence).

    The sequence is ``prefix + context + " " + text``; only the text's tokens are scored, so the
    score is ``log p(text | context)`` reduced per :func:`reduce_logprobs`.
    """
    reduce_logprobs([], reduce)
    if len(contexts) != len(texts):
        raise ValueError("need one context per text")
    pre = prefix_ids(lm.tokenizer, prefix)
    tok = lm.tokenizer
    c_ids = tok(check_prompts(contexts), add_special_tokens=False)["input_ids"]
    t_ids = tok([" " + t for t in check_prompts(texts)], add_special_tokens=False)["input_ids"]
    seqs = [pre + list(c) + list(t) for c, t in zip(c_ids, t_ids)]
    starts = [len(pre) + len(c) for c in c_ids]
    lps, _ = score_sequences(lm, seqs, starts, batch_size=batch_size, progress=progress)
    return reduce_logprobs(lps, reduce)


def continuation_scores(
    lm: Any, prompts: Sequence[str], continuations: Sequence[str], *, batch_size: int = 32
) -> tuple[Tensor, Tensor]:
    """``(log p(continuation | prompt) summed over its tokens, greedy exact match)`` per pair.

    The prompt is tokenised as :func:`bias_lens.scoring.target_logprobs` does (tokenizer defaults)
    and the continuation (e.g. ``" Paris"``) separately without special tokens, then concatenated.
    """
    prompts = check_prompts(prompts)
    if len(prompts) != len(continuations):
        raise ValueError("need one continuation per prompt")
    p_ids = tokenize(lm.tokenizer, prompts)
    c_ids = lm.tokenizer(list(continuations), add_special_tokens=False)["input_ids"]
    if any(not c for c in c_ids):
        raise ValueError("an empty continuation cannot be scored")
    seqs = [list(p) + list(c) for p, c in zip(p_ids, c_ids)]
    lps, hits = score_sequences(lm, seqs, [len(p) for p in p_ids], batch_size=batch_size)
    return torch.tensor([float(t.sum()) for t in lps], dtype=torch.float64), torch.tensor(hits)
