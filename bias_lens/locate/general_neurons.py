"""General-neuron ``<start>`` filtering, a position-0 detector, and the masking-effect demo.

The interpretable-neuron-editing paper finds "general neurons" that fire at the ``<start>``
position and support all abilities (editing two of them collapses arithmetic and reading
comprehension). The paper's models start every prompt with a start token; SmolLM2's tokenizer adds
none, so without help "position 0" would be the first word. :func:`position_stats` therefore
scores prompts with the model's start token prepended (``start_token=True``, default: the BOS token,
else EOS as GPT-2 uses ``<|endoftext|>``; nothing is prepended when the tokenizer already adds
it), and position 0 is that token. ``start_token=False`` keeps the raw prompts (position 0 = first
token; the earlier behaviour). ``PositionStats.start_token`` records which: ``"bos-prepended"``,
``"eos-prepended"``, ``"bos-added-by-tokenizer"`` or ``"first-token"``.

* :func:`position_stats` — one batched pass over all positions (activations are reduced inside
  the hook per batch, never kept): for every neuron of every layer, the fraction of prompts whose
  argmax position of the neuron's contribution is 0, and the fraction where its activation at
  position 0 is *outsized*.
  Contribution (``by``): ``"activation"`` (default) = ``|m_k[pos]| * |v_k|`` (argmax over
  positions = argmax of ``|m_k|``); ``"attribution"`` = ``|m_k[pos] (w . v_k)| / s_final[pos]``,
  the cached-norm logit-difference attribution at that position.
  Outsized: ``|m_k[0]| > mean + z * std`` of ``|m_k|`` over the prompt's other real positions
  (needs >= 2 of them; shorter prompts are not eligible), default z = 3.
* :func:`filter_general` — drops neurons whose argmax is position 0 in at least ``min_frac``
  (default 0.5, i.e. majority) of prompts from an attribution result.
* :func:`detect_general` — neurons outsized at position 0 in >= ``min_frac`` (default 0.9) of
  eligible prompts.
* :func:`masking_effect` — retention after masking the top-n general neurons vs the top-n filtered
  bias neurons (see :func:`bias_lens.locate.causal.retention`).

The paper's general-neuron experiment (masking two ``<start>`` neurons drops arithmetic 51.9% ->
7.5%; its Table 3 lists the coefficient changes of the deeper neurons they feed):

* :func:`rank_general` — detected general neurons re-scored by their write at the start position
  (``mean |m_k[0]| * ||v_k||``; the outsized fraction ties at 1.0 for hundreds of neurons);
* :func:`capability_accuracy` / :func:`capability_masking` — the capability suites' arithmetic and
  MMLU prompts, with the start token prepended when the neurons were found with it, scored before
  and after masking the top n (:class:`CapabilityMasking`);
* :func:`coefficient_changes` — the deeper FFN neurons' coefficient changes at the start and the
  last position (:class:`CoefficientShift` of :class:`CoefficientChange` rows), via
  :func:`position_coefficients`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..arch import neurons_to_dict, parse_neuron_name
from ..hooks import Hook, HookInfo, mask_neurons
from ..scoring import check_prompts, iter_batches
from ..targets import TargetSet
from .attribution import base_model, check_pair, logit_diff_dir, norm_parts, value_vectors
from .result import LocateResult
from .value_neurons import attn_pieces, is_attn_neuron, kv_head, parse_attn_neuron

if TYPE_CHECKING:
    from collections.abc import Callable

    from ..lens import LensModel


@dataclass
class PositionStats:
    """Per-neuron position statistics over prompts."""

    argmax0_frac: Float[Tensor, "layer d_mlp"]
    outsized_frac: Float[Tensor, "layer d_mlp"]
    n_prompts: int
    n_eligible: int
    by: str
    z: float
    start_token: str
    attn_argmax0_frac: Float[Tensor, "layer head d_head"] | None = None


def with_start_token(lm: LensModel, prompts: Sequence[str], start_token: bool = True) -> tuple[list[str], str]:
    """``prompts`` with the model's start token prepended (see the module docstring) and its kind."""
    prompts = check_prompts(prompts)
    if not start_token:
        return prompts, "first-token"
    tok = lm.tokenizer
    sid, kind = (tok.bos_token_id, "bos") if tok.bos_token_id is not None else (tok.eos_token_id, "eos")
    if sid is None:
        raise ValueError("the tokenizer has neither a BOS nor an EOS token to use as <start>; pass start_token=False")
    first = [ids[0] for ids in tok(prompts, add_special_tokens=True)["input_ids"]]
    if all(f == sid for f in first):
        return prompts, "bos-added-by-tokenizer"
    text = tok.convert_ids_to_tokens(sid)
    out = [text + p for p in prompts]
    got = [ids[0] for ids in tok(out)["input_ids"]]
    if any(g != sid for g in got):
        raise ValueError(f"prepending {text!r} does not tokenize to the start id {sid}; pass start_token=False")
    return out, f"{kind}-prepended"


