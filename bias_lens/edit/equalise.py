"""Closed-form equalising edit of one located weight matrix (kernel ridge on linearised effects).

Why: the he/she gap of GenBiasEval on SmolLM2 is mostly *per profession* (the standard deviation of
a profession's mean log-odds ``d = log p(he) - log p(she)`` is 0.77, its global mean 0.2), so no
constant shift removes it (the best one cuts AFGB-r by 4%), and masked fine-tuning of ``mlp.down``
with an equal-share loss moves dev AFGB-r by only ~12% in 64 Adam steps (docs/equalise.md). The edit
has to read the profession's gender out of the module's input and cancel it, on professions it
never saw. That is a linear regression problem once the model is linearised at the located module.

For a linear module ``o = W k`` (``W`` ``[out, in]``) and each prompt ``j`` at its last position:
the input ``k_j``, and the gradients ``g_j = d d_j / d o`` and ``m_j = d log(p_he + p_she) / d o``.
To first order an update ``dW`` changes ``d_j`` by ``g_j^T dW k_j``. The edit solves

    min_dW  sum_j (u_j^T dW k_j - t_j)^2 + lambda tr(dW C dW^T)

over rows ``j`` of three kinds: neutral train prompts (``u = g``, ``t = -gamma d``: remove a share
``gamma`` of the gap), the same prompts' mass (``u = m``, ``t = 0``: keep ``p_he + p_she``, MSME's
"non-zero"), and hinted GenHintEval train prompts (``u = g``, ``t = 0``: keep the hint's pronoun,
i.e. UB). ``C`` is the second moment of the module's inputs on the retention sentences (so
directions the model uses on ordinary text are expensive, as ROME's covariance does). The minimiser
is ``dW = sum_j beta_j u_j (C^-1 k_j)^T`` with ``(A + lambda I) beta = t``,
``A_jl = (u_j . u_l)(k_l^T C^-1 k_j)``: an ``n x n`` solve, no ``[out, in]`` Jacobian.
``lambda = ridge x mean(diag A)`` (scale-free). For a mask of *some* entries ``e = (r, c)`` of ``W``
(row / neuron scale) the same problem is solved over those entries only, with the diagonal of ``C``
(``X_je = u_j[r] k_j[c]``, ``delta = D^-1 X^T (X D^-1 X^T + lambda I)^-1 t``). ``n_iter > 1``
re-linearises at the edited weights and solves for what is left (targets are always relative to
the unedited model). The model is unchanged on return; the result is an ordinary :class:`Edit`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..prefix_cache import PrefixCache, first_edited_layer, record, replay
from .edits import Edit, layouts
from .masks import ParamMask

if TYPE_CHECKING:
    from ..lens import LensModel
    from ..locate.result import LocateResult

log = logging.getLogger(__name__)


#: the ridge of each mask layout when none is given, chosen on dev (scripts/closed_form_sweep.py,
#: docs/equalise.md): the lowest dev AFGB-r within half of each guard's margin (perplexity <= +2.5%,
#: mass >= 0.95 x, UB >= -0.025), training on the whole GenBiasEval train split
DEFAULT_RIDGE = {"dense": 0.01, "entries": 0.3}


@dataclass(frozen=True)
class EqualiseConfig:
    """Options of :func:`equalise_edit` (defaults: the dev-chosen setting, docs/equalise.md)."""

    gamma: float = 1.0  # share of each train prompt's he/she log-odds to remove (1: equal shares)
    #: lambda / mean(diag A): larger = a smaller edit; None: :data:`DEFAULT_RIDGE` of the mask's layout
    #: (whole matrix or a subset of its entries), chosen on dev (docs/equalise.md)
    ridge: float | None = None
    #: entry subsets: the penalty's metric, ``"diag"`` (diag C) or ``"block"`` (C within each output row)
    penalty: str = "diag"
    cov_reg: float = 1e-2  # C + cov_reg x mean(diag C) I before inverting
    keep_mass: bool = True  # rows keeping log(p_he + p_she) of every train prompt
    keep_hint: bool = True  # rows keeping the hinted prompts' log-odds (UB)
    #: re-linearisations; None: 1 for a whole matrix, 3 for a subset of its entries (chosen on dev:
    #: an entry mask needs larger per-entry changes, and one linear step then loses the mass)
    n_iter: int | None = None
    retention_limit: int = 48  # retention sentences for C
    batch_size: int = 32

    def __post_init__(self) -> None:
        if not 0 < self.gamma <= 1:
            raise ValueError(f"gamma must be in (0, 1], got {self.gamma}")
        if (self.ridge is not None and not self.ridge > 0) or self.cov_reg < 0:
            raise ValueError(f"ridge must be > 0 and cov-reg >= 0, got {self.ridge}, {self.cov_reg}")
        if self.penalty not in ("diag", "block"):
            raise ValueError(f"penalty must be 'diag' or 'block', got {self.penalty!r}")
        if (self.n_iter is not None and self.n_iter < 1) or self.retention_limit < 1 or self.batch_size < 1:
            raise ValueError("n-iter, retention-limit and batch-size must be >= 1")

    def ridge_for(self, dense: bool) -> float:
        """The ridge used for a whole matrix (``dense``) or a subset of its entries."""
        return self.ridge if self.ridge is not None else DEFAULT_RIDGE["dense" if dense else "entries"]


@dataclass
class Linearised:
    """One pass over prompts at the located module: inputs and output gradients at the last position."""

    k: Float[Tensor, "n d_in"]
    g: Float[Tensor, "n d_out"]  # d (log p_he - log p_she) / d o
    m: Float[Tensor, "n d_out"]  # d log(p_he + p_she) / d o
    d: Float[Tensor, " n"]
    logm: Float[Tensor, " n"]


def _module_of(lm, mask: ParamMask) -> tuple[str, torch.nn.Module, bool, str | None]:
    """The one masked weight, its module, whether it is stored ``[in, out]`` (GPT-2 Conv1D), and the
    module's bias when the mask covers it too (it is solved as one more input column, constant 1)."""
    names = mask.names
    weights = [n for n in names if n.endswith(".weight")]
    prefix = weights[0].removesuffix(".weight") if len(weights) == 1 else None
    if prefix is None or any(n not in (f"{prefix}.weight", f"{prefix}.bias") for n in names):
        raise ValueError(f"equalise edits one weight matrix; the mask covers {names[:4]}: use --scale module, row or "
                         "neuron (one module), not layer")
    module = lm.hf.get_submodule(prefix)
    if module.weight.ndim != 2:
        raise ValueError(f"equalise needs a 2-D weight, {weights[0]} has shape {tuple(module.weight.shape)}")
    bias = f"{prefix}.bias" if f"{prefix}.bias" in names else None
    return weights[0], module, layouts(lm.hf)[weights[0]] == "in_out", bias


