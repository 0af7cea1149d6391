"""Row and neuron (weight-entry) scale locating by gradients (MSME Eq. 4 and Eq. 5).

**Row scale** (Eq. 4). For a module with weight W (HF ``[out, in]`` orientation; GPT-2's
``Conv1D`` is transposed to match, its fused qkv sliced) and targets (t0, t1) = (he, she)::

    Grad_t = d/dW  sum_prompts log p(t | prompt)          (at the prompt's last real token)
    I(R_r) = cos(Grad_t0[r, :], Grad_t1[r, :])

The paper calls the cosine the importance and keeps half of the rows. ``order="descending"``
(default, the literal reading) ranks rows by descending cosine; ``order="ascending"`` is the
opposite reading (rows where the he and she gradients conflict most come first). The choice is
recorded in ``LocateResult.variant`` and ``ascending``; ``extras["selected"]`` holds the kept rows
(the top ``keep`` fraction in the chosen order). A row whose gradient is zero for a target gets
cosine 0. Multi-token targets are represented by their *first* token (the gradient is of the
first token's log-prob); this is logged and recorded in ``extras["target_ids"]``.

Pair-of-texts form (``pair_texts``): the paper's samples are a male-inclined and a female-
inclined text; then ``Grad_male = d/dW sum_i log p(male_text_i)`` (the whole text's
log-likelihood, every token after the first predicted from its prefix) and likewise for the
female texts, and the cosine is taken between these two gradients.

**Neuron scale** (Eq. 5). Within the selected rows, *per prompt*::

    I(N_rc) = | g_t0[r, c] - g_t1[r, c] |,   g_t = d log p(t | prompt) / dW

each row keeps its top column per prompt; the union over prompts is the entry set (the
paper: 1,024 rows -> 2,500 entries). Scores are how many prompts chose the entry.

Efficiency. Only the module's weight requires grad while we run (every other parameter is
frozen, flags restored afterwards; gradients are taken with ``torch.autograd.grad`` so no
``.grad`` is left anywhere), so autograd builds no graph below the module. One forward and two
backward passes per batch (``retain_graph`` for the first). Only the last position is
unembedded. Per-prompt gradients are never formed by per-prompt backward passes: for a linear
map ``y = W x`` the per-example gradient is ``sum_pos dy[pos] x[pos]^T``, so a forward hook keeps
the module input x and autograd returns dy for the whole batch; one einsum restricted to the
selected rows gives every prompt's gradient. Right padding makes dy exactly zero at padding.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor, nn

from ..arch import ParamRef, get_submodule, param_ref, parse_module_name
from ..progress import bar, batch_count
from ..scoring import Batch, check_prompts, iter_batches, pad_right
from ..targets import TargetSet, resolve_targets
from .attribution import base_model
from .result import LocateResult

if TYPE_CHECKING:
    from ..lens import LensModel

log = logging.getLogger(__name__)
ORDERS = ("descending", "ascending")


# --------------------------------------------------------------------------- plumbing
@contextlib.contextmanager
def grad_only(model: nn.Module, param: nn.Parameter) -> Iterator[None]:
    """Temporarily make ``param`` the only parameter requiring grad (and eval mode); restore both."""
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    training = model.training
    try:
        for p in params:
            p.requires_grad_(p is param)
        model.eval()
        yield
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        model.train(training)


@contextlib.contextmanager
def capture_io(module: nn.Module, store: dict[str, Tensor]) -> Iterator[None]:
    """Keep the module's input (``x``) and output (``y``, still in the graph) of the last forward."""

    from ..hooks import module_hooks

    def hook(mod: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> None:
        store["x"], store["y"] = args[0], output

    with module_hooks(forward=[(module, hook)]):
        yield


def as_rows(ref: ParamRef, g: Tensor) -> Float[Tensor, "out in"]:
    """A gradient of the stored parameter in the module's ``[out, in]`` orientation (Conv1D, qkv slice)."""
    g = g.T if ref.transposed else g
    return g[ref.rows] if ref.rows is not None else g


def out_rows(ref: ParamRef, dy: Tensor) -> Tensor:
    """The module's own output features of an output gradient (GPT-2's fused qkv sliced)."""
    return dy[..., ref.rows] if ref.rows is not None else dy


def check_target_pair(lm: LensModel, targets: TargetSet | str | Sequence[str]) -> tuple[TargetSet, list[int]]:
    """The two single-token targets and their ids; ValueError unless there are exactly two single-token targets."""
    ts = targets if isinstance(targets, TargetSet) else resolve_targets(lm.tokenizer, targets)
    try:
        ts.require(n=2)
    except ValueError as err:
        raise type(err)(f"gradient locating needs exactly two distinct targets (e.g. he,she): {err}") from None
    if not ts.single_token:
        log.warning("multi-token targets %s: using the gradient of each target's first token", list(ts.words))
    return ts, ts.first_ids


@dataclass
class GradStep:
    """What one batch gives: the summed weight gradients and, when asked, the per-prompt factors."""

    g0: Float[Tensor, "out in"] | None
    g1: Float[Tensor, "out in"] | None
    diff: Float[Tensor, "batch pos out"] | None  # dy_t0 - dy_t1 (module output grads)
    x: Float[Tensor, "batch pos in"] | None  # module input
    rows: list[int]


def upcast(t: Tensor) -> Tensor:
    """At least float32 (half-precision logits are upcast; float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _prompt_losses(lm, b: Batch, tid: list[int]) -> tuple[Tensor, Tensor]:
    """Summed log p(t0), log p(t1) at the last real token (only that position is unembedded)."""
    h = base_model(lm)(**b.model_inputs())[0]
    last = h[torch.arange(h.shape[0], device=h.device), b.last.to(h.device)]
    lp = torch.log_softmax(upcast(lm.logits_from_normed(last)), -1)
    return lp[:, tid[0]].sum(), lp[:, tid[1]].sum()


def text_loglik(logits: Float[Tensor, "batch pos d_vocab"], ids: Int[Tensor, "batch pos"], mask: Tensor) -> Float[Tensor, " batch"]:
    """log-likelihood of each right-padded text: sum over tokens 1..n-1 of log p(x_t | x_<t)."""
    nll = F.cross_entropy(upcast(logits[:, :-1]).transpose(1, 2), ids[:, 1:], reduction="none")
    return -(nll * mask[:, 1:]).sum(1)


def grad_steps(
    lm: LensModel, ref: ParamRef, batches: Iterator[tuple[list[int], Callable[[], tuple[Tensor, Tensor]]]], *,
    weights: bool = True, factors: bool = False,
) -> Iterator[GradStep]:
    """Run ``loss_fn`` per batch (one forward) and take two backward passes w.r.t. W (and/or y)."""
    hf = lm.hf
    W = hf.get_parameter(ref.weight_name)
    module = get_submodule(hf, ref.weight_name.rsplit(".", 1)[0])
    store: dict[str, Tensor] = {}
    # enable_grad: callers may sit inside torch.no_grad() (e.g. a notebook cell or the benchmark harness)
    with torch.enable_grad(), grad_only(hf, W), capture_io(module, store):
        for rows, loss_fn in batches:
            l0, l1 = loss_fn()
            inputs = ([W] if weights else []) + ([store["y"]] if factors else [])
            r0 = torch.autograd.grad(l0, inputs, retain_graph=True)
            r1 = torch.autograd.grad(l1, inputs)
            g0 = as_rows(ref, r0[0]).double() if weights else None
            g1 = as_rows(ref, r1[0]).double() if weights else None
            diff = out_rows(ref, r0[-1] - r1[-1]).detach() if factors else None
            x = store["x"].detach() if factors else None
            store.clear()
            yield GradStep(g0, g1, diff, x, rows)


def _prompt_batches(lm, prompts: Sequence[str], tid: list[int], batch_size: int):
    for b in iter_batches(lm.tokenizer, prompts, batch_size, device=lm.device):
        yield b.rows, (lambda b=b: _prompt_losses(lm, b, tid))


def _pair_batches(lm, pairs: Sequence[tuple[str, str]], batch_size: int):
    tok = lm.tokenizer
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start : start + batch_size]
        texts = [m for m, _ in chunk] + [f for _, f in chunk]
        ids, mask = pad_right(tok(texts)["input_ids"], tok.pad_token_id or 0, lm.device)
        n = len(chunk)

        def loss_fn(ids=ids, mask=mask, n=n) -> tuple[Tensor, Tensor]:
            ll = text_loglik(lm.hf(input_ids=ids, attention_mask=mask).logits, ids, mask)
            return ll[:n].sum(), ll[n:].sum()

        yield list(range(start, start + n)), loss_fn


def _check_pairs(lm, pair_texts: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
    pairs = [tuple(p) for p in pair_texts]
    if not pairs:
        raise ValueError("pair_texts is empty; pass (male_text, female_text) tuples")
    for i, p in enumerate(pairs):
        if len(p) != 2 or not all(isinstance(t, str) and t.strip() for t in p):
            raise ValueError(f"pair_texts[{i}] must be two non-empty texts (male-inclined, female-inclined)")
        if any(len(lm.tokenizer(t)["input_ids"]) < 2 for t in p):
            raise ValueError(f"pair_texts[{i}]: each text needs at least two tokens to have a log-likelihood")
    return pairs  # type: ignore[return-value]


def row_cosines(g0: Float[Tensor, "out in"], g1: Float[Tensor, "out in"]) -> Float[Tensor, " out"]:
    """cos(g0[r], g1[r]) per row; 0 where either row is exactly zero."""
    dot = (g0 * g1).sum(1)
    den = g0.norm(dim=1) * g1.norm(dim=1)
    return torch.where(den > 0, dot / den.clamp_min(torch.finfo(den.dtype).tiny), torch.zeros_like(dot))


# --------------------------------------------------------------------------- row scale
def _row_result(lm, module: str, ref: ParamRef, g0: Tensor, g1: Tensor, n: int, order: str, keep: float,
                variant: str, words: list[str], tid: list[int] | None) -> LocateResult:
    cos = row_cosines(g0, g1)
    labels = [f"{module}/row{r}" for r in range(cos.shape[0])]
    res = LocateResult("row", labels, cos, variant=f"{variant},cosine-{order},keep={keep:g}",
                       ascending=order == "ascending", model=lm.name, n_samples=n)
    k = max(1, int(round(keep * len(labels))))
    sel = sorted(res.order()[:k])
    res.extras.update({
        "module": module, "order": order, "keep": keep, "n_rows": len(labels), "n_selected": k,
        "selected": [labels[r] for r in sel], "selected_rows": sel, "targets": words,
        "target_ids": tid, "grad_norm": [g0.norm(dim=1).float(), g1.norm(dim=1).float()],
    })
    return res


def _check_opts(order: str, keep: float, batch_size: int) -> None:
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be a fraction in (0, 1], got {keep}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def module_of(module: str | LocateResult | None, caller: str) -> str:
    """The module label a gradient locator works on: given, or the top weight-matrix label of a
    module-scale result (labels that are whole blocks/sub-blocks, ``L3.attn``, are skipped).

    There is no model-specific default: a module must be named or located first.
    """
    if isinstance(module, LocateResult):
        for lab in module.top_labels(len(module.labels)):
            try:
                parse_module_name(lab)
            except ValueError:
                continue
            return lab
        raise ValueError(f"{caller}: the {module.method} result holds no weight-matrix label (L{{l}}.attn.q ... "
                         "L{l}.mlp.down); pass a module_scale result or a module label")
    if module is None:
        raise ValueError(f"{caller} needs module=: a module label such as 'L3.mlp.down', or a module_scale "
                         "LocateResult (its top weight-matrix module is used)")
    return module


def row_scale(
    lm: LensModel, prompts: Sequence[str] | None, module: str | LocateResult | None = None, targets: TargetSet | str = "he,she", *,
    order: str = "descending", pair_texts: Sequence[tuple[str, str]] | None = None, keep: float = 0.5,
    batch_size: int = 32, progress: bool = False,
) -> LocateResult:
    """Row cosines ``cos(Grad_t0[r], Grad_t1[r])`` of ``module``'s weight (labels ``{module}/row{r}``).

    ``module`` is required: a module label (``"L{l}.mlp.down"``) or a module-scale
    :class:`LocateResult`, whose top weight-matrix label is used (:func:`module_of`).
    Pass ``prompts`` (targets at the last token) or ``pair_texts`` (``prompts=None``), not both.
    ``progress=True`` shows a bar over the forward/backward batches.
    """
    _check_opts(order, keep, batch_size)
    module = module_of(module, "row_scale")
    ref = param_ref(lm.hf, module)
    if pair_texts is not None:
        if prompts:
            raise ValueError("pass either prompts or pair_texts, not both")
        pairs = _check_pairs(lm, pair_texts)
        steps = grad_steps(lm, ref, _pair_batches(lm, pairs, batch_size))
        words, tid, variant, n = ["male-text", "female-text"], None, "pair-texts", len(pairs)
    else:
        prompts = check_prompts(prompts or [])
        ts, tid = check_target_pair(lm, targets)
        steps = grad_steps(lm, ref, _prompt_batches(lm, prompts, tid, batch_size))
        words, variant, n = list(ts.words), "prompt-targets", len(prompts)
    g0 = g1 = None
    for s in bar(steps, total=batch_count(n, batch_size), desc=f"row gradients {module}", enabled=progress, unit="batch"):
        g0 = s.g0 if g0 is None else g0 + s.g0
        g1 = s.g1 if g1 is None else g1 + s.g1
    return _row_result(lm, module, ref, g0, g1, n, order, keep, variant, words, tid)


# --------------------------------------------------------------------------- neuron scale
def entry_choices(
    diff: Float[Tensor, "batch pos out"], x: Float[Tensor, "batch pos in"], rows: Int[Tensor, " row"]
) -> tuple[Int[Tensor, "batch row"], Float[Tensor, "batch row"]]:
    """Per prompt and selected row: the column maximising |g_t0 - g_t1| and that value."""
    g = torch.einsum("bpr,bpi->bri", upcast(diff[..., rows.to(diff.device)]), upcast(x)).abs()
    val, col = g.max(-1)
    return col.cpu(), val.double().cpu()


def _selected_rows(rows, module: str, n_out: int) -> list[int]:
    if isinstance(rows, LocateResult):
        if rows.extras.get("module") not in (None, module):
            raise ValueError(f"rows come from {rows.extras.get('module')}, not {module}; pass module={rows.extras.get('module')!r}")
        rows = rows.extras.get("selected_rows")
        if rows is None:
            raise ValueError("the LocateResult has no extras['selected_rows']; pass a row_scale result or row indices")
    rows = sorted({int(r) for r in rows})
    if not rows or not all(0 <= r < n_out for r in rows):
        raise ValueError(f"rows must be a non-empty list of row indices in 0..{n_out - 1}")
    return rows


def neuron_scale(
    lm: LensModel, prompts: Sequence[str], module: str | LocateResult | None = None, targets: TargetSet | str = "he,she", *,
    rows: Sequence[int] | LocateResult | None = None, order: str = "descending", keep: float = 0.5,
    batch_size: int = 32, progress: bool = False,
) -> LocateResult:
    """Entry set of Eq. 5 (labels ``{module}/row{r}/col{c}``, scores = number of prompts choosing it).

    ``rows=None`` selects rows with :func:`row_scale` (``order``, ``keep``) from the *same* forward
    and backward passes: per-batch output-gradient differences and module inputs are kept (memory
    ``prompts x pos x (out + in)`` floats) until the rows are known. The row result is in
    ``extras["row_result"]``. ``progress=True`` shows a bar over the forward/backward batches.
    ``module`` is required, as in :func:`row_scale`; with ``rows`` a row-scale result and no
    ``module``, the result's module is used.
    """
    _check_opts(order, keep, batch_size)
    prompts = check_prompts(prompts)
    if module is None and isinstance(rows, LocateResult) and rows.extras.get("module"):
        module = rows.extras["module"]
    module = module_of(module, "neuron_scale")
    ref = param_ref(lm.hf, module)
    ts, tid = check_target_pair(lm, targets)
    n_out, n_in = ref.weight_view(lm.hf).shape
    sel = None if rows is None else torch.as_tensor(_selected_rows(rows, module, n_out))
    P = len(prompts)
    kept: list[GradStep] = []
    cols = vals = None
    g0 = g1 = None
    row_res = None

    def consume(s: GradStep, sel: Tensor) -> None:
        nonlocal cols, vals
        c, v = entry_choices(s.diff, s.x, sel)
        if cols is None:
            cols, vals = torch.empty(P, len(sel), dtype=torch.long), torch.empty(P, len(sel), dtype=torch.float64)
        cols[s.rows], vals[s.rows] = c, v

    batches = _prompt_batches(lm, prompts, tid, batch_size)
    steps = grad_steps(lm, ref, batches, weights=sel is None, factors=True)
    for s in bar(steps, total=batch_count(P, batch_size), desc=f"entry gradients {module}", enabled=progress, unit="batch"):
        if sel is not None:
            consume(s, sel)
            continue
        g0 = s.g0 if g0 is None else g0 + s.g0
        g1 = s.g1 if g1 is None else g1 + s.g1
        kept.append(GradStep(None, None, s.diff, s.x, s.rows))
    if sel is None:
        row_res = _row_result(lm, module, ref, g0, g1, P, order, keep, "prompt-targets", list(ts.words), tid)
        sel = torch.as_tensor(row_res.extras["selected_rows"])
        for s in kept:
            consume(s, sel)
        kept.clear()
    return _entry_result(lm, module, sel, cols, vals, n_in, list(ts.words), row_res)


def _entry_result(lm, module: str, sel: Tensor, cols: Tensor, vals: Tensor, width: int, words: list[str],
                  row_res: LocateResult | None) -> LocateResult:
    P, R = cols.shape
    key = sel[None, :].expand(P, R) * width + cols  # unique id of (row, col) per choice, row-major
    uniq, inv, counts = torch.unique(key.flatten(), return_inverse=True, return_counts=True)
    vmax = torch.zeros(len(uniq), dtype=torch.float64).scatter_reduce(0, inv, vals.flatten(), "amax", include_self=False)
    vsum = torch.zeros(len(uniq), dtype=torch.float64).index_add(0, inv, vals.flatten())
    labels = [f"{module}/row{int(u) // width}/col{int(u) % width}" for u in uniq]
    extras = {
        "module": module, "n_entries": len(labels), "n_rows": R, "rows": sel.tolist(), "n_cols": width, "targets": words,
        "max_importance": vmax, "mean_importance": vsum / counts,
        "choices": cols, "selected": list(labels),
    }
    if row_res is not None:
        extras["row_result"] = {"variant": row_res.variant, "selected_rows": row_res.extras["selected_rows"]}
    return LocateResult("neuron", labels, counts.double(), variant="top-entry-per-row-per-prompt,count",
                        model=lm.name, n_samples=P, extras=extras)