@torch.no_grad()
def position_stats(
    lm: LensModel, prompts: Sequence[str], *, by: str = "activation", z: float = 3.0, targets: TargetSet | str = "he,she",
    batch_size: int = 16, start_token: bool = True, attention: bool = False,
) -> PositionStats:
    """Argmax-at-0 and outsized-at-0 fractions for every neuron (see module docstring)."""
    if by not in ("activation", "attribution"):
        raise ValueError(f"by must be 'activation' or 'attribution', got {by!r}")
    prompts, start_kind = with_start_token(lm, prompts, start_token)
    L = lm.n_layers
    arg0 = torch.zeros(L, lm.d_mlp, dtype=torch.float64)
    outs = torch.zeros(L, lm.d_mlp, dtype=torch.float64)
    n_elig = 0
    fn = norm_parts(lm.final_norm, lm.arch.norm)
    r = fn.read_dir(logit_diff_dir(lm, check_pair(lm, targets))) if by == "attribution" else None
    for b in iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device):
        acts: dict[int, Tensor] = {}

        def keep(t: Tensor, *, hook: HookInfo) -> None:
            """keep |activations| for this batch"""
            acts[hook.layer] = t.detach().abs().double().cpu()

        def keep_final(t: Tensor, *, hook: HookInfo) -> None:
            """keep final residual scale"""
            acts[-1] = fn.scale(t.detach().double().cpu())

        hooks = [(f"L{l}.mlp.post", keep) for l in range(L)] + [(f"L{L - 1}.resid_post", keep_final)]
        with lm.hooks(hooks):
            base_model(lm)(**b.model_inputs())
        real = b.attention_mask.bool().cpu()  # [batch, pos]
        n_real = real.sum(1)
        elig = n_real >= 3
        n_elig += int(elig.sum())
        for l in range(L):
            a = acts[l]  # [batch, pos, d_mlp]
            c = a * (r @ value_vectors(lm, l)).abs() / acts[-1] if r is not None else a
            c = c.masked_fill(~real[:, :, None], -1.0)
            arg0[l] += (c.argmax(1) == 0).double().sum(0)
            other = a[:, 1:].masked_fill(~real[:, 1:, None], float("nan"))
            mu, sd = other.nanmean(1), _nanstd(other)
            out = (a[:, 0] > mu + z * sd) & elig[:, None]
            outs[l] += out.double().sum(0)
    attn0 = _attn_argmax0(lm, prompts, batch_size) if attention else None
    return PositionStats(arg0 / len(prompts), outs / max(n_elig, 1), len(prompts), n_elig, by, z, start_kind, attn0)


def _attn_argmax0(lm, prompts: list[str], batch_size: int) -> Float[Tensor, "layer head d_head"]:
    """Fraction of prompts whose largest attention value-neuron piece comes from position 0."""
    L, H, dh = lm.n_layers, lm.n_heads, lm.d_head
    kv = torch.tensor([kv_head(lm, h) for h in range(H)])
    count = torch.zeros(L, H, dh, dtype=torch.float64)
    for pb in attn_pieces(lm, prompts, range(L), batch_size=batch_size):
        for l in range(L):
            v = pb.values[l].view(*pb.values[l].shape[:2], -1, dh)[:, :, kv]  # [batch, pos, head, d_head]
            piece = pb.probs[l].transpose(1, 2)[..., None] * v  # = PieceBatch.pieces, all units at once
            count[l] += (piece.abs().argmax(1) == 0).double().sum(0)
    return count / len(prompts)


