"""The interpretable-neuron-editing paper's selection pipeline: 150 candidates -> ``<start>`` filter -> causal 50.

arXiv 2501.14457 edits bias neurons in three stages, run here on the project's own pieces:

1. **candidates** (:func:`bias_lens.locate.query_neurons.paper_candidates`, on the *locate*
   prompts): the top ``k_candidates`` FFN value neurons, attention value neurons and FFN query
   neurons (50 + 50 + 50 in the paper). A neuron found both as an FFN value and an FFN query
   neuron is one unit, so it is kept once, under its first kind (``n_duplicates`` counts them);
2. **``<start>`` filter** (:func:`bias_lens.locate.general_neurons.filter_general` on
   :func:`~bias_lens.locate.general_neurons.position_stats` with the start token prepended and
   attention value neurons included): drop neurons whose important position is the start token in
   at least ``min_frac`` of the locate prompts ("general neurons");
3. **causal selection** (:func:`bias_lens.locate.causal.causal_selection`, on the *dev* prompts):
   mask each remaining candidate, keep the ``k`` (50) that cut AFGB most without raising the
   retention perplexity by more than ``max_ppl_increase``.

The selected neurons' vocabulary projection (the paper's Table 2,
:func:`bias_lens.locate.projection.neuron_vocab_projection`, top / bottom 10 tokens) is kept as the
causal result's ``extras["projection"]``.

:func:`paper_selection` returns a :class:`NeuronSelection` with every stage's labels and counts;
the masking edit of the selected neurons is :func:`bias_lens.edit.neuron_masking.neuron_editing`
(locate never imports edit). :func:`matched_random` draws the control set: the same number of
random neurons of the same kinds in the same layers.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..labels import is_value_neuron
from ..targets import TargetSet
from .attribution import check_pair
from .causal import causal_selection, parse_units
from .result import LocateResult

if TYPE_CHECKING:
    from ..lens import LensModel
    from .general_neurons import PositionStats

KINDS = ("ffn-value", "attn-value", "ffn-query")


@dataclass(frozen=True)
class NeuronSelection:
    """Every stage of :func:`paper_selection`: labels (with their candidate kind) and counts."""

    candidates: list[str]  # deduplicated candidates, in paper_candidates' order
    kinds: list[str]  # kind of each candidate (see KINDS)
    n_duplicates: int  # labels listed under two kinds, kept once
    general: list[str]  # removed by the <start> filter
    filtered: list[str]  # what causal selection was given
    selected: list[str]  # causal selection's choice (at most k)
    causal: LocateResult
    start_token: str
    min_frac: float

    def kind_of(self, label: str) -> str:
        """The candidate kind of ``label``."""
        return self.kinds[self.candidates.index(label)]

    def counts(self) -> dict[str, Any]:
        """Sizes of every stage, overall and per kind."""
        by_kind = lambda labs: {k: Counter(map(self.kind_of, labs)).get(k, 0) for k in KINDS}  # noqa: E731
        stages = {"candidates": self.candidates, "removed": self.general, "filtered": self.filtered,
                  "selected": self.selected}
        return {"raw": len(self.candidates) + self.n_duplicates, "duplicates": self.n_duplicates,
                **{s: len(v) for s, v in stages.items()}, "by_kind": {s: by_kind(v) for s, v in stages.items()}}

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy: every stage's labels, the counts and causal selection's per-candidate numbers."""
        c = self.causal
        per = {lab: {"afgb_delta": float(c.scores[i]), "ppl": float(c.extras["ppl"][i])}
               for i, lab in enumerate(c.labels)} if c.variant.startswith("independent") else {}
        return {"candidates": list(self.candidates), "kinds": list(self.kinds), "general": list(self.general),
                "filtered": list(self.filtered), "selected": list(self.selected), "counts": self.counts(),
                "start_token": self.start_token, "min_frac": self.min_frac, "causal_variant": c.variant,
                "afgb_base": c.extras["afgb_base"], "ppl_base": c.extras["ppl_base"], "retention": c.extras["retention"],
                "per_candidate": per, "projection": c.extras.get("projection", {}), **self._joint(c)}

    @staticmethod
    def _joint(c: LocateResult) -> dict[str, Any]:
        """Joint causal selection's path and readings (:mod:`.causal_joint`), when it ran."""
        if not c.variant.startswith("joint"):
            return {}
        keys = ("afgb_renorm_base", "mass_base", "min_mass_ratio", "value", "predicted", "joint", "single", "ub_base",
                "ub_tolerance", "n_hint")
        return {"joint_path": list(c.labels), **{f"joint_{k}" if k in ("predicted", "single") else k: c.extras[k]
                                                  for k in keys if k in c.extras}}