def _input(args, ones: bool) -> Tensor:
    """The module's input, with a constant-1 column appended when its bias is edited."""
    k = args[0].detach()
    return torch.cat([k, torch.ones_like(k[..., :1])], -1) if ones else k


def linearise(lm: LensModel, module: torch.nn.Module, prompts: Sequence[str], tid: Tensor, batch_size: int = 32,
              ones: bool = False) -> Linearised:
    """:class:`Linearised` of ``prompts``: one forward + two gradient reads per batch. The module's
    output is replaced by a leaf tensor, so gradients flow only downstream of it. ``ones``: append a
    constant-1 input column (the bias)."""
    from ..hooks import module_hooks
    from ..scoring import iter_batches, last_logits

    store: dict[str, Tensor] = {}

    def hook(mod, args, kwargs, out):
        store["k"] = _input(args, ones)
        store["o"] = out.detach().requires_grad_(True)
        return store["o"]

    parts: dict[str, list[Tensor]] = {k: [] for k in ("k", "g", "m", "d", "logm")}
    with module_hooks(forward=[(module, hook)]), torch.enable_grad():
        for b in iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device, sort=False):
            out = lm.hf(input_ids=b.input_ids, attention_mask=b.attention_mask)
            lp = torch.log_softmax(last_logits(out.logits, b.last).float(), -1)[:, tid.to(lm.device)]
            d, logm = lp[:, 0] - lp[:, 1], torch.logsumexp(lp, -1)
            ar = torch.arange(len(b.last), device=lm.device)
            g = torch.autograd.grad(d.sum(), store["o"], retain_graph=True)[0][ar, b.last]
            m = torch.autograd.grad(logm.sum(), store["o"])[0][ar, b.last]
            for key, v in (("k", store["k"][ar, b.last]), ("g", g), ("m", m), ("d", d), ("logm", logm)):
                parts[key].append(v.detach().double().cpu())
    return Linearised(**{k: torch.cat(v) for k, v in parts.items()})