def _nanstd(x: Tensor) -> Tensor:
    """Population std over axis 1 ignoring NaN."""
    mu = x.nanmean(1, keepdim=True)
    return (x - mu).pow(2).nanmean(1).sqrt()


def _frac_of(stats: PositionStats, label: str) -> float:
    if is_attn_neuron(label):
        if stats.attn_argmax0_frac is None:
            raise ValueError(f"{label} is an attention value neuron: compute the stats with position_stats(..., attention=True)")
        l, h, d = parse_attn_neuron(label)
        return float(stats.attn_argmax0_frac[l, h, d])
    l, k = parse_neuron_name(label)
    return float(stats.argmax0_frac[l, k])


ALIGNED_LIST_EXTRAS = ("kind",)  # list extras that line up with the labels (paper_candidates)


def _take(v, idx: Tensor, key: str, n: int):
    if isinstance(v, Tensor) and v.shape[:1] == (n,):
        return v[idx]
    if key in ALIGNED_LIST_EXTRAS and isinstance(v, list) and len(v) == n:
        return [v[int(i)] for i in idx]
    return v


def filter_general(result: LocateResult, stats: PositionStats, *, min_frac: float = 0.5) -> LocateResult:
    """``result`` without neurons whose argmax position is 0 (the start token) in >= ``min_frac`` of prompts."""
    keep, general = [], []
    for i, lab in enumerate(result.labels):
        (general if _frac_of(stats, lab) >= min_frac else keep).append(i)
    idx = torch.as_tensor(keep, dtype=torch.long)
    extras = {k: _take(v, idx, k, len(result.labels)) for k, v in result.extras.items()}
    general_sorted = [result.labels[i] for i in result.order() if i in set(general)]
    extras.update({"general_excluded": general_sorted, "n_removed": len(general), "n_before": len(result.labels),
                   "min_frac": min_frac, "start_token": stats.start_token, "by": stats.by})
    return LocateResult(
        result.method, [result.labels[i] for i in keep], result.scores[idx], variant=f"{result.variant},general-filtered",
        per_prompt=result.per_prompt[:, idx] if result.per_prompt is not None else None, extras=extras,
        ascending=result.ascending, model=result.model, n_samples=result.n_samples,
    )


def detect_general(stats: PositionStats, *, min_frac: float = 0.9, model: str = "") -> LocateResult:
    """Neurons outsized at position 0 in >= ``min_frac`` of eligible prompts, most frequent first."""
    L, D = stats.outsized_frac.shape
    flat = stats.outsized_frac.reshape(-1)
    sel = torch.nonzero(flat >= min_frac).flatten()
    labels = [f"L{int(i) // D}N{int(i) % D}" for i in sel]
    return LocateResult(
        "general-neurons", labels, flat[sel], variant=f"outsized>mean+{stats.z}sd,min_frac={min_frac}",
        model=model, n_samples=stats.n_prompts,
        extras={"n_eligible": stats.n_eligible, "start_token": stats.start_token,
                "argmax0_frac": [float(stats.argmax0_frac.reshape(-1)[i]) for i in sel]},
    )


def masking_effect(
    lm: LensModel, general: Sequence[str], bias: Sequence[str], *, n: int = 2,
    retention_fn: Callable[[LensModel], tuple[float, str]] | None = None,
) -> dict[str, float | str | list[str]]:
    """Retention with nothing masked, with the top-n general neurons masked, and with the top-n
    (general-filtered) bias neurons masked. ``retention_fn(lm) -> (value, name)``; default
    :func:`bias_lens.locate.causal.retention`."""
    from .causal import retention

    retention_fn = retention_fn or retention
    base, name = retention_fn(lm)
    out: dict[str, float | str | list[str]] = {"metric": name, "base": base, "n": n}
    for key, labels in (("general", list(general)[:n]), ("bias", list(bias)[:n])):
        with lm.hooks(mask_neurons(neurons_to_dict(labels))):
            out[key] = retention_fn(lm)[0]
        out[f"{key}_neurons"] = labels
    return out


