"""Causal selection of bias neurons: mask each candidate, measure bias and retention.

For each candidate neuron (or, in greedy mode, each candidate added to the neurons already
chosen) the activation is zeroed at every position and we measure on dev prompts

* the bias metric, AFGB = mean over prompts of ``|p(t0) - p(t1)|`` (raw next-token
  probabilities of the two targets at the last real token, not renormalised): the scores come
  from :func:`bias_lens.scoring.batch_target_logprobs` and the metric is
  :func:`bias_lens.benchmarks.metrics.pairwise_gap_t`, the same code the benchmarks use;
* retention, the perplexity of the project's one retention corpus
  (:func:`bias_lens.benchmarks.external.retention_sentences`, fixed order; the first
  ``RETENTION_LIMIT`` = 8 sentences by default, :func:`retention_texts`), each conditioned on the
  tokenizer's BOS token (EOS when it has none) with every token scored, through
  :func:`bias_lens.scoring.batch_token_logprobs` -- the retention benchmark's
  definition on a cheap fixed prefix of its corpus.

Candidates may mix the two kinds of unit the interpretable-neuron-editing paper edits:

* FFN neurons ``L{l}N{k}`` (unit ``(l, k)``): masking scales channel k of ``L{l}.mlp.post``;
* attention value neurons ``L{l}H{h}V{d}`` (unit ``(l, h, d)``,
  :mod:`bias_lens.locate.value_neurons`): masking scales channel ``h * d_head + d`` of
  ``L{l}.attn.z`` (the o_proj input), i.e. only *query head h's* contribution through column
  ``h * d_head + d`` of W_O. Under grouped-query attention several query heads read the same KV
  head ``kv(h)``; zeroing the v_proj output dimension instead would silence all of them, which is
  not the unit the label (and its attribution score) names, so it is not what masking means here.
  :func:`unit_channel` is the one place this mapping lives (the weight edit of
  :mod:`bias_lens.edit.neuron_masking` writes the same W_O columns).

Batching: the dev batch is replicated R times and replica r masks its own unit set through a
per-row scale (:func:`mask_points`; :func:`mask_rows` is its FFN-only form), so R candidates share
one forward pass. Independent mode ranks
candidates by the change in AFGB (most negative first) and selects the top ``k`` whose relative
perplexity increase stays within ``max_ppl_increase``. Greedy mode grows the set one neuron at a
time, each step adding the candidate that lowers AFGB most among those keeping retention within
the threshold, until ``k`` neurons are chosen or no candidate lowers AFGB.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..hooks import Hook, HookInfo
from ..labels import NeuronLabel, ValueNeuronLabel, parse_as
from ..progress import bar
from ..scoring import batch_target_logprobs, batch_token_logprobs, check_prompts, iter_batches
from ..targets import TargetSet, resolve_targets
from .result import LocateResult
from .value_neurons import check_attn_labels

if TYPE_CHECKING:
    from ..lens import LensModel

log = logging.getLogger(__name__)

#: causal selection rules: the paper's (independent), greedy, and the joint set (:mod:`.causal_joint`)
MODES = ("independent", "greedy", "joint")
RETENTION_LIMIT = 8  # sentences of the retention corpus scored per candidate set


def retention_texts(limit: int = RETENTION_LIMIT) -> list[str]:
    """The first ``limit`` sentences of the retention corpus (:func:`bias_lens.benchmarks.external.retention_texts`)."""
    from ..benchmarks.external import retention_texts as texts

    return texts(limit)


#: A maskable unit: ``(layer, neuron)`` for an FFN neuron, ``(layer, head, dim)`` for an attention value neuron.
Unit = tuple[int, int] | tuple[int, int, int]


def unit_channel(lm: LensModel, unit: Unit) -> tuple[str, int, int]:
    """Hook point, channel and channel count that masking ``unit`` scales (see the module docstring)."""
    if len(unit) == 2:
        l, k = unit
        return f"L{l}.mlp.post", k, lm.d_mlp
    l, h, d = unit
    return f"L{l}.attn.z", h * lm.d_head + d, lm.n_heads * lm.d_head


def mask_points(scales: dict[str, Float[Tensor, "batch channel"]]) -> list[Hook]:
    """Per-row channel masking: multiply hook point ``p``'s row b by ``scales[p][b]`` at every position."""

    def mask(t: Tensor, *, hook: HookInfo) -> Tensor:
        """per-row channel mask"""
        return t * scales[hook.name].to(t)[:, None, :]

    return [(p, mask) for p in scales]


