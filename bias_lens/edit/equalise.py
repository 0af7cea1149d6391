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
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from .edits import Edit, layouts
from .masks import ParamMask

if TYPE_CHECKING:
    from ..lens import LensModel
    from ..locate.result import LocateResult

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EqualiseConfig:
    """Options of :func:`equalise_edit` (defaults: the dev-chosen setting, docs/equalise.md)."""

    gamma: float = 1.0  # share of each train prompt's he/she log-odds to remove (1: equal shares)
    ridge: float = 0.03  # lambda / mean(diag A), chosen on dev (docs/equalise.md): larger = a smaller edit
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
        if not self.ridge > 0 or self.cov_reg < 0:
            raise ValueError(f"ridge must be > 0 and cov-reg >= 0, got {self.ridge}, {self.cov_reg}")
        if (self.n_iter is not None and self.n_iter < 1) or self.retention_limit < 1 or self.batch_size < 1:
            raise ValueError("n-iter, retention-limit and batch-size must be >= 1")


@dataclass
class Linearised:
    """One pass over prompts at the located module: inputs and output gradients at the last position."""

    k: Float[Tensor, "n d_in"]
    g: Float[Tensor, "n d_out"]  # d (log p_he - log p_she) / d o
    m: Float[Tensor, "n d_out"]  # d log(p_he + p_she) / d o
    d: Float[Tensor, " n"]
    logm: Float[Tensor, " n"]


def _module_of(lm, mask: ParamMask) -> tuple[str, torch.nn.Module, bool]:
    """The one masked weight, its module, and whether it is stored ``[in, out]`` (GPT-2 Conv1D)."""
    names = mask.names
    if len(names) != 1 or not names[0].endswith(".weight"):
        raise ValueError(f"equalise edits one weight matrix; the mask covers {names[:4]}: use --scale module, row or "
                         "neuron (one module), not layer")
    name = names[0]
    module = lm.hf.get_submodule(name.removesuffix(".weight"))
    if module.weight.ndim != 2:
        raise ValueError(f"equalise needs a 2-D weight, {name} has shape {tuple(module.weight.shape)}")
    return name, module, layouts(lm.hf)[name] == "in_out"


def linearise(lm: LensModel, module: torch.nn.Module, prompts: Sequence[str], tid: Tensor, batch_size: int = 32) -> Linearised:
    """:class:`Linearised` of ``prompts``: one forward + two gradient reads per batch. The module's
    output is replaced by a leaf tensor, so gradients flow only downstream of it."""
    from ..hooks import module_hooks
    from ..scoring import iter_batches, last_logits

    store: dict[str, Tensor] = {}

    def hook(mod, args, kwargs, out):
        store["k"] = args[0].detach()
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


def input_moment(lm: LensModel, module: torch.nn.Module, texts: Sequence[str], batch_size: int = 16) -> Float[Tensor, "d_in d_in"]:
    """``E[k k^T]`` of the module's input over every real token of ``texts`` (float64)."""
    from ..hooks import module_hooks
    from ..scoring import iter_batches

    acc: dict[str, Tensor] = {}

    def hook(mod, args, kwargs, out):
        k = args[0].detach().double()[acc["mask"]]
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


def solve_entries(u: Tensor, k: Tensor, t: Tensor, rows: Tensor, cols: Tensor, c_diag: Tensor,
                  ridge: float) -> Float[Tensor, " entries"]:
    """Solution over the entries ``(rows[e], cols[e])`` only, regularised by ``diag(C)``."""
    x = u[:, rows] * k[:, cols]  # [n, entries]
    dinv = 1.0 / c_diag[cols]
    a = (x * dinv) @ x.T
    lam = ridge * float(a.diagonal().mean())
    return dinv * (x.T @ torch.linalg.solve(a + lam * torch.eye(len(a), dtype=a.dtype), t))


def _entry_coords(idx: Tensor, shape: tuple[int, int], transposed: bool) -> tuple[Tensor, Tensor]:
    """(output row, input column) of each flat stored index."""
    a, b = idx // shape[1], idx % shape[1]
    return (b, a) if transposed else (a, b)


