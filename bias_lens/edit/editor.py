"""BiasEdit's editors (Xu et al. 2025, arXiv 2503.08588; code ``zjunlp/BiasEdit``, MALMEN-style).

An :class:`Editor` holds one :class:`~bias_lens.edit.editor_nets.EditorNet` per weight shape
(``shared=True``, the reference) or per edited matrix (``shared=False``), for the matrices named by
our module labels (default: ``mlp.down`` of the top three blocks, the reference's ``last123``).
The language model stays frozen; only the editors train (:mod:`bias_lens.edit.editor_train`).

Editing from a batch of requests (StereoSet items), as the reference's ``cache`` +
``predict_param_shifts``:

1. :func:`trace`: one forward of the requests' anti-stereotype and stereotype sentences and the
   debiasing loss's gradient at every edited matrix's output. Kept per token: the matrix input
   ``u`` (key) and the output gradient ``dv`` (value gradient), at the token positions the
   reference caches (``positions="labels"``: every scored target token's own position, i.e.
   sentence tokens 1..n-1 after the prefix; ``"predicting"``: the positions whose logits are
   scored, 0..n-2 -- the alternative, since position t's output predicts token t+1).
2. :func:`predict_shift`: ``(u~, dv~) = net(u, dv)``; ``c = -lr_m <u, u~>``; value differences
   ``d = c * dv~``; the shift solves the ridge problem ``(U^T U + e^lamda I) dW = U^T D`` over all
   the batch's tokens (``dW`` is ``[in, out]``; the matrix becomes ``W + dW^T`` in ``[out, in]``).
   Differentiable: meta-training backpropagates through it (autograd gives the reference's
   hand-written ``update_hypernet`` gradients; tested).
3. :func:`editor_edit`: the shifts as an ordinary, reversible :class:`~bias_lens.edit.edits.Edit`.

Editors save as ``editor.safetensors`` + ``editor.json`` (:meth:`Editor.save` / :meth:`Editor.load`),
never pickle.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from jaxtyping import Float
from torch import Tensor, nn

from ..arch import param_ref, parse_module_name
from .editor_nets import EditorNet

if TYPE_CHECKING:
    from ..lens import LensModel
    from .editor_train import Encoded

POSITIONS = ("labels", "predicting")
DEBIAS_LOSSES = ("mean_prob_kl", "pair_kl")
RETENTION_LOSSES = ("mean_prob_kl", "token_kl")


@dataclass(frozen=True)
class EditorConfig:
    """Every editor option. Defaults: the reference's ``config/alg/malmen.yaml`` step-size init
    ``lr`` 1e-6 and ``meta_lr`` 1e-5 (its ``gpt2m.sh`` run overrides them with 1e-7 / 1e-6: ten
    times smaller steps, for far more epochs than the 25-minute budget here allows; not measured
    here), ``loc_coef`` 1.0 (``gpt2m.sh``;
    malmen.yaml has 4), ``n_edits`` 64 (the paper's batch size), the top three ``mlp.down``.

    ``modules``: our labels of the edited matrices (``None``: ``mlp.down`` of the top ``top``
    blocks). ``n_edits``: requests per shift (the paper's batch size). ``chunk``: requests per
    forward (memory only; the reference's ``data.batch_size``; losses are summed over chunks as
    there). ``loss``: ``mean_prob_kl`` = the reference's ``KLDivLoss(batchmean)`` applied to
    per-sentence mean log-probability (input) and mean token probability (target), symmetrised;
    ``pair_kl`` = a symmetric KL between the two-sentence distributions softmax(mean log-probs).
    ``retention``: ``mean_prob_kl`` = the reference's KLDivLoss on the unrelated sentences' mean
    log-prob / mean prob; ``token_kl`` = KL(unedited || edited) of the next-token distributions
    at the unrelated sentences' scored positions. ``loc_coef=0`` is the paper's "w/o retention"."""

    modules: tuple[str, ...] | None = None
    top: int = 3
    rank: int = 1920
    n_blocks: int = 2
    lr: float = 1e-6
    meta_lr: float = 1e-5
    loc_coef: float = 1.0
    n_edits: int = 64
    chunk: int = 32
    max_grad_norm: float = 1.0
    epochs: int = 100
    patience: int = 5
    max_minutes: float | None = 25.0
    shared: bool = True
    positions: str = "labels"
    loss: str = "mean_prob_kl"
    retention: str = "mean_prob_kl"
    prefix: str = "bos"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("top", "rank", "n_blocks", "n_edits", "chunk", "epochs", "patience"):
            if getattr(self, name) < 1:
                raise ValueError(f"editor {name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.meta_lr > 0 and self.max_grad_norm > 0):
            raise ValueError("editor lr, meta-lr and max-grad-norm must be > 0")
        if self.loc_coef < 0:
            raise ValueError(f"loc-coef must be >= 0 (0 = no retention loss), got {self.loc_coef}")
        for name, allowed in (("positions", POSITIONS), ("loss", DEBIAS_LOSSES), ("retention", RETENTION_LOSSES)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"editor {name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.max_minutes is not None and not self.max_minutes > 0:
            raise ValueError("max-minutes must be > 0")

    def module_labels(self, n_layers: int) -> tuple[str, ...]:
        """The edited matrices: ``modules``, or ``mlp.down`` of the top ``top`` blocks (ascending)."""
        if self.modules is not None:
            return tuple(self.modules)
        if self.top > n_layers:
            raise ValueError(f"top {self.top} exceeds the model's {n_layers} blocks")
        return tuple(f"L{layer}.mlp.down" for layer in range(n_layers - self.top, n_layers))


class Editor(nn.Module):
    """The editor networks of one model's edited matrices (see the module docstring)."""

    def __init__(self, lm: LensModel, config: EditorConfig) -> None:
        super().__init__()
        self.config = config
        self.labels = config.module_labels(lm.n_layers)
        if not self.labels or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"editor modules must be distinct and non-empty, got {list(self.labels)}")
        shapes: dict[str, tuple[int, int]] = {}
        for label in self.labels:
            ref = param_ref(lm.hf, label)
            if ref.rows is not None:
                raise ValueError(f"{label} is a slice of a fused weight; the editor edits whole matrices (use mlp.*)")
            out_dim, in_dim = ref.weight_view(lm.hf).shape
            shapes[label] = (int(in_dim), int(out_dim))
        self.shapes = shapes
        key = (lambda lab: str(shapes[lab])) if config.shared else (lambda lab: lab.replace(".", "_"))
        counts: Counter = Counter()
        self.slot: dict[str, tuple[str, int]] = {}
        for label in self.labels:
            self.slot[label] = (key(label), counts[key(label)])
            counts[key(label)] += 1
        torch.manual_seed(config.seed)
        first = {k: lab for lab in reversed(self.labels) for k in [key(lab)]}
        self.nets = nn.ModuleDict({k: EditorNet(*shapes[first[k]], min(config.rank, sum(shapes[first[k]])),
                                                config.n_blocks, n, config.lr) for k, n in counts.items()})

    @property
    def lowest_layer(self) -> int:
        """The lowest block holding an edited matrix (everything below it is unchanged by an edit)."""
        return min(parse_module_name(label)[0] for label in self.labels)

    def net_of(self, label: str) -> tuple[EditorNet, Tensor]:
        """The net editing ``label`` and its module index in that net."""
        k, i = self.slot[label]
        return self.nets[k], torch.tensor([i])

    def save(self, folder: str | Path) -> Path:
        """Write ``editor.safetensors`` (weights and normaliser buffers) and ``editor.json`` atomically."""
        from safetensors.torch import save

        from ..io import atomic_write_bytes, atomic_write_text

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_write_bytes(folder / "editor.safetensors", save(state))
        meta = {"config": {**asdict(self.config), "modules": list(self.labels)}, "format": "bias_lens.editor/1"}
        atomic_write_text(folder / "editor.json", json.dumps(meta, indent=2))
        return folder

    @classmethod
    def load(cls, lm: LensModel, folder: str | Path) -> "Editor":
        """The editor saved by :meth:`save` for a model of the same shapes (one clear error otherwise)."""
        from safetensors.torch import load_file

        folder = Path(folder)
        files = (folder / "editor.json", folder / "editor.safetensors")
        if not all(f.is_file() for f in files):
            raise ValueError(f"{folder} holds no saved editor (needs editor.json and editor.safetensors)")
        try:
            meta = json.loads(files[0].read_text())
            if meta.get("format") != "bias_lens.editor/1":
                raise ValueError(f"unknown format {meta.get('format')!r}")
            cfg = dict(meta["config"])
            cfg["modules"] = tuple(cfg["modules"])
            config = EditorConfig(**cfg)
        except (ValueError, KeyError, TypeError, AttributeError) as err:  # JSONDecodeError is a ValueError
            raise ValueError(f"{files[0]} is not a bias_lens editor config: {err}") from err
        try:
            editor = cls(lm, config)
        except (ValueError, KeyError, AttributeError, IndexError) as err:
            raise ValueError(f"editor in {folder} does not fit this model: {err}") from err
        try:
            state = load_file(str(files[1]))
        except Exception as err:  # safetensors raises its own SafetensorError on a corrupted file
            raise ValueError(f"{files[1]} is corrupted or not a safetensors file: {err}") from err
        want = {k: tuple(v.shape) for k, v in editor.state_dict().items()}
        got = {k: tuple(v.shape) for k, v in state.items()}
        if want != got:
            raise ValueError(f"editor in {folder} does not fit this model's matrices {list(editor.labels)}")
        editor.load_state_dict(state)
        return editor


def predict_shift(net: EditorNet, idx: Tensor, keys: Float[Tensor, "token key"],
                  values_grad: Float[Tensor, "token value"]) -> Float[Tensor, "key value"]:
    """The reference's ``predict_param_shifts`` for one matrix (differentiable; see step 2 above)."""
    pk, pv = net(keys, values_grad, idx)
    coeffs = -net.lr(idx) * (keys * pk).sum(-1, keepdim=True)
    mat = keys.T @ keys + net.lamda(idx).exp() * torch.eye(net.key_size, dtype=keys.dtype)
    return torch.linalg.solve(mat, keys.T @ (coeffs * pv))


@contextmanager
def shifted(lm: LensModel, shifts: dict[str, Tensor]) -> Iterator[None]:
    """Forwards inside see every matrix ``W + dW^T`` (its output plus ``u @ dW``), weights untouched,
    so gradients reach ``dW`` (and through it the editors)."""
    handles = []
    for label, dw in shifts.items():
        layer, kind = parse_module_name(label)

        def hook(module, args, output, _dw=dw):
            return output + args[0] @ _dw.to(output.dtype)

        handles.append(lm.submodule(layer, kind).register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def position_mask(enc: Encoded, positions: str) -> Tensor:
    """The token positions whose (key, value gradient) rows are kept; see ``positions`` above."""
    target = enc.scored  # [b, pos]: True at every scored target token
    if positions == "labels":
        return target
    pred = torch.zeros_like(target)
    pred[:, :-1] = target[:, 1:]
    return pred


def trace(lm: LensModel, editor: Editor, encs: Sequence[Encoded], loss_fn: Any) -> dict[str, tuple[Tensor, Tensor]]:
    """Keys and value gradients of every edited matrix over the chunks ``encs`` (each an edit
    batch: anti-stereotype rows then stereotype rows); ``loss_fn(enc, logits)`` is the debiasing loss."""
    from .editor_train import scored_logits

    out: dict[str, list[tuple[Tensor, Tensor]]] = {lab: [] for lab in editor.labels}
    for enc in encs:
        io: dict[str, tuple[Tensor, Tensor]] = {}

        def grab(label):
            def hook(module, args, output):
                y = output if output.requires_grad else output.detach().requires_grad_()
                io[label] = (args[0].detach(), y)
                return y
            return hook

        handles = [lm.submodule(*parse_module_name(lab)).register_forward_hook(grab(lab)) for lab in editor.labels]
        try:
            with torch.enable_grad():
                loss = loss_fn(enc, scored_logits(lm, enc, editor.lowest_layer))
                grads = torch.autograd.grad(loss, [io[lab][1] for lab in editor.labels])
        finally:
            for h in handles:
                h.remove()
        keep = position_mask(enc, editor.config.positions)
        for lab, g in zip(editor.labels, grads):
            out[lab].append((io[lab][0][keep].float(), g[keep].float()))
    return {lab: (torch.cat([k for k, _ in v]), torch.cat([g for _, g in v])) for lab, v in out.items()}


def shifts_from(editor: Editor, traced: dict[str, tuple[Tensor, Tensor]]) -> dict[str, Tensor]:
    """Every edited matrix's shift ``dW`` ([in, out]) from its traced keys and value gradients."""
    return {lab: predict_shift(*editor.net_of(lab), *traced[lab]) for lab in editor.labels}


def editor_edit(lm: LensModel, editor: Editor, requests: Sequence[dict], *, method: str = "editor",
                scale: float = 1.0) -> Any:
    """The editors' shift for ``requests`` (StereoSet rows) as one reversible :class:`Edit` of the
    edited weights (model unchanged on return). ``scale`` multiplies the predicted shift (1 = the
    reference; a post-hoc strength knob, not in the paper, for the trade-off sweep)."""
    if not scale > 0:
        raise ValueError(f"shift scale must be > 0, got {scale}")
    from .editor_train import debias_loss_fn, encode_edit

    if not requests:
        raise ValueError("an editor edit needs at least one request (StereoSet item)")
    encs = encode_edit(lm, requests, editor.config, prefix_from=editor.lowest_layer)
    with torch.no_grad():
        shifts = {k: scale * v.detach() for k, v in shifts_from(editor, trace(lm, editor, encs, debias_loss_fn(editor.config))).items()}
    return shift_edit(lm, shifts, method=method, meta={"modules": list(editor.labels), "n_requests": len(requests),
                                                       "config": asdict(editor.config), "scale": scale})


def shift_edit(lm: LensModel, shifts: dict[str, Tensor], *, method: str, meta: dict[str, Any]) -> Any:
    """``W + dW^T`` for every ``label -> dW`` as an :class:`Edit` over the whole weight tensors."""
    from .edits import Edit
    from .masks import ParamMask

    news, masks = {}, {}
    for label, dw in shifts.items():
        ref = param_ref(lm.hf, label)
        w = dict(lm.hf.named_parameters())[ref.weight_name]
        delta = dw if ref.transposed else dw.T  # stored layout: Conv1D [in, out], Linear [out, in]
        news[ref.weight_name] = (w.detach().double() + delta.double()).to(w.dtype)
        masks[ref.weight_name] = torch.ones(w.shape, dtype=torch.bool)
    return Edit.from_tensors(lm.hf, ParamMask(masks), news, method=method, meta=meta)