def mask_rows(scales: dict[int, Float[Tensor, "batch d_mlp"]]) -> list[Hook]:
    """Per-row neuron masking: multiply ``L{l}.mlp.post`` row b by ``scales[l][b]`` at every position."""
    return mask_points({f"L{l}.mlp.post": s for l, s in scales.items()})


def mask_units(lm: LensModel, units: Sequence[Unit], *, scale: float = 0.0) -> list[Hook]:
    """Hooks scaling every unit's channel by ``scale`` in every row (the temporary form of a masking edit)."""
    return mask_points(_scales(lm, [units], 1, scale))


def _scales(lm, sets: Sequence[Sequence[Unit]], rows: int, value: float = 0.0) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for r, s in enumerate(sets):
        for u in s:
            point, ch, width = unit_channel(lm, u)
            if point not in out:
                out[point] = torch.ones(len(sets) * rows, width)
            out[point][r * rows : (r + 1) * rows, ch] = value
    return out


def _sentence_batches(lm, texts: Sequence[str], batch_size: int):
    from ..benchmarks.sentence_scoring import sentence_ids

    return iter_batches(lm.tokenizer, [], batch_size, device=lm.device, token_ids=sentence_ids(lm.tokenizer, texts))


def _batch_probs(lm, chunk, b, targets: TargetSet, value: float = 0.0) -> Float[Tensor, "set batch target"]:
    """Target probabilities of batch ``b`` with each set of ``chunk`` scaled by ``value`` (one replica per set)."""
    n = b.input_ids.shape[0]
    with lm.hooks(mask_points(_scales(lm, chunk, n, value))):
        return batch_target_logprobs(lm, b.repeat(len(chunk)), targets).exp().cpu().view(len(chunk), n, -1)


def _chunk_probs(lm, chunk, prompts, targets: TargetSet, max_rows: int,
                 value: float = 0.0) -> Float[Tensor, "set prompt target"]:
    """Per-prompt target probabilities (float64, in ``prompts``' order) with each set of ``chunk`` scaled by ``value``."""
    out = torch.zeros(len(chunk), len(prompts), len(targets.first_ids), dtype=torch.float64)
    for b in iter_batches(lm.tokenizer, prompts, max_rows, device=lm.device):  # length-sorted: b.rows are the indices
        out[:, torch.as_tensor(b.rows)] = _batch_probs(lm, chunk, b, targets, value).double()
    return out


def _chunk_afgb(lm, chunk, prompts, targets: TargetSet, max_rows: int) -> Float[Tensor, " set"]:
    """Summed per-prompt target gap with each set of ``chunk`` masked (one replica per set)."""
    from ..benchmarks.metrics import pairwise_gap_t

    out = torch.zeros(len(chunk), dtype=torch.float64)
    for b in iter_batches(lm.tokenizer, prompts, max_rows, device=lm.device):
        p = _batch_probs(lm, chunk, b, targets)
        out += pairwise_gap_t(p.flatten(0, 1)).view(len(chunk), -1).sum(1)
    return out


def _chunk_nll(lm, chunk, texts, batch_size: int, value: float = 0.0) -> tuple[Float[Tensor, " set"], int]:
    """Summed retention NLL with each set of ``chunk`` scaled by ``value``, and the number of scored tokens."""
    R, out, toks = len(chunk), torch.zeros(len(chunk), dtype=torch.float64), 0
    for b in _sentence_batches(lm, texts, batch_size):
        n = b.input_ids.shape[0]
        with lm.hooks(mask_points(_scales(lm, chunk, n, value))):
            lp, _ = batch_token_logprobs(lm, b.repeat(R))
        out -= (lp * b.attention_mask[:, 1:].repeat(R, 1).to(lp)).sum(1).view(R, n).sum(1)
        toks += int(b.attention_mask[:, 1:].sum())
    return out, toks