# --------------------------------------------------------------------------- the general-neuron experiment
@dataclass(frozen=True)
class CapabilityMasking:
    """Capability scores with nothing masked (``before``) and with ``neurons`` masked (``after``).

    Keys: ``arithmetic`` (greedy exact-match accuracy), ``arithmetic_answer_logprob`` (mean summed
    log p(answer | prompt)), ``mmlu`` (0-shot letter-argmax accuracy); ``n_items`` per suite.
    """

    neurons: list[str]
    start_token: str
    before: dict[str, float]
    after: dict[str, float]
    n_items: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy of every field."""
        return {"neurons": list(self.neurons), "start_token": self.start_token, "before": dict(self.before),
                "after": dict(self.after), "n_items": dict(self.n_items)}


def _resolve_start(general: LocateResult | Sequence[str], start_token: bool | None) -> bool:
    """``start_token`` if given, else whether ``general`` (a result) was found with a start token."""
    if start_token is not None:
        return bool(start_token)
    kind = general.extras.get("start_token") if isinstance(general, LocateResult) else None
    if kind is None:
        raise ValueError("cannot tell whether these neurons were found with the start token prepended; "
                         "pass start_token=True or False (or a detect_general result, which records it)")
    return kind != "first-token"


def _check_limit(name: str, v: int | None) -> None:
    if v is not None and v < 1:
        raise ValueError(f"{name} must be >= 1 (or None for all items), got {v}")


def capability_accuracy(
    lm: LensModel, *, start_token: bool, arithmetic_split: str = "test", arithmetic_limit: int | None = 150,
    mmlu_split: str = "val", mmlu_limit_per_subject: int | None = 1, mmlu_limit: int | None = None,
    batch_size: int = 16,
) -> tuple[dict[str, float], dict[str, int]]:
    """Arithmetic and MMLU scores of ``lm`` as it is (hooks installed by the caller apply).

    The prompts are the capability suites' own (:mod:`bias_lens.benchmarks.capability`: arithmetic
    ``"a op b="`` scored by greedy exact match of the answer's tokens, MMLU 0-shot Hendrycks
    prompts scored by the argmax over the letters " A".." D"), with the same row order and limits.
    The suites themselves score the raw prompts with the tokenizer's defaults (no BOS on SmolLM2);
    ``start_token=True`` prepends the model's start token first (:func:`with_start_token`), so
    position 0 is ``<start>`` as in the paper's models. With ``start_token=False`` the numbers are
    ``evaluate(lm, "arithmetic" | "mmlu", ...)``'s.
    """
    from ..benchmarks import capability_data as cd
    from ..benchmarks.capability import arithmetic_eval, capability_splits, mmlu_eval

    for suite, split in (("arithmetic", arithmetic_split), ("mmlu", mmlu_split)):
        if split not in capability_splits(suite):
            raise ValueError(f"{suite} has no split {split!r}; choose one of {', '.join(capability_splits(suite))}")
    for name, v in (("arithmetic_limit", arithmetic_limit), ("mmlu_limit_per_subject", mmlu_limit_per_subject),
                    ("mmlu_limit", mmlu_limit)):
        _check_limit(name, v)

    def prompt_fn(prompts: list[str]) -> list[str]:
        """the suites' prompts, with the start token prepended when asked"""
        return with_start_token(lm, prompts, start_token)[0]

    ar, arows = arithmetic_eval(lm, arithmetic_split, limit=arithmetic_limit, batch_size=batch_size, prompt_fn=prompt_fn)
    mm, mrows, _ = mmlu_eval(lm, mmlu_split, limit_per_subject=mmlu_limit_per_subject, limit=mmlu_limit,
                             batch_size=batch_size, prompt_fn=prompt_fn)
    gold = [r["letter_logprobs"][cd.LETTERS.index(r["answer"])] for r in mrows]
    out = {"arithmetic": ar["accuracy"], "arithmetic_answer_logprob": ar["answer_logprob"], "mmlu": mm["accuracy"],
           "mmlu_answer_logprob": sum(gold) / len(gold)}
    return out, {"arithmetic": len(arows), "mmlu": len(mrows)}


