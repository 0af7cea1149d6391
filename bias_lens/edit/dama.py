"""DAMA (Limisiewicz et al., ICLR 2024): project the gender subspace out of upper-middle MLP outputs.

What the reference (``tomlimi/DAMA``, ``src/dama/dama_main.py``, ``compute_v_dama.py``,
``compute_us_dama.py``) does, per edited layer ``l`` (ascending, ``update="iterative"``):

1. ``U``: the input of the MLP down-projection at the last prompt token of every train prompt
   (``fact_token="last"``; averaged over 11 context templates, 10 of them sampled generations).
2. ``V``: per prompt and pronoun (``pos="he"``, ``neg="she"``) a vector ``delta_g`` (plus one
   ``delta_shared``) added to the MLP output at the last token, found by 20 Adam steps (lr 0.5)
   on ``NLL(pronoun) + kl_factor * KL("<subject> is a") + weight_decay*|delta|^2/|h|``, clamped to
   ``clamp_norm_factor*|h|``; the returned target is ``delta_g`` (``rel_targets``).
   ``V = V_he - V_she`` (``--no_colinear_vs`` instead stacks ``V_he``, ``V_she`` with ``U`` repeated).
3. PLS regression (sklearn, ``scale=False``, ``n_components=nullspace_dimension``) of ``V`` on
   ``H = U @ W_down.T`` (``projection_location="after"``); ``B`` = its ``x_weights_``;
   ``M = I - orth(B) orth(B)^T``; ``W_down <- M @ W_down``. The next layer is computed on the
   model with this layer already edited. (``mom2_adjustment`` whitening of ``U`` is optional there;
   the released 7B run script passes ``--no_whitening``.) The LLaMA-7B example edits layers 21-29
   of 32 (9 layers ending two below the top); ``null_dim`` is 1024 by default, 128 in the run script.
   ``update="mixed"`` (the script's "legacy DAMA") computes the deltas once, at the last block's
   residual output (``--vs_at_last``), before any edit, and reuses them for every layer.

This implementation follows steps 1-3 with these deviations (all recorded in ``Edit.meta``):
only the bare prompt is used as context (no sampled context templates); both pronouns are
optimised jointly with one Adam step per iteration (the reference steps once per pronoun) and
without the reference's early stop at loss < 0.05; no whitening; PLS weights are computed by
NIPALS with an exact SVD per component (what sklearn's power iteration converges to). The
down-projection bias (GPT-2; LLaMA has none) is projected too when ``project_bias`` (default), so
that the MLP output itself has no component on the removed directions; ``False`` = weight only.
Default layers: the ``n_layers`` consecutive layers ending ``skip_top`` (2) below the top.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import torch
from jaxtyping import Float
from torch import Tensor

from ..arch import param_ref
from ..scoring import pad_right, tokenize
from ..targets import resolve_targets
from .edits import Edit
from .masks import ParamMask

if TYPE_CHECKING:
    from ..lens import LensModel

log = logging.getLogger(__name__)
UPDATES = ("iterative", "mixed")
PAIRINGS = ("difference", "stack")


@dataclass(frozen=True)
class DamaConfig:
    """Hyper-parameters of :func:`dama_edit` (defaults: the reference's LLaMA-7B example file)."""

    null_dim: int
    n_layers: int
    layers: tuple[int, ...] | None = None
    skip_top: int = 2
    update: str = "iterative"
    pairing: str = "difference"
    words: tuple[str, str] = ("he", "she")
    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm: float = 4.0
    kl_factor: float = 0.0625
    project_bias: bool = True
    batch_size: int = 64
    max_requests: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if self.null_dim < 1:
            raise ValueError(f"null_dim must be >= 1 (dimensions removed per layer), got {self.null_dim}")
        if self.n_layers < 1:
            raise ValueError(f"n_layers must be >= 1, got {self.n_layers}")
        if self.layers is not None and len(set(self.layers)) != len(self.layers):
            raise ValueError(f"layers must be distinct, got {self.layers}")
        if self.layers is not None and len(self.layers) != self.n_layers:
            raise ValueError(f"layers {self.layers} has {len(self.layers)} entries but n_layers={self.n_layers}")
        if self.skip_top < 0:
            raise ValueError(f"skip_top must be >= 0, got {self.skip_top}")
        if self.update not in UPDATES:
            raise ValueError(f"update must be one of {UPDATES}, got {self.update!r}")
        if self.pairing not in PAIRINGS:
            raise ValueError(f"pairing must be one of {PAIRINGS}, got {self.pairing!r}")
        if len(self.words) != 2:
            raise ValueError(f"words must be (male, female), got {self.words}")
        if self.steps < 1 or self.lr <= 0 or self.batch_size < 1:
            raise ValueError("steps and batch_size must be >= 1 and lr > 0")
        if self.max_requests is not None and self.max_requests < 2:
            raise ValueError(f"max_requests must be >= 2 or None, got {self.max_requests}")

    @property
    def variant(self) -> str:
        """Short variant tag (update/pairing/null dim/layers) recorded with each DAMA result."""
        return f"{self.update}/{self.pairing}/nd{self.null_dim}/l{self.n_layers}" + ("" if self.project_bias else "/w-only")


def default_layers(n_model_layers: int, n_layers: int, skip_top: int = 2) -> tuple[int, ...]:
    """The ``n_layers`` consecutive layers ending ``skip_top`` below the top (21..29 of 32 for 9, 2)."""
    end = n_model_layers - 1 - skip_top
    if n_layers > end + 1:
        raise ValueError(f"cannot edit {n_layers} layers ending {skip_top} below the top of a {n_model_layers}-layer "
                         "model; lower n_layers or skip_top, or pass layers explicitly")
    return tuple(range(end - n_layers + 1, end + 1))


# ----------------------------------------------------------------------------- linear algebra
def pls_weights(x: Float[Tensor, "n dx"], y: Float[Tensor, "n dy"], k: int) -> Float[Tensor, "dx k"]:
    """PLS2 x-weights (sklearn ``PLSRegression(scale=False)``, regression deflation), float64.

    Component ``j``: ``w`` = top left singular vector of ``X_j^T Y_j`` (centred), ``t = X_j w``,
    ``X_{j+1} = X_j - t p^T``, ``Y_{j+1} = Y_j - t q^T`` with ``p, q`` the regressions on ``t``.
    Stops early (fewer columns) when the Y or X residual vanishes, as sklearn does.
    """
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    eps = torch.finfo(torch.float64).eps
    ws = []
    for _ in range(k):
        if y.abs().max() < 10 * eps * max(1.0, float(y.numel()) ** 0.5) or x.abs().max() < 10 * eps:
            break
        w = _top_left_singular(x, y)
        w = w * (1.0 if float(w[w.abs().argmax()]) >= 0 else -1.0)
        t = x @ w
        tt = t @ t
        if tt <= eps:
            break
        x = x - torch.outer(t, x.T @ t / tt)
        y = y - torch.outer(t, y.T @ t / tt)
        ws.append(w)
    if not ws:
        raise ValueError("PLS found no direction: the targets V do not vary (are the train prompts all identical?)")
    if len(ws) < k:
        log.warning("PLS stopped after %d of %d components (rank of the centred data); use more train prompts",
                    len(ws), k)
    return torch.stack(ws, 1)


def _top_left_singular(x: Tensor, y: Tensor) -> Tensor:
    """Top left singular vector of ``x^T y``; for ``n < d`` via the ``n x n`` problem (same vector)."""
    if x.shape[0] >= x.shape[1]:
        return torch.linalg.svd(x.T @ y, full_matrices=False)[0][:, 0]
    q, r = torch.linalg.qr(x.T)  # x^T y y^T x = q (r y y^T r^T) q^T
    g = r @ (y @ y.T) @ r.T
    return q @ torch.linalg.eigh((g + g.T) / 2)[1][:, -1]


def nullspace_projection(b: Float[Tensor, "d k"]) -> Float[Tensor, "d d"]:
    """``I - Q Q^T`` with ``Q`` an orthonormal basis of ``b``'s columns (reference ``custom_orth`` tol)."""
    u, s, _ = torch.linalg.svd(b.double(), full_matrices=False)
    tol = float(s.max()) * torch.finfo(torch.float64).eps * max(b.shape)
    q = u[:, s > tol]
    return torch.eye(b.shape[0], dtype=torch.float64) - q @ q.T


# ----------------------------------------------------------------------------- activations
def _last(t: Tensor, last: Tensor) -> Tensor:
    return t[torch.arange(t.shape[0], device=t.device), last.to(t.device)]


def _batch(lm, prompts: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
    ids, mask = pad_right(tokenize(lm.tokenizer, list(prompts)), lm.tokenizer.pad_token_id or 0, lm.device)
    return ids, mask, mask.sum(1) - 1


@torch.no_grad()
def collect_last(lm: LensModel, prompts: Sequence[str], point: str, batch_size: int = 64) -> Float[Tensor, "prompt d"]:
    """Activation at hook ``point`` at each prompt's last token (float64, input order)."""
    out = []
    for s in range(0, len(prompts), batch_size):
        ids, mask, last = _batch(lm, prompts[s : s + batch_size])
        store: dict[str, Tensor] = {}

        def rec(t, *, hook, _idx=last):
            store["x"] = _last(t, _idx).double().cpu()

        with lm.hooks([(point, rec)]):
            lm.hf(input_ids=ids, attention_mask=mask)
        out.append(store["x"])
    return torch.cat(out)


def optimise_deltas(lm: LensModel, prompts: Sequence[str], subjects: Sequence[str], point: str, cfg: DamaConfig
                    ) -> Float[Tensor, "prompt 2 d"]:
    """Reference ``compute_v_dama``: per prompt and pronoun the vector ``delta_g`` that, added to
    ``point`` at the last token (with a shared ``delta_s``), makes the model say the pronoun."""
    tids = torch.tensor(resolve_targets(lm.tokenizer, list(cfg.words)).require(n=2, single_token=True).first_ids)
    for p in lm.hf.parameters():
        p.requires_grad_(False)
    out = []
    for s in range(0, len(prompts), cfg.batch_size):
        pr, sj = list(prompts[s : s + cfg.batch_size]), list(subjects[s : s + cfg.batch_size])
        b = len(pr)
        rows = pr * 2 + [f"{x} is a" for x in sj] * 2  # [rewrite he | rewrite she | kl he | kl she]
        ids, mask, last = _batch(lm, rows)
        keep = torch.unique(last)
        col = torch.searchsorted(keep, last)
        h = collect_last(lm, pr, point, cfg.batch_size).float().to(lm.device)  # clean value (target_init)
        hn = h.norm(dim=1, keepdim=True)
        dg = torch.zeros(2, b, h.shape[1], device=lm.device, requires_grad=True)
        ds = torch.zeros(b, h.shape[1], device=lm.device, requires_grad=True)
        opt = torch.optim.Adam([dg, ds], lr=cfg.lr)
        tgt = torch.cat([tids[0].repeat(b), tids[1].repeat(b)]).to(lm.device)
        kl0 = None
        for _ in range(cfg.steps):
            tot = dg + ds  # [2, b, d]
            add = torch.cat([tot.reshape(2 * b, -1), tot.reshape(2 * b, -1)])

            def push(t, *, hook, _add=add):
                z = torch.zeros_like(t)
                z = z.index_put((torch.arange(t.shape[0], device=t.device), last.to(t.device)), _add.to(t.dtype))
                return t + z

            opt.zero_grad()
            with lm.hooks([(point, push)]):  # logits only at the distinct last positions
                logits = lm.hf(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits
            lp = torch.log_softmax(logits[torch.arange(len(rows), device=logits.device), col].float(), -1)
            nll = -lp[torch.arange(2 * b), tgt].view(2, b)
            kl_lp = lp[2 * b :]
            if kl0 is None:
                kl0 = kl_lp.detach()
            kl = (kl_lp.exp() * (kl_lp - kl0)).sum(-1).view(2, b)
            wd = cfg.weight_decay * tot.pow(2).sum(-1) / hn.squeeze(1)
            (nll + cfg.kl_factor * kl + wd).sum().backward()
            opt.step()
            with torch.no_grad():
                n = (dg + ds).norm(dim=-1, keepdim=True)  # [2, b, 1]
                f = torch.clamp(cfg.clamp_norm * hn / n.clamp_min(1e-12), max=1.0)
                dg.mul_(f)
                ds.mul_(f.min(0).values)
        out.append(dg.detach().double().cpu().transpose(0, 1))
        log.info("DAMA deltas at %s: %d/%d prompts", point, s + b, len(prompts))
    return torch.cat(out)


# ----------------------------------------------------------------------------- the edit
def _subject(sample: dict) -> str:
    tpl = sample.get("template", "{}")
    pre, _, post = tpl.partition("{}")
    p = sample["prompt"]
    return p[len(pre) : len(p) - len(post)] if p.startswith(pre) and p.endswith(post) else f"The {sample['profession']}"


def layer_edit(lm: LensModel, layer: int, m: Float[Tensor, "d_model d_model"], project_bias: bool = True) -> Edit:
    """``W_down <- M @ W_down`` (and ``b <- M b``) of one layer as an :class:`Edit` (full tensors)."""
    ref = param_ref(lm.hf, f"L{layer}.mlp.down")
    w = ref.weight_view(lm.hf).detach()
    new_w = (m @ w.double()).to(w.dtype)
    new = {ref.weight_name: new_w.T.contiguous() if ref.transposed else new_w}
    if project_bias and ref.bias_name is not None:
        bias = ref.bias_view(lm.hf).detach()
        new[ref.bias_name] = (m @ bias.double()).to(bias.dtype)
    params = dict(lm.hf.named_parameters())
    mask = ParamMask({n: torch.ones(params[n].shape, dtype=torch.bool) for n in new})
    return Edit.from_tensors(lm.hf, mask, new, method=f"dama(L{layer})")


def _layers_and_samples(lm: LensModel, train_samples: Sequence[dict], cfg: DamaConfig) -> tuple[tuple[int, ...], list[dict]]:
    """The edited layers (checked against the model) and the (seeded, ``max_requests``) train samples."""
    layers = tuple(sorted(cfg.layers)) if cfg.layers is not None else default_layers(lm.n_layers, cfg.n_layers, cfg.skip_top)
    bad = [x for x in layers if not 0 <= x < lm.n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range 0..{lm.n_layers - 1}")
    if cfg.null_dim >= lm.d_model:
        raise ValueError(f"null_dim {cfg.null_dim} must be below d_model {lm.d_model}")
    samples = [s for s in train_samples]
    if len(samples) < 2 or any("prompt" not in s for s in samples):
        raise ValueError("train_samples must be >= 2 dicts with a 'prompt' (load_split('dama', 'train'))")
    if cfg.max_requests is not None and len(samples) > cfg.max_requests:
        samples = random.Random(cfg.seed).sample(samples, cfg.max_requests)
    return layers, samples


def _mixed_deltas(lm: LensModel, prompts: list[str], subjects: list[str], cfg: DamaConfig,
                  deltas: Tensor | None) -> Tensor | None:
    """The mixed update's targets (given, or optimised once at the last block); None when iterative."""
    if deltas is not None:
        if cfg.update != "mixed":
            raise ValueError("deltas can only be reused with update='mixed' (iterative deltas depend on earlier edits)")
        if tuple(deltas.shape) != (len(prompts), 2, lm.d_model):
            raise ValueError(f"deltas have shape {tuple(deltas.shape)}, expected {(len(prompts), 2, lm.d_model)}: "
                             "pass the same train samples, max_requests and seed as the edit they came from")
        return deltas.double().cpu()
    if cfg.update == "mixed":
        return optimise_deltas(lm, prompts, subjects, f"L{lm.n_layers - 1}.resid_post", cfg)
    return None


def _layer_projection(lm: LensModel, layer: int, prompts: list[str], subjects: list[str], mixed: Tensor | None,
                      cfg: DamaConfig) -> tuple[Edit, dict]:
    """Layer ``layer``'s projection edit on the model as it is now (step 1-3 of the module docstring)."""
    u = collect_last(lm, prompts, f"L{layer}.mlp.post", cfg.batch_size)
    w = param_ref(lm.hf, f"L{layer}.mlp.down").weight_view(lm.hf).detach().double().cpu()
    x = u @ w.T
    d = mixed if mixed is not None else optimise_deltas(lm, prompts, subjects, f"L{layer}.mlp.out", cfg)
    if cfg.pairing == "difference":
        y = d[:, 0] - d[:, 1]
    else:
        x, y = torch.cat([x, x]), torch.cat([d[:, 0], d[:, 1]])
    m = nullspace_projection(pls_weights(x, y, cfg.null_dim))
    e = layer_edit(lm, layer, m, cfg.project_bias)
    e.meta["projection"] = m
    info = {"rank_removed": int(round(float(torch.trace(torch.eye(m.shape[0], dtype=m.dtype) - m)))),
            "v_norm": float(y.norm(dim=1).mean())}
    return e, info


def dama_edit(lm: LensModel, train_samples: Sequence[dict], cfg: DamaConfig, *, deltas: Tensor | None = None) -> Edit:
    """Compute DAMA's projection edit from profession prompts (the DAMA suite's train split).

    Returns one reversible :class:`Edit` of the down-projections of the chosen layers; the model
    is left unchanged (intermediate per-layer edits, needed because each layer is computed on
    the model with the earlier layers projected, are undone before returning). The returned edit
    carries ``.projections`` ({layer: M, float64}) and ``.deltas`` ([prompt, 2, d] or None).

    ``deltas`` (``update="mixed"`` only): reuse an earlier edit's ``.deltas``, computed on the
    unedited model with the same train samples, ``max_requests`` and ``seed``; in the mixed update
    they do not depend on ``null_dim`` or the layers, so a sweep needs one optimisation.
    """
    layers, samples = _layers_and_samples(lm, train_samples, cfg)
    prompts, subjects = [s["prompt"] for s in samples], [_subject(s) for s in samples]
    torch.manual_seed(cfg.seed)
    mixed = _mixed_deltas(lm, prompts, subjects, cfg, deltas)
    edits, handles, info = [], [], {}
    req = [p.requires_grad for p in lm.hf.parameters()]
    try:
        for layer in layers:
            e, info[layer] = _layer_projection(lm, layer, prompts, subjects, mixed, cfg)
            edits.append(e)
            handles.append(e.apply_(lm.hf))  # the next layer is computed on the model with this one projected
            log.info("DAMA layer %d: removed %d dims", layer, info[layer]["rank_removed"])
    finally:
        for h in reversed(handles):
            h.undo()
        for p, r in zip(lm.hf.parameters(), req):
            p.requires_grad_(r)
    projections = {layer: e.meta.pop("projection") for layer, e in zip(layers, edits)}
    out = edits[0]
    for e in edits[1:]:
        out = out.then(e)
    out.method = "dama"
    out.meta = {"variant": cfg.variant, "config": {k: v for k, v in asdict(cfg).items()}, "layers": list(layers),
                "n_train": len(samples), "per_layer": info,
                "deviations": "bare-prompt context, joint pronoun step, no early stop, no whitening"}
    out.projections = projections  # type: ignore[attr-defined]  # kept off meta (not JSON); for tests/analysis
    out.deltas = mixed  # type: ignore[attr-defined]
    return out