def equalise_edit(lm: LensModel, mask: ParamMask, train: Sequence[dict], *, hint: Sequence[dict] | None = None,
                  retention: Sequence[str] | None = None, config: EqualiseConfig | None = None,
                  method: str = "equalise") -> Edit:
    """The closed-form equalising :class:`Edit` of ``mask``'s one weight matrix (module docstring).

    ``train``: neutral prompts (``prompt``); ``hint``: GenHintEval samples whose log-odds are kept
    (``cfg.keep_hint``); ``retention``: texts for ``C`` (default: the benchmark's first
    ``cfg.retention_limit`` sentences). The model is unchanged on return."""
    from .measure import he_she, retention_texts

    cfg = config or EqualiseConfig()
    if not train:
        raise ValueError("no training samples given")
    mask.check(lm.hf)
    name, module, transposed = _module_of(lm, mask)
    idx = mask.indices(name)
    w = module.weight
    shape = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
    rows, cols = _entry_coords(idx.cpu(), tuple(w.shape), transposed)
    dense = len(idx) == w.numel()
    tid = torch.as_tensor(he_she(lm).first_ids)
    c = input_moment(lm, module, retention if retention is not None else retention_texts(cfg.retention_limit))
    c = c + cfg.cov_reg * float(c.diagonal().mean()) * torch.eye(len(c), dtype=c.dtype)
    c_inv = torch.linalg.inv(c) if dense else None
    sets = [[s["prompt"] for s in train], [s["prompt"] for s in hint] if (cfg.keep_hint and hint) else None]
    lin = lambda: [linearise(lm, module, p, tid, cfg.batch_size) if p else None for p in sets]  # noqa: E731
    ref, delta = lin(), torch.zeros(len(idx), dtype=torch.float64)
    base = w.detach().reshape(-1)[idx.to(w.device)].double().cpu()
    n_iter = cfg.n_iter if cfg.n_iter is not None else (1 if dense else 3)
    for it in range(n_iter):
        cur = ref if it == 0 else _with(lm, name, idx, base + delta, w, lin)
        u, k, t = _rows(cur, ref, cfg)
        step = (solve_dense(u, k, t, c_inv, cfg.ridge)[rows, cols] if dense
                else solve_entries(u, k, t, rows, cols, c.diagonal(), cfg.ridge))
        if not torch.isfinite(step).all():
            raise RuntimeError(f"the equalise solve gave non-finite values at iteration {it}; the model is unchanged "
                               "(raise --ridge)")
        delta = delta + step
        log.info("equalise iteration %d: |delta| %.4f over %d entries (%d constraint rows)", it, float(delta.norm()),
                 len(idx), len(t))
    vals = (base + delta).to(w.dtype)
    return Edit({name: idx.cpu()}, {name: vals}, {name: tuple(w.shape)}, {name: w.dtype},
                {name: layouts(lm.hf)[name]}, method, {"config": asdict(cfg), "n_iter": n_iter, "shape_out_in": list(shape)})


def solution_entries(lm: LensModel, module: str, train: Sequence[dict], *, k: int = 4096,
                     hint: Sequence[dict] | None = None, retention: Sequence[str] | None = None,
                     config: EqualiseConfig | None = None) -> LocateResult:
    """Locate ``k`` entries of ``module`` (e.g. ``L29.mlp.down``) for an entry-scale equalise edit: the
    whole-matrix solution ``dW`` (one linear step) scored by each entry's first-order share
    ``|dW[r, c]| x rms(k_c)`` (``rms`` over the retention tokens). Labels ``{module}/row{r}/col{c}``
    (``r`` output, ``c`` input). On SmolLM2 these entries keep the mass where MSME's Eq. 5 entries
    (a few huge-activation input columns) do not (docs/equalise.md)."""
    from dataclasses import replace

    from ..locate.result import LocateResult
    from .masks import mask_from_labels
    from .measure import retention_texts

    cfg = replace(config or EqualiseConfig(), n_iter=1)
    full = mask_from_labels(lm.hf, [module])
    texts = retention if retention is not None else retention_texts(cfg.retention_limit)
    edit = equalise_edit(lm, full, train, hint=hint, retention=texts, config=cfg)
    name, mod, transposed = _module_of(lm, full)
    w = mod.weight.detach()
    dw = (edit.values[name].double() - w.reshape(-1)[edit.indices[name]].double()).view(w.shape)
    dw = dw.T if transposed else dw  # [out, in]
    score = dw.abs() * input_moment(lm, mod, texts).diagonal().clamp_min(0).sqrt()[None, :]
    top = score.reshape(-1).topk(min(k, score.numel()))
    r, c = top.indices // score.shape[1], top.indices % score.shape[1]
    labels = [f"{module}/row{int(a)}/col{int(b)}" for a, b in zip(r, c)]
    return LocateResult("equalise_entries", labels, top.values, variant="|dW| x rms(input), one linear step",
                        extras={"module": module}, model=getattr(lm, "name", ""), n_samples=len(train))


def _with(lm, name: str, idx: Tensor, vals: Tensor, w: Tensor, fn):
    """``fn()`` evaluated with ``name``'s entries ``idx`` temporarily set to ``vals``."""
    edit = Edit({name: idx.cpu()}, {name: vals.to(w.dtype)}, {name: tuple(w.shape)}, {name: w.dtype},
                {name: layouts(lm.hf)[name]})
    with edit.applied(lm.hf):
        return fn()