def capability_masking(
    lm: LensModel, general: LocateResult | Sequence[str], *, n: int = 2, start_token: bool | None = None,
    before: tuple[dict[str, float], dict[str, int]] | None = None, **limits: Any,
) -> CapabilityMasking:
    """Arithmetic and MMLU accuracy before and after masking the top ``n`` of ``general`` (the paper's
    general-neuron experiment: masking two ``<start>`` neurons drops arithmetic 51.9% -> 7.5%).

    ``general`` is a result (its top ``n`` by score) or labels (the first ``n``). The capability
    prompts get the start token prepended when the neurons were found with it (``start_token=None``
    reads ``general.extras["start_token"]``, as :func:`detect_general` records it; a plain label
    list needs an explicit bool): general neurons live at the start position, so on prompts
    without that position (SmolLM2's tokenizer adds none) the masked neurons fire on the first
    word instead and the experiment would measure something else. ``limits`` are
    :func:`capability_accuracy`'s keywords (splits, item limits, ``batch_size``); ``before`` is
    its unmasked output for the same ``start_token`` and limits, to skip that pass (controls).
    """
    start = _resolve_start(general, start_token)
    labels = general.top_labels(n) if isinstance(general, LocateResult) else list(general)[:n]
    if n < 1 or len(labels) < n:
        raise ValueError(f"need n >= 1 neurons to mask and at least n of them, got n={n} and {len(labels)}")
    kind = with_start_token(lm, ["x"], start)[1]
    base, n_items = before if before is not None else capability_accuracy(lm, start_token=start, **limits)
    with lm.hooks(mask_neurons(neurons_to_dict(labels))):
        after, _ = capability_accuracy(lm, start_token=start, **limits)
    return CapabilityMasking(labels, kind, dict(base), after, dict(n_items))


@dataclass(frozen=True)
class CoefficientChange:
    """One deeper FFN neuron's mean coefficient (activation ``m_k``) at one position, before and
    after the general neurons are masked."""

    label: str
    position: str
    before: float
    after: float

    @property
    def change(self) -> float:
        """``after - before``."""
        return self.after - self.before


