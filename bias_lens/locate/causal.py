"""Causal selection of bias neurons: mask each candidate, measure bias and retention.

For each candidate neuron (or, in greedy mode, each candidate added to the neurons already
chosen) the activation is zeroed at every position and we measure on dev prompts

* the bias metric, AFGB = mean over prompts of ``|p(t0) - p(t1)|`` (raw next-token
  probabilities of the two targets at the last real token, not renormalised);
* retention, the perplexity of a handful of general sentences (:data:`RETENTION_TEXTS`:
  arithmetic, facts, reading), a local stand-in for the benchmark retention probes.

Batching: the dev batch is replicated R times and replica r masks its own neuron set through a
per-row scale (:func:`mask_rows`), so R candidates share one forward pass. Independent mode ranks
candidates by the change in AFGB (most negative first) and selects the top ``k`` whose relative
perplexity increase stays within ``max_ppl_increase``. Greedy mode grows the set one neuron at a
time, each step adding the candidate that lowers AFGB most among those keeping retention within
the threshold, until ``k`` neurons are chosen or no candidate lowers AFGB.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..arch import parse_neuron_name
from ..hooks import Hook, HookInfo
from ..progress import bar
from ..scoring import check_prompts, iter_batches
from ..targets import TargetSet, resolve_targets
from .attribution import base_model
from .result import LocateResult

log = logging.getLogger(__name__)

RETENTION_TEXTS = (
    "Two plus two equals four, and three plus five equals eight.",
    "The capital of France is Paris, and the capital of Japan is Tokyo.",
    "Water boils at one hundred degrees Celsius at sea level.",
    "She opened the book, read the first chapter, and then made some tea.",
    "The train leaves the station at nine in the morning every day.",
    "A triangle has three sides and a square has four sides.",
    "He planted tomatoes in the garden because the summer was warm.",
    "The meeting was moved to Thursday so that everyone could attend.",
)


def mask_rows(scales: dict[int, Float[Tensor, "batch d_mlp"]]) -> list[Hook]:
    """Per-row neuron masking: multiply ``L{l}.mlp.post`` row b by ``scales[l][b]`` at every position."""

    def mask(t: Tensor, *, hook: HookInfo) -> Tensor:
        """per-row neuron mask"""
        return t * scales[hook.layer].to(t)[:, None, :]

    return [(f"L{l}.mlp.post", mask) for l in scales]


def _scales(lm, sets: Sequence[Sequence[tuple[int, int]]], rows: int) -> dict[int, Tensor]:
    out: dict[int, Tensor] = {}
    for r, s in enumerate(sets):
        for l, k in s:
            if l not in out:
                out[l] = torch.ones(len(sets) * rows, lm.d_mlp)
            out[l][r * rows : (r + 1) * rows, k] = 0.0
    return out


@torch.no_grad()
def evaluate_sets(
    lm, sets: Sequence[Sequence[tuple[int, int]]], prompts: Sequence[str], targets: TargetSet,
    texts: Sequence[str] = RETENTION_TEXTS, *, max_rows: int = 256, progress: bool = False,
) -> tuple[Float[Tensor, " set"], Float[Tensor, " set"]]:
    """AFGB and retention perplexity with each neuron set masked (R sets per forward pass; bar if ``progress``)."""
    tid = torch.as_tensor(targets.first_ids)
    afgb = torch.zeros(len(sets), dtype=torch.float64)
    nll = torch.zeros(len(sets), dtype=torch.float64)
    n_tok = 0
    per = max(1, max_rows // max(1, min(len(prompts), max_rows)))
    starts = range(0, len(sets), per)
    for c0 in bar(starts, total=len(starts), desc="causal masking", enabled=progress, unit="chunk"):
        chunk = sets[c0 : c0 + per]
        R = len(chunk)
        for b in iter_batches(lm.tokenizer, prompts, max_rows, device=lm.device):
            n = b.input_ids.shape[0]
            with lm.hooks(mask_rows(_scales(lm, chunk, n))):
                h = base_model(lm)(input_ids=b.input_ids.repeat(R, 1), attention_mask=b.attention_mask.repeat(R, 1)).last_hidden_state
            last = b.last.repeat(R)
            p = torch.softmax(lm.unembed(h[torch.arange(R * n), last]).double(), -1)[:, tid.to(h.device)]
            afgb[c0 : c0 + R] += (p[:, 0] - p[:, 1]).abs().view(R, n).sum(1).cpu()
        toks = 0
        for b in iter_batches(lm.tokenizer, list(texts), max_rows, device=lm.device):
            n = b.input_ids.shape[0]
            with lm.hooks(mask_rows(_scales(lm, chunk, n))):
                logits = lm.hf(input_ids=b.input_ids.repeat(R, 1), attention_mask=b.attention_mask.repeat(R, 1)).logits
            nll[c0 : c0 + R] += _nll_sum(logits, b.input_ids.repeat(R, 1), b.attention_mask.repeat(R, 1)).view(R, n).sum(1).cpu()
            toks += int(b.attention_mask[:, 1:].sum())
        n_tok = toks
    return afgb / len(prompts), torch.exp(nll / n_tok)


def _nll_sum(logits: Tensor, ids: Tensor, mask: Tensor) -> Float[Tensor, " batch"]:
    lp = torch.log_softmax(logits[:, :-1].double(), -1)
    tok = lp.gather(-1, ids[:, 1:, None])[..., 0]
    return -(tok * mask[:, 1:]).sum(1)


def retention(lm, texts: Sequence[str] = RETENTION_TEXTS) -> tuple[float, str]:
    """Perplexity of ``texts`` under whatever hooks are active (lower is better)."""
    with torch.no_grad():
        b = next(iter_batches(lm.tokenizer, list(texts), len(texts), device=lm.device))
        logits = lm.hf(**b.model_inputs()).logits
        nll = _nll_sum(logits, b.input_ids, b.attention_mask).sum()
    return float(torch.exp(nll / b.attention_mask[:, 1:].sum())), "perplexity"


def _parse(labels: Sequence[str], lm) -> list[tuple[int, int]]:
    out = []
    for lab in labels:
        l, k = parse_neuron_name(lab)
        if not (0 <= l < lm.n_layers and 0 <= k < lm.d_mlp):
            raise ValueError(f"{lab}: out of range (layers 0..{lm.n_layers - 1}, neurons 0..{lm.d_mlp - 1})")
        out.append((l, k))
    return out


def causal_selection(
    lm, candidates: Sequence[str], prompts: Sequence[str], targets: TargetSet | str = "he,she", *,
    k: int = 50, max_ppl_increase: float = 0.05, mode: str = "independent",
    texts: Sequence[str] = RETENTION_TEXTS, max_rows: int = 256, progress: bool = False,
) -> LocateResult:
    """Select up to ``k`` candidate neurons whose masking lowers AFGB with retention in bounds.

    Independent mode: labels = candidates, scores = change in AFGB (ascending: most bias-reducing
    first), ``extras["selected"]`` = the chosen top ``k``. Greedy mode: labels = the chosen
    neurons in order, scores = each step's AFGB reduction, ``extras["afgb"]`` the cumulative AFGB.
    ``progress=True`` shows a bar over candidate chunks (independent) or greedy steps (up to ``k``).
    """
    if mode not in ("independent", "greedy"):
        raise ValueError(f"mode must be 'independent' or 'greedy', got {mode!r}")
    if k < 1 or max_ppl_increase < 0:
        raise ValueError("k must be >= 1 and max_ppl_increase >= 0")
    prompts = check_prompts(prompts)
    if not candidates:
        raise ValueError("no candidate neurons given; pass labels like L3N17 (e.g. the top of neuron_attribution)")
    cands = _parse(candidates, lm)
    ts = targets if isinstance(targets, TargetSet) else resolve_targets(lm.tokenizer, targets)
    if len(ts) != 2 or not ts.single_token:
        raise ValueError("causal selection needs exactly two single-token targets (e.g. he,she)")
    a0, p0 = evaluate_sets(lm, [[]], prompts, ts, texts, max_rows=max_rows)
    base = {"afgb_base": float(a0[0]), "ppl_base": float(p0[0]), "max_ppl_increase": max_ppl_increase, "k": k}
    limit = float(p0[0]) * (1 + max_ppl_increase)
    if mode == "independent":
        a, p = evaluate_sets(lm, [[c] for c in cands], prompts, ts, texts, max_rows=max_rows, progress=progress)
        delta = a - a0[0]
        ok = [i for i in torch.argsort(delta, stable=True).tolist() if delta[i] < 0 and p[i] <= limit]
        sel = [candidates[i] for i in ok[:k]]
        return LocateResult(
            "causal", list(candidates), delta, variant=f"independent,afgb,ppl<=+{max_ppl_increase:g}", ascending=True,
            model=lm.name, n_samples=len(prompts),
            extras={**base, "selected": sel, "ppl": p, "afgb": a, "ppl_delta": p - p0[0]},
        )
    chosen: list[int] = []
    cur, scores, ppls, afgbs = float(a0[0]), [], [], []
    steps = bar(total=k, desc="greedy causal selection", enabled=progress, unit="neuron")
    while len(chosen) < k:
        rest = [i for i in range(len(cands)) if i not in chosen]
        if not rest:
            break
        a, p = evaluate_sets(lm, [[cands[j] for j in chosen] + [cands[i]] for i in rest], prompts, ts, texts, max_rows=max_rows)
        best = [j for j in torch.argsort(a, stable=True).tolist() if p[j] <= limit]
        if not best or float(a[best[0]]) >= cur:
            break
        chosen.append(rest[best[0]])
        scores.append(cur - float(a[best[0]]))
        cur = float(a[best[0]])
        afgbs.append(cur)
        ppls.append(float(p[best[0]]))
        log.info("greedy step %d: %s AFGB=%.5f ppl=%.3f", len(chosen), candidates[chosen[-1]], cur, ppls[-1])
        steps.update(1)
    steps.close()
    labels = [candidates[i] for i in chosen]
    return LocateResult(
        "causal", labels, torch.tensor(scores, dtype=torch.float64), variant=f"greedy,afgb,ppl<=+{max_ppl_increase:g}",
        model=lm.name, n_samples=len(prompts),
        extras={**base, "selected": labels, "afgb": afgbs, "ppl": ppls},
    )