def input_moment(lm: LensModel, module: torch.nn.Module, texts: Sequence[str], batch_size: int = 16,
                 ones: bool = False) -> Float[Tensor, "d_in d_in"]:
    """``E[k k^T]`` of the module's input over every real token of ``texts`` (float64; ``ones``: with
    a constant-1 column appended, so the last row is ``E[k]``)."""
    from ..hooks import module_hooks
    from ..scoring import iter_batches

    acc: dict[str, Tensor] = {}

    def hook(mod, args, kwargs, out):
        k = _input(args, ones).double()[acc["mask"]]
        acc["s"] = acc.get("s", 0) + k.T @ k
        acc["n"] = acc.get("n", 0) + len(k)

    with module_hooks(forward=[(module, hook)]), torch.no_grad():
        for b in iter_batches(lm.tokenizer, list(texts), batch_size, device=lm.device):
            acc["mask"] = b.attention_mask.bool()
            lm.hf(input_ids=b.input_ids, attention_mask=b.attention_mask)
    return (acc["s"] / acc["n"]).cpu()


def _rows(cur: list[Linearised], ref: list[Linearised], cfg: EqualiseConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Stacked ``(u, k, t)`` of the constraint rows; ``cur`` / ``ref`` = (neutral, hint) at the
    current and the unedited weights. Targets ask for what is still missing."""
    (n, h), (n0, h0) = cur, ref
    us, ks, ts = [n.g], [n.k], [(1 - cfg.gamma) * n0.d - n.d]
    if cfg.keep_mass:
        us, ks, ts = us + [n.m], ks + [n.k], ts + [n0.logm - n.logm]
    if h is not None:
        us, ks, ts = us + [h.g, h.m], ks + [h.k, h.k], ts + [h0.d - h.d, h0.logm - h.logm]
    return torch.cat(us), torch.cat(ks), torch.cat(ts)


def solve_dense(u: Tensor, k: Tensor, t: Tensor, c_inv: Tensor, ridge: float) -> Float[Tensor, "d_out d_in"]:
    """Whole-matrix solution ``dW = sum_j beta_j u_j (C^-1 k_j)^T`` of the kernel ridge system."""
    ck = k @ c_inv  # [n, d_in] rows (C^-1 k_j)^T (C symmetric)
    a = (u @ u.T) * (ck @ k.T)
    lam = ridge * float(a.diagonal().mean())
    beta = torch.linalg.solve(a + lam * torch.eye(len(a), dtype=a.dtype), t)
    return (u.T * beta) @ ck


def solve_entries(u: Tensor, k: Tensor, t: Tensor, rows: Tensor, cols: Tensor, c: Float[Tensor, "d_in d_in"],
                  ridge: float, penalty: str = "diag") -> Float[Tensor, " entries"]:
    """Solution over the entries ``(rows[e], cols[e])`` only: ``min |X delta - t|^2 + lambda delta^T B delta``
    with ``X_je = u_j[r_e] k_j[c_e]`` and ``B`` the ``diag(C)`` of the entries' columns (``"diag"``) or
    (``"block"``) ``C`` restricted to each output row's own columns: the exact change of the module's
    output on the retention tokens, ``sum_t |dW k_t|^2``, when only these entries move."""
    x = u[:, rows] * k[:, cols]  # [n, entries]
    if penalty == "diag":
        binv_xt = (x / c.diagonal()[cols]).T
    elif penalty == "block":
        binv_xt = torch.empty_like(x.T)
        for r in rows.unique():
            sel = (rows == r).nonzero().squeeze(1)
            binv_xt[sel] = torch.linalg.solve(c[cols[sel]][:, cols[sel]], x[:, sel].T)
    else:
        raise ValueError(f"penalty must be 'diag' or 'block', got {penalty!r}")
    a = x @ binv_xt
    lam = ridge * float(a.diagonal().mean())
    return binv_xt @ torch.linalg.solve(a + lam * torch.eye(len(a), dtype=a.dtype), t)


def _entry_coords(idx: Tensor, shape: tuple[int, int], transposed: bool) -> tuple[Tensor, Tensor]:
    """(output row, input column) of each flat stored index."""
    a, b = idx // shape[1], idx % shape[1]
    return (b, a) if transposed else (a, b)


@dataclass
class _Problem:
    """What every solve of one matrix shares: the weight, its entries, the prompts, the input moment."""

    name: str
    module: torch.nn.Module
    bias: str | None  # the module's bias name when it is edited too (input column d_in, constant 1)
    idx: Tensor  # flat stored indices of the edited weight entries
    bias_idx: Tensor  # indices of the edited bias entries (empty without a bias)
    rows: Tensor  # output row of each edited entry (weight entries, then bias entries)
    cols: Tensor  # input column of each (d_in for the bias)
    tid: Tensor  # he, she first-token ids
    sets: list  # [neutral prompts, hinted prompts or None]
    moment: Float[Tensor, "d_in d_in"]  # E[k k^T] on the retention texts (unregularised)
    out_in: tuple[int, int]  # the weight's (d_out, d_in) whatever its stored layout

    @property
    def dense(self) -> bool:
        w, b = self.module.weight, (self.module.bias if self.bias else None)
        return len(self.idx) == w.numel() and (b is None or len(self.bias_idx) == b.numel())

    def base(self) -> Float[Tensor, " entries"]:
        """Current values of the edited entries (float64, the order of ``rows``)."""
        w = self.module.weight.detach().reshape(-1)[self.idx.to(self.module.weight.device)]
        b = self.module.bias.detach()[self.bias_idx.to(w.device)] if self.bias else w[:0]
        return torch.cat([w, b]).double().cpu()

    def edit(self, lm, vals: Tensor, method: str = "equalise", meta: dict | None = None) -> Edit:
        """The :class:`Edit` setting the entries to ``vals`` (the order of ``rows``)."""
        names = [(self.name, self.module.weight, self.idx)]
        names += [(self.bias, self.module.bias, self.bias_idx)] if self.bias else []
        lay, parts = layouts(lm.hf), vals.split([len(self.idx), len(self.bias_idx)])
        return Edit({n: i for n, _, i in names}, {n: v.to(p.dtype) for (n, p, _), v in zip(names, parts)},
                    {n: tuple(p.shape) for n, p, _ in names}, {n: p.dtype for n, p, _ in names},
                    {n: lay[n] for n, _, _ in names}, method, meta or {})


def _problem(lm, mask: ParamMask, train, hint, retention, cfg: EqualiseConfig) -> _Problem:
    from .measure import he_she, retention_texts

    if not train:
        raise ValueError("no training samples given")
    mask.check(lm.hf)
    name, module, transposed, bias = _module_of(lm, mask)
    idx = mask.indices(name).cpu()
    rows, cols = _entry_coords(idx, tuple(module.weight.shape), transposed)
    bias_idx = mask.indices(bias).cpu() if bias else idx[:0]
    d_in = module.weight.shape[0 if transposed else 1]
    rows, cols = torch.cat([rows, bias_idx]), torch.cat([cols, torch.full_like(bias_idx, d_in)])
    moment = input_moment(lm, module, retention if retention is not None else retention_texts(cfg.retention_limit),
                          ones=bias is not None)
    sets = [[s["prompt"] for s in train], [s["prompt"] for s in hint] if (cfg.keep_hint and hint) else None]
    out_in = (module.weight.shape[1 if transposed else 0], d_in)
    return _Problem(name, module, bias, idx, bias_idx, rows, cols, torch.as_tensor(he_she(lm).first_ids), sets, moment,
                    out_in)


def _solve(lm, pb: _Problem, cfg: EqualiseConfig, n_iter: int,
           rows_out: list | None = None) -> Float[Tensor, " entries"]:
    """The change of ``pb``'s entries (float64) after ``n_iter`` linearise-and-solve rounds
    (``rows_out``: receives the first round's constraint rows ``(u, k, t)``)."""
    c = pb.moment + cfg.cov_reg * float(pb.moment.diagonal().mean()) * torch.eye(len(pb.moment), dtype=pb.moment.dtype)
    c_inv = torch.linalg.inv(c) if pb.dense else None
    ones = pb.bias is not None
    lin = lambda: [linearise(lm, pb.module, p, pb.tid, cfg.batch_size, ones) if p else None for p in pb.sets]  # noqa: E731
    # the blocks before the edited one never change: later linearisations replay their output
    block = first_edited_layer(lm, [pb.name])
    prefix = PrefixCache((block,)) if n_iter > 1 and block else None
    with record(lm, prefix) if prefix else nullcontext():
        ref = lin()
    base = pb.base()
    delta = torch.zeros_like(base)
    for it in range(n_iter):
        cur = ref
        if it:  # re-linearise at the edited weights
            with pb.edit(lm, base + delta).applied(lm.hf), replay(lm, prefix, block) if prefix else nullcontext():
                cur = lin()
        u, k, t = _rows(cur, ref, cfg)
        if rows_out is not None and not it:
            rows_out.append((u, k, t))
        ridge = cfg.ridge_for(pb.dense)
        step = (solve_dense(u, k, t, c_inv, ridge)[pb.rows, pb.cols] if pb.dense
                else solve_entries(u, k, t, pb.rows, pb.cols, c, ridge, cfg.penalty))
        if not torch.isfinite(step).all():
            raise RuntimeError(f"the equalise solve gave non-finite values at iteration {it}; the model is unchanged "
                               "(raise --ridge)")
        delta = delta + step
        log.info("equalise iteration %d: |delta| %.4f over %d entries (%d constraint rows)", it, float(delta.norm()),
                 len(base), len(t))
    return delta


def equalise_edit(lm: LensModel, mask: ParamMask, train: Sequence[dict], *, hint: Sequence[dict] | None = None,
                  retention: Sequence[str] | None = None, config: EqualiseConfig | None = None,
                  method: str = "equalise") -> Edit:
    """The closed-form equalising :class:`Edit` of ``mask``'s one weight matrix (module docstring).

    ``train``: neutral prompts (``prompt``); ``hint``: GenHintEval samples whose log-odds are kept
    (``cfg.keep_hint``); ``retention``: texts for ``C`` (default: the benchmark's first
    ``cfg.retention_limit`` sentences). The model is unchanged on return."""
    cfg = config or EqualiseConfig()
    pb = _problem(lm, mask, train, hint, retention, cfg)
    n_iter = cfg.n_iter if cfg.n_iter is not None else (1 if pb.dense else 3)
    delta = _solve(lm, pb, cfg, n_iter)
    return pb.edit(lm, pb.base() + delta, method, {"config": asdict(cfg), "n_iter": n_iter,
                                                   "shape_out_in": list(pb.out_in), "bias": pb.bias is not None})


def solution_entries(lm: LensModel, module: str, train: Sequence[dict], *, k: int = 4096,
                     hint: Sequence[dict] | None = None, retention: Sequence[str] | None = None,
                     config: EqualiseConfig | None = None, pick: str = "top", seed: int = 0,
                     share: str = "train") -> LocateResult:
    """Locate ``k`` entries of ``module`` (e.g. ``L29.mlp.down``) for an entry-scale equalise edit: the
    whole-matrix solution ``dW`` (one linear step, float64), each entry scored by its share of it.
    ``share="train"`` (default): the entry's share of the solution's effect on its own constraints,
    ``|dW[r, c]| x sqrt(mean_j (u_j[r] k_j[c])^2)`` over the constraint rows ``j`` (the entries that do
    the equalising); ``"retention"``: ``|dW[r, c]| x rms(k_c)`` over the retention tokens (the
    earlier reading: the entries whose change moves ordinary text most). Labels ``{module}/row{r}/col{c}``
    (``r`` output, ``c`` input, as masks read them in any stored layout). ``pick``: the ``k`` top
    entries, or the controls: the ``k`` lowest-ranked (``lowest``, lowest first), from the middle
    or ``k`` seeded random entries (``random``) of the same matrix."""
    from ..locate.result import LocateResult
    from .masks import mask_from_labels

    cfg = config or EqualiseConfig()
    if share not in ("train", "retention"):
        raise ValueError(f"share must be 'train' or 'retention', got {share!r}")
    pb = _problem(lm, mask_from_labels(lm.hf, [module]), train, hint, retention, cfg)
    rows: list = []
    delta = _solve(lm, pb, cfg, 1, rows_out=rows)
    out_in = pb.out_in
    dw = torch.zeros(out_in[0], out_in[1] + (pb.bias is not None), dtype=torch.float64)
    dw[pb.rows, pb.cols] = delta  # [out, in (+ bias)]
    if share == "train":
        u, kk, _ = rows[0]
        size = ((u.pow(2).T @ kk.pow(2)) / len(u)).sqrt()  # rms over the constraint rows of u_j[r] k_j[c]
    else:
        size = pb.moment.diagonal().clamp_min(0).sqrt()[None, :]
    score = (dw.abs() * size)[:, :out_in[1]]  # weight entries only
    flat, k = score.reshape(-1), min(k, score.numel())
    if pick == "random":
        idx = torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(seed))[:k]
    elif pick in ("top", "lowest"):
        idx = flat.topk(k, largest=pick == "top").indices
    elif pick == "middle":
        idx = flat.argsort(descending=True, stable=True)[flat.numel() // 2:][:k]
    else:
        raise ValueError(f"pick must be one of top, middle, lowest, random, got {pick!r}")
    r, c = idx // score.shape[1], idx % score.shape[1]
    labels = [f"{module}/row{int(a)}/col{int(b)}" for a, b in zip(r, c)]
    # scores in pick order (a result ranks by descending score: the picked order is kept)
    return LocateResult("equalise_entries", labels, torch.arange(k, 0, -1, dtype=torch.float64),
                        variant=f"|dW| x rms({'u k over the constraints' if share == 'train' else 'retention input'}), "
                                f"one linear step; pick={pick}",
                        extras={"module": module, "share": flat[idx].tolist(), "share_of": share, "pick": pick},
                        model=getattr(lm, "name", ""), n_samples=len(train))