@dataclass(frozen=True)
class CoefficientShift:
    """The paper's Table 3: the deeper neurons whose coefficients move most when ``masked`` are
    masked, at the start position and at the last position (``top_k`` each, largest |change| first)."""

    masked: list[str]
    start_token: str
    n_prompts: int
    layers: list[int]
    start: list[CoefficientChange]
    last: list[CoefficientChange]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (each change as ``label, position, before, after, change``)."""
        rows = lambda cs: [{**vars(c), "change": c.change} for c in cs]  # noqa: E731
        return {"masked": list(self.masked), "start_token": self.start_token, "n_prompts": self.n_prompts,
                "layers": list(self.layers), "start": rows(self.start), "last": rows(self.last)}


@torch.no_grad()
def position_coefficients(
    lm: LensModel, prompts: Sequence[str], layers: Sequence[int], *, hooks: Sequence[Hook] = (), absolute: bool = False,
    batch_size: int = 16,
) -> Float[Tensor, "2 layer d_mlp"]:
    """Mean over ``prompts`` of the FFN coefficients ``m_k`` (``L{l}.mlp.post``; ``|m_k|`` if
    ``absolute``) of ``layers`` at position 0 (row 0) and at each prompt's last real token (row 1),
    with ``hooks`` installed. The prompts are taken as given (prepend the start token first)."""
    prompts = check_prompts(prompts)
    layers = list(layers)
    total = torch.zeros(2, len(layers), lm.d_mlp, dtype=torch.float64)
    for b in iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device):
        rows = torch.arange(b.input_ids.shape[0], device=lm.device)

        def keep(t: Tensor, *, hook: HookInfo) -> None:
            """sum the first- and last-position coefficients of this batch"""
            v = torch.stack([t[:, 0], t[rows, b.last.to(t.device)]]).double()
            total[:, layers.index(hook.layer)] += (v.abs() if absolute else v).sum(1).cpu()

        with lm.hooks(list(hooks) + [(f"L{l}.mlp.post", keep) for l in layers]):
            base_model(lm)(**b.model_inputs())
    return total / len(prompts)


def coefficient_changes(
    lm: LensModel, prompts: Sequence[str], masked: Sequence[str], *, top_k: int = 10, start_token: bool = True,
    batch_size: int = 16,
) -> CoefficientShift:
    """The deeper FFN neurons' coefficient changes when ``masked`` (FFN neuron labels) are masked.

    Deeper = every layer above the shallowest masked neuron's (the masked neurons themselves left
    out). For each neuron the mean over ``prompts`` of ``m_k`` at the start position and at the
    last position is read in two forwards (unmasked, masked; ``start_token`` prepends the start
    token as :func:`with_start_token`), and the ``top_k`` largest ``|after - before|`` per position
    are returned. With the start token, position 0 sees only itself, so its row is one value per
    neuron, not an average over different contexts.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    masked = list(masked)
    if not masked:
        raise ValueError("no neurons to mask; pass at least one FFN neuron label such as 'L3N7'")
    to_mask = neurons_to_dict(masked)
    layers = list(range(min(to_mask) + 1, lm.n_layers))
    if not layers:
        raise ValueError(f"the masked neurons are in the last layer ({min(to_mask)}): no deeper neurons to read")
    prompts, kind = with_start_token(lm, prompts, start_token)
    before = position_coefficients(lm, prompts, layers, batch_size=batch_size)
    after = position_coefficients(lm, prompts, layers, hooks=mask_neurons(to_mask), batch_size=batch_size)
    skip = {(layers.index(l), k) for l, ks in to_mask.items() if l in layers for k in ks}
    out = []
    for p, pos in enumerate(("start", "last")):
        delta = (after[p] - before[p]).abs()
        for li, k in skip:
            delta[li, k] = -1.0
        idx = delta.reshape(-1).topk(min(top_k, delta.numel() - len(skip))).indices
        out.append([CoefficientChange(f"L{layers[int(i) // lm.d_mlp]}N{int(i) % lm.d_mlp}", pos,
                                      float(before[p].reshape(-1)[i]), float(after[p].reshape(-1)[i])) for i in idx])
    return CoefficientShift(masked, kind, len(prompts), layers, out[0], out[1])


def rank_general(
    lm: LensModel, general: LocateResult, prompts: Sequence[str], *, start_token: bool | None = None,
    batch_size: int = 16,
) -> LocateResult:
    """``general`` re-scored by the size of each neuron's write at the start position, mean over
    ``prompts`` of ``|m_k[0]| * ||v_k||`` (``v_k`` = its down-projection column), largest first.

    :func:`detect_general`'s score (the outsized fraction) ties at 1.0 for hundreds of neurons on
    SmolLM2, so "the top two" needs a second criterion; the paper's general neurons are the ones
    that write most at ``<start>``. ``start_token=None`` follows ``general.extras["start_token"]``.
    """
    start = _resolve_start(general, start_token)
    prompts, _ = with_start_token(lm, prompts, start)
    parsed = [parse_neuron_name(lab) for lab in general.labels]
    layers = sorted({l for l, _ in parsed})
    m0 = position_coefficients(lm, prompts, layers, absolute=True, batch_size=batch_size)[0]
    norms = {l: value_vectors(lm, l).norm(dim=0) for l in layers}
    scores = torch.tensor([float(m0[layers.index(l), k] * norms[l][k]) for l, k in parsed], dtype=torch.float64)
    extras = {**general.extras, "outsized_frac": general.scores.tolist(), "rank_by": "mean |m_k[start]| * ||v_k||"}
    return LocateResult(general.method, list(general.labels), scores, variant=f"{general.variant},start-write",
                        extras=extras, model=general.model, n_samples=general.n_samples)
