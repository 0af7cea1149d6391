"""Reference models for local contrastive editing: causal-LM fine-tuning and iterative magnitude pruning.

Lutz et al. (2024, arXiv 2410.17739) train each reference model on its (counterfactual) corpus and
find its *subnetwork* by iterative magnitude pruning (IMP; Frankle & Carbin 2019, as Chen et al.
2020 run it on pre-trained transformers): train, prune the smallest-magnitude share of the remaining
weights, reset the survivors and retrain with the mask fixed, for several rounds. Here:

* :func:`train_lm_` — the plain causal-LM loss (mean next-token NLL over real tokens) with Adam in
  float32, seeded shuffled batches, on the *block weight matrices* only (embeddings, the tied
  unembedding and the norms stay frozen: the edit space is the block matrices, as the paper's is
  the encoder's; ``ReferenceConfig.layers`` narrows it to some blocks, e.g. for a quick notebook);
  entries outside ``keep`` are held at exactly 0 (gradient and Adam state zeroed, value re-zeroed
  after each step).
* :func:`global_keep` — magnitude masks: ``scope="global"`` (literal: one threshold over every
  matrix, as Chen et al.) or ``"tensor"`` (the same share of each matrix).
* :func:`iterative_pruning` — ``rounds`` x (prune ``rate`` of the remaining entries -> rewind ->
  retrain ``retrain_steps``). ``rewind="base"`` (default, the lottery-ticket literal reading)
  resets the survivors to the pre-trained values before retraining; ``"none"`` continues from the
  trained values (prune-and-fine-tune, cheaper for the same bias). Final sparsity
  ``1 - (1 - rate) ** rounds``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING
from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn

from ..benchmarks.cda import DEFAULT_SOURCES

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

SCOPES = ("global", "tensor")
REWINDS = ("base", "none")


@dataclass(frozen=True)
class ReferenceConfig:
    """How a reference is trained and pruned (see the module docstring); ``to_dict`` keys the cache."""

    steps: int = 96
    lr: float = 1e-4
    batch_size: int = 16
    max_len: int = 48
    rounds: int = 2
    rate: float = 0.2
    retrain_steps: int = 64
    rewind: str = "base"
    scope: str = "global"
    seed: int = 0
    layers: tuple[int, ...] | None = None  # blocks whose matrices are trained and pruned (None: all)
    sources: tuple[str, ...] | None = DEFAULT_SOURCES  # CDA corpus sources (None: all of cda.SOURCES)

    def __post_init__(self) -> None:
        if self.sources is not None:
            from ..benchmarks.cda import SOURCES

            object.__setattr__(self, "sources", tuple(self.sources))
            bad = sorted(set(self.sources) - set(SOURCES))
            if bad or not self.sources:
                raise ValueError(f"unknown CDA sources {bad}; choose from {', '.join(SOURCES)}")
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
            if not self.layers or min(self.layers) < 0:
                raise ValueError(f"reference layers must be block indices >= 0, got {list(self.layers)}")
        for name in ("steps", "batch_size", "max_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"reference {name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.rounds < 0 or self.retrain_steps < 0:
            raise ValueError("reference rounds and retrain-steps must be >= 0")
        if not self.lr > 0:
            raise ValueError(f"reference lr must be > 0, got {self.lr}")
        if not 0 < self.rate < 1:
            raise ValueError(f"pruning rate must lie in (0, 1), got {self.rate}")
        if self.rewind not in REWINDS:
            raise ValueError(f"rewind must be one of {', '.join(REWINDS)}, got {self.rewind!r}")
        if self.scope not in SCOPES:
            raise ValueError(f"pruning scope must be one of {', '.join(SCOPES)}, got {self.scope!r}")

    @property
    def sparsity(self) -> float:
        """The final share of pruned entries."""
        return 1.0 - (1.0 - self.rate) ** self.rounds

    def to_dict(self) -> dict:
        """The fields as a JSON-ready dict."""
        return asdict(self)


def lm_loss(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], max_len: int) -> Tensor:
    """Mean next-token NLL over the real (non-padding) tokens of ``texts`` (one right-padded batch)."""
    enc = tokenizer(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=max_len)
    dev = next(model.parameters()).device
    ids, att = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    target, real = ids[:, 1:], att[:, 1:].bool()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="none")
    return nll.reshape(target.shape)[real].mean()


def _batches(n: int, bs: int, steps: int, seed: int) -> list[Tensor]:
    """``steps`` batches of indices: seeded permutations of ``range(n)``, concatenated, cut into ``bs``."""
    g = torch.Generator().manual_seed(seed)
    need = steps * bs
    if need == 0:
        return []
    order = torch.cat([torch.randperm(n, generator=g) for _ in range(-(-need // n))])
    return [order[i * bs:(i + 1) * bs] for i in range(steps)]


def train_lm_(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], names: Sequence[str], cfg: ReferenceConfig,
              steps: int, keep: dict[str, Tensor] | None = None, seed_offset: int = 0) -> list[float]:
    """Adam on ``names`` for ``steps`` steps in place (module docstring); returns the loss per step."""
    if not texts:
        raise ValueError("no training texts for the reference")
    params = dict(model.named_parameters())
    train = [params[n] for n in names]
    masks = [keep[n].to(params[n].device) if keep is not None else None for n in names]
    flags = {n: p.requires_grad for n, p in params.items()}
    for n, p in params.items():
        p.requires_grad_(n in set(names))
    opt = torch.optim.Adam(train, lr=cfg.lr)
    was_training, losses = model.training, []
    model.train()
    try:
        for idx in _batches(len(texts), cfg.batch_size, steps, cfg.seed + seed_offset):
            loss = lm_loss(model, tokenizer, [texts[i] for i in idx.tolist()], cfg.max_len)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            for p, m in zip(train, masks):
                if m is not None and p.grad is not None:
                    p.grad.mul_(m)
            opt.step()
            with torch.no_grad():
                for p, m in zip(train, masks):
                    if m is not None:
                        p.mul_(m)
            losses.append(loss.item())
    finally:
        model.train(was_training)
        for n, p in params.items():
            p.requires_grad_(flags[n])
    return losses


def global_keep(weights: dict[str, Tensor], keep: dict[str, Tensor], rate: float, scope: str = "global") -> dict[str, Tensor]:
    """Prune ``rate`` of the still-kept entries by smallest ``|w|`` (one threshold over all tensors for
    ``scope="global"``, per tensor for ``"tensor"``); ties broken by tensor order then flat index."""
    if scope not in SCOPES:
        raise ValueError(f"pruning scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if scope == "tensor":
        return {n: global_keep({n: w}, {n: keep[n]}, rate)[n] for n, w in weights.items()}
    names = list(weights)
    mags = torch.cat([torch.where(keep[n], weights[n].detach().abs().float(), torch.inf).reshape(-1).cpu() for n in names])
    n_prune = int(round(rate * int(sum(int(keep[n].sum()) for n in names))))
    flat = torch.cat([keep[n].reshape(-1).cpu() for n in names])
    if n_prune:
        order = torch.sort(mags, stable=True).indices[:n_prune]
        flat = flat.clone()
        flat[order] = False
    out, pos = {}, 0
    for n in names:
        size = weights[n].numel()
        out[n] = flat[pos:pos + size].view(weights[n].shape).clone()
        pos += size
    return out


def iterative_pruning(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[str], names: Sequence[str], cfg: ReferenceConfig,
                      base: dict[str, Tensor]) -> tuple[dict[str, Tensor], dict]:
    """Train ``model`` on ``texts`` then run IMP's rounds (module docstring), in place; ``base`` holds
    the pre-trained values of ``names`` (the rewind point). Returns the keep masks and a history."""
    params = dict(model.named_parameters())
    t0 = time.time()
    hist = {"train_loss": train_lm_(model, tokenizer, texts, names, cfg, cfg.steps), "rounds": []}
    keep = {n: torch.ones_like(params[n], dtype=torch.bool, device="cpu") for n in names}
    for r in range(cfg.rounds):
        keep = global_keep({n: params[n] for n in names}, keep, cfg.rate, cfg.scope)
        with torch.no_grad():
            for n in names:
                if cfg.rewind == "base":
                    params[n].copy_(base[n])
                params[n].mul_(keep[n].to(params[n].device))
        loss = train_lm_(model, tokenizer, texts, names, cfg, cfg.retrain_steps, keep, seed_offset=r + 1)
        kept = sum(int(k.sum()) for k in keep.values())
        hist["rounds"].append({"round": r + 1, "kept": kept, "loss": loss})
        log.info("IMP round %d: %d entries kept, last loss %.3f", r + 1, kept, loss[-1] if loss else float("nan"))
    hist["seconds"] = round(time.time() - t0, 1)
    return keep, hist