def dedupe_candidates(cand: LocateResult) -> tuple[LocateResult, int]:
    """``cand`` (a :func:`paper_candidates` result) with each label kept once, at its first kind; and how
    many repeats were dropped."""
    seen: dict[str, int] = {}
    for i, lab in enumerate(cand.labels):
        seen.setdefault(lab, i)
    idx = sorted(seen.values())
    kinds = cand.extras["kind"]
    out = LocateResult(cand.method, [cand.labels[i] for i in idx], cand.scores[torch.as_tensor(idx, dtype=torch.long)],
                       variant=f"{cand.variant},deduplicated", model=cand.model, n_samples=cand.n_samples,
                       extras={**cand.extras, "kind": [kinds[i] for i in idx]})
    return out, len(cand.labels) - len(idx)


def paper_selection(
    lm: LensModel, locate_prompts: Sequence[str], dev_prompts: Sequence[str], targets: TargetSet | str = "he,she", *,
    k_candidates: int = 50, k: int = 50, min_frac: float = 0.5, max_ppl_increase: float = 0.05,
    mode: str = "independent", min_mass_ratio: float = 0.9, value: float = 0.0, hint: Sequence[dict] | None = None,
    texts: Sequence[str] | None = None, candidates: LocateResult | None = None,
    stats: PositionStats | None = None, batch_size: int = 16, max_rows: int = 256, progress: bool = False,
) -> NeuronSelection:
    """The paper's 3k candidates (on ``locate_prompts``) -> ``<start>`` filter -> causal top ``k`` on ``dev_prompts``.

    ``candidates`` / ``stats``: a precomputed :func:`paper_candidates` result and
    :func:`position_stats` (``attention=True``) of the locate prompts, to skip those passes.
    ``max_ppl_increase``, ``mode``, ``min_mass_ratio``, ``value``, ``hint``, ``texts``, ``max_rows``:
    :func:`causal_selection`'s (``mode="joint"``: the set that equalises, :mod:`.causal_joint`).
    """
    from .general_neurons import filter_general, position_stats
    from .query_neurons import paper_candidates

    ts = check_pair(lm, targets)
    if candidates is None:
        candidates = paper_candidates(lm, locate_prompts, ts, k=k_candidates, batch_size=batch_size)
    if "kind" not in candidates.extras:
        raise ValueError("candidates must be a paper_candidates result (its extras['kind'] names each label's kind)")
    if stats is None:
        stats = position_stats(lm, locate_prompts, targets=ts, batch_size=batch_size, attention=True)
    cand, n_dup = dedupe_candidates(candidates)
    filt = filter_general(cand, stats, min_frac=min_frac)
    if not filt.labels:
        raise ValueError(f"the <start> filter removed all {len(cand.labels)} candidates; raise min_frac (now {min_frac})")
    causal = causal_selection(lm, filt.labels, dev_prompts, ts, k=k, max_ppl_increase=max_ppl_increase, mode=mode,
                              texts=texts, max_rows=max_rows, progress=progress, min_mass_ratio=min_mass_ratio,
                              value=value, hint=hint)
    if causal.extras["selected"]:  # the paper's Table 2 for the selection, kept with the result
        from .projection import neuron_vocab_projection

        causal.extras["projection"] = neuron_vocab_projection(lm, causal.extras["selected"], k=10)
    general = [lab for lab in cand.labels if lab not in set(filt.labels)]
    return NeuronSelection(list(cand.labels), list(cand.extras["kind"]), n_dup, general, list(filt.labels),
                           list(causal.extras["selected"]), causal, stats.start_token, min_frac)


def matched_random(lm: LensModel, labels: Sequence[str], *, seed: int = 0, exclude: Sequence[str] = ()) -> list[str]:
    """For each label a random neuron of the same kind (FFN ``L{l}N{k}`` / attention value ``L{l}H{h}V{d}``)
    in the same layer, none of them in ``labels`` or ``exclude`` and no two equal (``random.Random(seed)``)."""
    units = parse_units(lm, labels)
    taken = set(labels) | set(exclude)
    rng = random.Random(seed)
    out = []
    for lab, u in zip(labels, units):
        value = is_value_neuron(lab)
        size = lm.n_heads * lm.d_head if value else lm.d_mlp
        if sum(1 for t in taken if t.startswith(f"L{u[0]}{'H' if value else 'N'}")) >= size:
            raise ValueError(f"layer {u[0]} has no unused {'attention value' if value else 'FFN'} neuron left to draw")
        while True:
            i = rng.randrange(size)
            cand = f"L{u[0]}H{i // lm.d_head}V{i % lm.d_head}" if value else f"L{u[0]}N{i}"
            if cand not in taken:
                break
        taken.add(cand)
        out.append(cand)
    return out