@torch.no_grad()
def evaluate_sets(
    lm: LensModel, sets: Sequence[Sequence[Unit]], prompts: Sequence[str], targets: TargetSet,
    texts: Sequence[str] | None = None, *, max_rows: int = 256, progress: bool = False,
) -> tuple[Float[Tensor, " set"], Float[Tensor, " set"]]:
    """AFGB and retention perplexity with each unit set masked (R sets per forward pass; bar if ``progress``).

    A unit is ``(layer, neuron)`` (FFN) or ``(layer, head, dim)`` (attention value neuron), see :func:`unit_channel`."""
    texts = retention_texts() if texts is None else list(texts)
    afgb = torch.zeros(len(sets), dtype=torch.float64)
    nll = torch.zeros(len(sets), dtype=torch.float64)
    n_tok = 1
    per = max(1, max_rows // max(1, min(len(prompts), max_rows)))
    starts = range(0, len(sets), per)
    for c0 in bar(starts, total=len(starts), desc="causal masking", enabled=progress, unit="chunk"):
        chunk = sets[c0 : c0 + per]
        afgb[c0 : c0 + len(chunk)] = _chunk_afgb(lm, chunk, prompts, targets, max_rows)
        nll[c0 : c0 + len(chunk)], n_tok = _chunk_nll(lm, chunk, texts, max(1, max_rows // len(chunk)))
    return afgb / len(prompts), torch.exp(nll / n_tok)


@torch.no_grad()
def set_readings(
    lm: LensModel, sets: Sequence[Sequence[Unit]], prompts: Sequence[str], targets: TargetSet,
    texts: Sequence[str] | None = None, *, value: float = 0.0, max_rows: int = 256, progress: bool = False,
) -> tuple[Float[Tensor, "set prompt target"], Float[Tensor, " set"]]:
    """Per-prompt target probabilities (float64) and retention perplexity with each unit set scaled by
    ``value`` (0 = masked): :func:`evaluate_sets`' forwards, keeping every prompt's reading instead of
    the AFGB (what the joint selection of :mod:`bias_lens.locate.causal_joint` needs)."""
    texts = retention_texts() if texts is None else list(texts)
    probs, nll, n_tok = [], torch.zeros(len(sets), dtype=torch.float64), 1
    per = max(1, max_rows // max(1, min(len(prompts), max_rows)))
    starts = range(0, len(sets), per)
    for c0 in bar(starts, total=len(starts), desc="causal masking", enabled=progress, unit="chunk"):
        chunk = sets[c0 : c0 + per]
        probs.append(_chunk_probs(lm, chunk, prompts, targets, max_rows, value))
        nll[c0 : c0 + len(chunk)], n_tok = _chunk_nll(lm, chunk, texts, max(1, max_rows // len(chunk)), value)
    return torch.cat(probs), torch.exp(nll / n_tok)


def retention(lm: LensModel, texts: Sequence[str] | None = None, *, batch_size: int = 32) -> tuple[float, str]:
    """Perplexity of ``texts`` (default :func:`retention_texts`; BOS-prefixed, every token scored)
    under whatever hooks are active (lower is better)."""
    from ..benchmarks.metrics import perplexity
    from ..benchmarks.sentence_scoring import token_logprobs

    texts = retention_texts() if texts is None else list(texts)
    with torch.no_grad():
        return float(perplexity(token_logprobs(lm, texts, batch_size=batch_size))), "perplexity"


def parse_units(lm: LensModel, labels: Sequence[str]) -> list[Unit]:
    """Units of FFN neuron (``L{l}N{k}``) and attention value neuron (``L{l}H{h}V{d}``) labels;
    ValueError naming the first label that is neither or lies out of range."""
    out: list[Unit] = []
    for lab in labels:
        p = parse_as(lab, NeuronLabel, ValueNeuronLabel)
        if isinstance(p, ValueNeuronLabel):
            out.append(check_attn_labels(lm, [lab])[0])
            continue
        l, k = p.layer, p.index
        if not (0 <= l < lm.n_layers and 0 <= k < lm.d_mlp):
            raise ValueError(f"{lab}: out of range (layers 0..{lm.n_layers - 1}, neurons 0..{lm.d_mlp - 1})")
        out.append((l, k))
    return out


def causal_selection(
    lm: LensModel, candidates: Sequence[str], prompts: Sequence[str], targets: TargetSet | str = "he,she", *,
    k: int = 50, max_ppl_increase: float = 0.05, mode: str = "independent",
    texts: Sequence[str] | None = None, max_rows: int = 256, progress: bool = False,
    min_mass_ratio: float = 0.9, value: float = 0.0, hint: Sequence[dict] | None = None, ub_tolerance: float = 0.05,
) -> LocateResult:
    """Select up to ``k`` candidate neurons whose masking lowers AFGB with retention in bounds.

    Candidates are FFN neurons ``L{l}N{k}`` and/or attention value neurons ``L{l}H{h}V{d}`` (mixed
    freely; masking as in the module docstring).

    Independent mode: labels = candidates, scores = change in AFGB (ascending: most bias-reducing
    first), ``extras["selected"]`` = the chosen top ``k``. Greedy mode: labels = the chosen
    neurons in order, scores = each step's AFGB reduction, ``extras["afgb"]`` the cumulative AFGB.
    ``texts``: retention sentences (default :func:`retention_texts`; ``extras["retention"]`` says
    which). ``progress=True`` shows a bar over candidate chunks (independent) or greedy steps.

    Joint mode (:mod:`bias_lens.locate.causal_joint`): the set whose masking together lowers the
    renormalised gap most, keeping the pronoun mass >= ``min_mass_ratio`` x base, from the single
    masks' per-prompt readings; ``value`` in [0, 1) scales instead of masking; ``hint``
    (GenHintEval rows with ``prompt`` and ``F``) adds the UB guard (UB may fall at most
    ``ub_tolerance``). These three are joint mode's only.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if k < 1 or max_ppl_increase < 0:
        raise ValueError("k must be >= 1 and max_ppl_increase >= 0")
    if not 0 <= value < 1 or (value != 0 and mode != "joint"):
        raise ValueError(f"value (the scale of the selected units) must be in [0, 1) and is used by mode 'joint' only, got {value}")
    if hint is not None and mode != "joint":
        raise ValueError("hint (the UB guard) is used by mode 'joint' only")
    if not 0 <= min_mass_ratio <= 1:
        raise ValueError(f"min_mass_ratio must be in [0, 1], got {min_mass_ratio}")
    prompts = check_prompts(prompts)
    if not candidates:
        raise ValueError("no candidate neurons given; pass labels like L3N17 or L3H1V5 (e.g. paper_candidates)")
    cands = parse_units(lm, candidates)
    ts = targets if isinstance(targets, TargetSet) else resolve_targets(lm.tokenizer, targets)
    ts.require(n=2, single_token=True)
    source = f"retention_sentences[:{RETENTION_LIMIT}],bos" if texts is None else f"custom[{len(texts)}],bos"
    texts = retention_texts() if texts is None else check_prompts(texts)
    if mode == "joint":
        from .causal_joint import joint_selection

        res = joint_selection(lm, list(candidates), cands, prompts, ts, texts, k=k, max_ppl_increase=max_ppl_increase,
                              min_mass_ratio=min_mass_ratio, value=value, hint=hint, ub_tolerance=ub_tolerance,
                              max_rows=max_rows, progress=progress)
        res.extras["retention"] = source
        return res
    a0, p0 = evaluate_sets(lm, [[]], prompts, ts, texts, max_rows=max_rows)
    base = {"afgb_base": float(a0[0]), "ppl_base": float(p0[0]), "max_ppl_increase": max_ppl_increase, "k": k,
            "retention": source}
    limit = float(p0[0]) * (1 + max_ppl_increase)
    run = _independent if mode == "independent" else _greedy
    return run(lm, list(candidates), cands, prompts, ts, texts, base, limit, k=k, max_rows=max_rows, progress=progress)


def _independent(lm, candidates, cands, prompts, ts, texts, base, limit, *, k, max_rows, progress) -> LocateResult:
    """Each candidate masked alone; the top ``k`` AFGB reductions within the retention limit."""
    a, p = evaluate_sets(lm, [[c] for c in cands], prompts, ts, texts, max_rows=max_rows, progress=progress)
    delta = a - base["afgb_base"]
    ok = [i for i in torch.argsort(delta, stable=True).tolist() if delta[i] < 0 and p[i] <= limit]
    sel = [candidates[i] for i in ok[:k]]
    return LocateResult(
        "causal", candidates, delta, variant=f"independent,afgb,ppl<=+{base['max_ppl_increase']:g}", ascending=True,
        model=lm.name, n_samples=len(prompts),
        extras={**base, "selected": sel, "ppl": p, "afgb": a, "ppl_delta": p - base["ppl_base"]},
    )


def _greedy(lm, candidates, cands, prompts, ts, texts, base, limit, *, k, max_rows, progress) -> LocateResult:
    """Grow the masked set one neuron at a time (largest AFGB drop within the retention limit)."""
    chosen: list[int] = []
    cur, scores, ppls, afgbs = base["afgb_base"], [], [], []
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
        "causal", labels, torch.tensor(scores, dtype=torch.float64), variant=f"greedy,afgb,ppl<=+{base['max_ppl_increase']:g}",
        model=lm.name, n_samples=len(prompts),
        extras={**base, "selected": labels, "afgb": afgbs, "ppl": ppls},
    )
