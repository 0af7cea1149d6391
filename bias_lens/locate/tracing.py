"""Bias tracing: ROME's causal tracing applied to the stereotyped vs anti-stereotyped gap (BiasEdit).

For each StereoSet pair (:mod:`bias_lens.locate.tracing_data`) both sentences are run three ways:

* **clean**: the gap ``|mean logp(anti) - mean logp(stereo)|`` where a sentence's score is the mean
  teacher-forced log-probability of its tokens after the BOS (BiasEdit's ``causal_difference``:
  every token, the subject and attribute tokens included, predicted from its prefix);
* **corrupted**: Gaussian noise ``noise_scale x std`` (ROME's "s3": 3 x the std of the input
  embeddings over a corpus, :func:`~bias_lens.locate.tracing_data.embedding_std`) is *added* to the
  input embeddings of the bias-attribute ("subject") tokens, ``n_noise`` samples per sentence, and
  the scores are averaged over samples before the gap is taken;
* **restored**: the corrupted run with some clean activations written back: the block output
  ``L{l}.resid_post`` at one (layer, position), or ``L{l}.mlp.out`` / ``L{l}.attn.out`` at one
  position for a window of ``window`` layers centred on ``l`` (ROME's ``[l - w//2, l + ceil(w/2))``,
  clipped; 10 as in ROME and BiasEdit). A restoration at position ``t`` restores both sentences at
  ``t`` (they have the same length), as BiasEdit does.

``restored[c, l, t]`` is the gap after restoration (BiasEdit's ``scores``); ``recovery`` is the
fraction of the lost gap that comes back, ``(restored - corrupted) / (clean - corrupted)``.

Noise: each sentence gets its noise from a fresh ``torch.Generator`` seeded with ``seed``, one
``randn(n_noise, e - b, d_model)`` draw (float64) per subject span in span order, added (spans that
overlap get both draws). So the two sentences of an item, every restoration and every item get the
same noise, which is what BiasEdit does with ``numpy.random.RandomState(1)`` in every call.

Literal reading (the default, BiasEdit's code) and the alternatives (``variant`` records them):
``gap="abs"`` (literal) or ``"signed"`` (``logp(stereo) - logp(anti)``, > 0 = stereotype preferred);
``noise_mode="add"`` (literal) or ``"replace"`` (BiasEdit's ``--replace 1``: the embedding is
replaced by the noise); ``prefix`` / ``span`` of :func:`~bias_lens.locate.tracing_data.prepare_item`.

Speed: the clean activations are recorded once per item; every restoration is a group of
``2 x n_noise`` batch rows (the same corrupted inputs) and many restorations share one forward pass
(``batch_size`` rows), each row patched at its own (layer, position) by one hook per layer. Hooks go
through :func:`bias_lens.hooks.apply_hooks`; the corruption is passed as ``inputs_embeds``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float
from torch import Tensor

from ..hooks import HookInfo, apply_hooks, record_into
from .result import LocateResult, _jsonable
from .tracing_data import TraceItem, embedding_std, knowns, prepare_item

log = logging.getLogger(__name__)

COMPONENTS = {"resid": "resid_post", "mlp": "mlp.out", "attn": "attn.out"}
ROLES = ("subject", "before_attr", "attr", "last", "all")
Spec = tuple[tuple[str, int], ...]  # ((hook point, position), ...) restored together


def window_layers(layer: int, n_layers: int, window: int) -> range:
    """ROME's window of ``window`` layers around ``layer``: ``[l - w//2, l + ceil(w/2))`` clipped."""
    return range(max(0, layer - window // 2), min(n_layers, layer - (-window // 2)))


def make_noise(spans: Sequence[tuple[int, int]], n_noise: int, d_model: int, *, std: float, seed: int) -> list[Tensor]:
    """The noise of one sentence: one float64 ``randn(n_noise, e - b, d)`` x ``std`` per span, in order."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn((n_noise, e - b, d_model), generator=g, dtype=torch.float64) * std for b, e in spans]


def _restore_rows(clean: dict[str, Tensor], plan: dict[str, tuple[Tensor, Tensor, Tensor]]):
    """Hook writing clean values back: ``plan[point] = (rows, positions, sentence)`` index tensors."""

    def restore(t: Tensor, *, hook: HookInfo) -> Tensor:
        """restore clean activations"""
        rows, pos, sent = (x.to(t.device) for x in plan[hook.name])
        out = t.clone()
        out[rows, pos] = clean[hook.name][sent, pos].to(out)
        return out

    return [(p, restore) for p in plan]


def _scores(logits: Float[Tensor, "batch pos d_vocab"], targets: Tensor) -> Float[Tensor, " batch"]:
    """Mean log-probability of ``targets[:, 1:]`` predicted from the previous positions."""
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return lp.gather(-1, targets[:, 1:, None]).squeeze(-1).double().mean(-1)


def _gap(anti: Tensor, stereo: Tensor, gap: str) -> Tensor:
    return (anti - stereo).abs() if gap == "abs" else stereo - anti


@torch.no_grad()
def restored_gaps(lm: Any, item: TraceItem, specs: Sequence[Spec], *, noise_std: float, n_noise: int = 10,
                  seed: int = 0, batch_size: int = 64, gap: str = "abs", noise_mode: str = "add",
                  ) -> tuple[float, Tensor]:
    """``(clean gap, gaps[spec])`` for one item: each spec's restorations on the corrupted run.

    An empty spec ``()`` gives the corrupted gap. Points in specs are our hook names
    (``L3.resid_post``, ``L3.mlp.out``, ``L3.attn.out``); positions index the item's tokens.
    """
    dev = lm.device
    ids = torch.tensor([item.anti_ids, item.stereo_ids], device=dev)
    points = sorted({p for spec in specs for p, _ in spec})
    clean: dict[str, Tensor] = {}
    with apply_hooks(lm, record_into(clean, points)):
        clean_scores = _scores(lm.hf(input_ids=ids).logits, ids)
    clean_gap = float(_gap(clean_scores[0], clean_scores[1], gap))
    emb = lm.embed(ids)  # [2, pos, d]
    noisy = emb[:, None].expand(2, n_noise, *emb.shape[1:]).clone()  # [2, S, pos, d]
    for k, spans in enumerate((item.anti_spans, item.stereo_spans)):
        for (b, e), z in zip(spans, make_noise(spans, n_noise, emb.shape[-1], std=noise_std, seed=seed)):
            z = z.to(noisy)
            noisy[k, :, b:e] = z if noise_mode == "replace" else noisy[k, :, b:e] + z
    per = 2 * n_noise
    group = max(1, batch_size // per)
    out = torch.empty(len(specs), dtype=torch.float64)
    targets_all = ids[:, None].expand(2, n_noise, ids.shape[1])
    for start in range(0, len(specs), group):
        chunk = specs[start:start + group]
        G = len(chunk)
        x = noisy[None].expand(G, *noisy.shape).reshape(G * per, *noisy.shape[2:])
        lists: dict[str, list[list[int]]] = {}
        for i, spec in enumerate(chunk):
            for p, t in spec:
                r, q, s = lists.setdefault(p, [[], [], []])
                for k in range(2):
                    for j in range(n_noise):
                        r.append((i * 2 + k) * n_noise + j)
                        q.append(t)
                        s.append(k)
        plan = {p: tuple(torch.tensor(v) for v in rqs) for p, rqs in lists.items()}
        with apply_hooks(lm, _restore_rows(clean, plan)):
            logits = lm.hf(inputs_embeds=x).logits
        tg = targets_all[None].expand(G, *targets_all.shape).reshape(G * per, -1)
        sc = _scores(logits, tg).view(G, 2, n_noise).mean(-1).cpu()
        out[start:start + G] = _gap(sc[:, 0], sc[:, 1], gap)
    return clean_gap, out


@dataclass
class ItemTrace:
    """One item's trace: ``restored[component, layer, pos]`` gaps, the clean and corrupted gaps."""

    id: str
    tokens: list[str]
    subject: list[str]
    corrupted_positions: list[int]
    attr_positions: list[int]
    clean_gap: float
    corrupted_gap: float
    restored: Tensor

    @property
    def recovery(self) -> Tensor:
        """``(restored - corrupted) / (clean - corrupted)``: 1 = the whole lost gap came back."""
        return (self.restored - self.corrupted_gap) / (self.clean_gap - self.corrupted_gap)

    def role_positions(self) -> dict[str, list[int]]:
        """Positions per role: corrupted subject tokens, the token before the attribute term, the
        attribute term (where the two sentences differ), the last token, and all tokens."""
        before = [self.attr_positions[0] - 1] if self.attr_positions and self.attr_positions[0] > 0 else []
        return {"subject": self.corrupted_positions, "before_attr": before, "attr": self.attr_positions,
                "last": [len(self.tokens) - 1], "all": list(range(len(self.tokens)))}


@dataclass
class TraceResult:
    """Per-item traces plus the settings that produced them; :meth:`by_role` averages over items."""

    components: tuple[str, ...]
    items: list[ItemTrace]
    n_layers: int
    noise_std: float
    noise_scale: float
    n_noise: int
    window: int
    seed: int
    variant: str
    model: str = ""
    n_skipped: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    def by_role(self) -> dict[str, dict[str, Tensor]]:
        """Per role: mean restored gap ``[component, layer]`` over every (item, position) of the role
        (BiasEdit's ``fig.py``), the mean clean / corrupted gap over the same pairs, and the recovery
        ``(restored - corrupted) / (clean - corrupted)`` of those means."""
        out = {}
        for role in ROLES:
            rows, cl, co = [], [], []
            for it in self.items:
                for t in it.role_positions()[role]:
                    if torch.isnan(it.restored[:, :, t]).any():
                        continue  # not traced (positions="roles")
                    rows.append(it.restored[:, :, t])
                    cl.append(it.clean_gap)
                    co.append(it.corrupted_gap)
            if not rows:
                continue
            r = torch.stack(rows).mean(0)
            c0, c1 = float(torch.tensor(co, dtype=torch.float64).mean()), float(torch.tensor(cl, dtype=torch.float64).mean())
            out[role] = {"restored": r, "clean": torch.tensor(c1), "corrupted": torch.tensor(c0),
                         "recovery": (r - c0) / (c1 - c0), "n": torch.tensor(len(rows))}
        return out

    def to_locate_result(self, component: str = "mlp", role: str | None = None) -> LocateResult:
        """Per-layer summary: label ``L{l}``, score = the largest role-averaged recovery of ``component``
        at layer ``l`` over the roles (or of one ``role``), so it can feed layer selection for editing."""
        if component not in self.components:
            raise ValueError(f"component {component!r} was not traced; traced: {', '.join(self.components)}")
        c = self.components.index(component)
        roles = self.by_role()
        names = [role] if role else [r for r in roles if r != "all"]
        if role is not None and role not in roles:
            raise ValueError(f"role must be one of {', '.join(roles)}, got {role!r}")
        mat = torch.stack([roles[r]["recovery"][c] for r in names])  # [role, layer]
        best = mat.max(0)
        return LocateResult(
            method="bias_trace", labels=[f"L{l}" for l in range(self.n_layers)], scores=best.values,
            variant=f"{self.variant}; score = max over roles ({', '.join(names)}) of {component} recovery",
            extras={"component": component, "roles": names, "recovery_by_role": mat,
                    "argmax_role": [names[i] for i in best.indices.tolist()]},
            model=self.model, n_samples=len(self.items),
        )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: settings, per-item gaps/tokens/``restored`` arrays, and the role summary."""
        return {
            "method": "bias_trace", "model": self.model, "variant": self.variant,
            "components": list(self.components), "n_layers": self.n_layers, "noise_std": self.noise_std,
            "noise_scale": self.noise_scale, "n_noise": self.n_noise, "window": self.window, "seed": self.seed,
            "n_items": len(self.items), "n_skipped": self.n_skipped, **self.extras,
            "items": [{"id": it.id, "tokens": it.tokens, "subject": it.subject,
                       "corrupted_positions": it.corrupted_positions, "attr_positions": it.attr_positions,
                       "clean_gap": it.clean_gap, "corrupted_gap": it.corrupted_gap,
                       "restored": _jsonable(it.restored.tolist())} for it in self.items],
            "by_role": {r: {k: v.tolist() for k, v in d.items()} for r, d in self.by_role().items()},
        }


def trace_specs(components: Sequence[str], n_layers: int, n_tokens: int, window: int,
                positions: Sequence[int] | None = None) -> list[Spec]:
    """One spec per (component, layer, position), component-major then layer then position."""
    specs = []
    for comp in components:
        for layer in range(n_layers):
            layers = [layer] if comp == "resid" else list(window_layers(layer, n_layers, window))
            for t in (range(n_tokens) if positions is None else positions):
                specs.append(tuple((f"L{m}.{COMPONENTS[comp]}", t) for m in layers))
    return specs


def bias_trace(lm: Any, items: Sequence[dict | TraceItem], *, components: Sequence[str] = ("resid", "mlp", "attn"),
               n_noise: int = 10, noise_scale: float = 3.0, noise_std: float | None = None, window: int = 10,
               seed: int = 0, batch_size: int = 64, gap: str = "abs", noise_mode: str = "add",
               prefix: str = "bos", span: str = "substring", positions: str = "all") -> TraceResult:
    """Trace every (component, layer, position) of each item; see the module docstring.

    ``items``: BiasEdit-format dicts (prepared with ``prefix``/``span``; those BiasEdit skips are
    counted in ``n_skipped``) or :class:`TraceItem`. ``noise_std`` overrides the base std (default
    :func:`embedding_std` over ROME's knowns subjects); the noise std used is ``noise_scale`` x it.
    ``positions="roles"`` restores only the positions :meth:`TraceResult.by_role` summarises (subject
    tokens, the token before the attribute, the attribute, the last token); the others stay NaN.
    """
    bad = [c for c in components if c not in COMPONENTS]
    if bad or not components:
        raise ValueError(f"components must be a non-empty subset of {', '.join(COMPONENTS)}; got {list(components)}")
    for name, v in (("n_noise", n_noise), ("window", window), ("batch_size", batch_size)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    if gap not in ("abs", "signed"):
        raise ValueError(f"gap must be 'abs' or 'signed', got {gap!r}")
    if noise_mode not in ("add", "replace"):
        raise ValueError(f"noise_mode must be 'add' or 'replace', got {noise_mode!r}")
    if positions not in ("all", "roles"):
        raise ValueError(f"positions must be 'all' or 'roles', got {positions!r}")
    if not noise_scale > 0:
        raise ValueError(f"noise_scale must be > 0, got {noise_scale}")
    prepared, skipped = [], 0
    for it in items:
        p = it if isinstance(it, TraceItem) else prepare_item(lm.tokenizer, it, prefix=prefix, span=span)
        if p is None:
            skipped += 1
        else:
            prepared.append(p)
    if not prepared:
        raise ValueError(f"no traceable item among {len(items)} (a subject word missing from a sentence, "
                         "or the two sentences tokenise to different lengths); give more items")
    base = embedding_std(lm, knowns()) if noise_std is None else float(noise_std)
    std = noise_scale * base
    traces = []
    for n, it in enumerate(prepared):
        tr = ItemTrace(it.id, list(it.tokens), list(it.subject), it.corrupted(), list(it.attr_positions),
                       0.0, 0.0, torch.empty(0))
        pos = None if positions == "all" else sorted({p for r, ps in tr.role_positions().items() if r != "all" for p in ps})
        specs = [()] + trace_specs(components, lm.n_layers, it.n_tokens, window, pos)
        clean, gaps = restored_gaps(lm, it, specs, noise_std=std, n_noise=n_noise, seed=seed,
                                    batch_size=batch_size, gap=gap, noise_mode=noise_mode)
        restored = torch.full((len(components), lm.n_layers, it.n_tokens), float("nan"), dtype=torch.float64)
        cols = list(range(it.n_tokens)) if pos is None else pos
        restored[:, :, cols] = gaps[1:].view(len(components), lm.n_layers, len(cols))
        tr.clean_gap, tr.corrupted_gap, tr.restored = clean, float(gaps[0]), restored
        traces.append(tr)
        log.info("bias_trace item %d/%d: clean %.4f corrupted %.4f", n + 1, len(prepared), clean, float(gaps[0]))
    variant = (f"gap={gap} (mean logp after BOS); noise={noise_mode} {noise_scale:g} x std "
               f"{'over knowns' if noise_std is None else 'given'}; n_noise={n_noise}; window={window}; "
               f"prefix={prefix}; span={span}; positions={positions}")
    return TraceResult(tuple(components), traces, lm.n_layers, std, noise_scale, n_noise, window, seed, variant,
                       model=getattr(lm, "name", ""), n_skipped=skipped,
                       extras={"noise_std_base": base, "gap": gap, "noise_mode": noise_mode})
