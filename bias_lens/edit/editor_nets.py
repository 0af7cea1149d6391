"""BiasEdit's editor hyper-network (MALMEN's net), ported from ``zjunlp/BiasEdit`` ``nets.py``.

One :class:`EditorNet` serves every edited matrix of one shape (``key_size`` = the matrix's input
width, ``value_size`` = its output width). It reads the debiasing gradient of the matrix in its
factored form, one row per token: the matrix's input ``u`` (the *key*) and the gradient of the loss
at its output ``dv`` (the *value gradient*), never the ``key x value`` gradient matrix. Rows are
normalised by a running mean / std (:class:`RunningMeanStd`, updated from the training batches
only), passed through ``n_blocks`` residual low-rank blocks (:class:`EditorBlock`:
``y + scale_m * relu(y A B + bias) + shift_m``, per-module ``scale`` / ``shift`` embeddings), and
split back into a pseudo key and a pseudo value gradient. The per-module step size ``lr_m`` and
log-ridge ``lamda_m`` are learned too (both :class:`torch.nn.Embedding` of width 1, as in the
reference). :func:`bias_lens.edit.editor.predict_shift` turns the outputs into a weight shift.

Initialisation as the reference: ``A ~ N(0, 1)``, ``B = 0``, ``bias = 0``, ``scale = 1``,
``shift = 0`` (so every block starts as the identity), ``lr_m = lr``, ``lamda_m = 0``.
"""

from __future__ import annotations

import torch
from jaxtyping import Float, Int
from torch import Tensor, nn


class RunningMeanStd(nn.Module):
    """Per-feature running mean and std (Chan et al.'s parallel update), as the reference's."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.register_buffer("n", torch.zeros(1))
        self.register_buffer("mean", torch.zeros(size))
        self.register_buffer("var", torch.zeros(size))  # the running sum of squared deviations
        self.register_buffer("std", torch.zeros(size))

    @torch.no_grad()
    def update(self, x: Float[Tensor, "token size"]) -> None:
        """Fold a batch of rows into the running statistics (the reference's formula, verbatim)."""
        n = self.n + x.shape[0]
        delta = x.mean(0) - self.mean
        self.mean += x.shape[0] * delta / n
        self.var += x.shape[0] * x.var(0) + self.n * x.shape[0] * delta.pow(2) / n
        self.std = (self.var / (n - 1 + torch.finfo(x.dtype).eps)).sqrt()
        self.n = n

    def forward(self, x: Float[Tensor, "token size"]) -> Float[Tensor, "token size"]:
        """``(x - mean) / (std + eps)``."""
        return (x - self.mean) / (self.std + torch.finfo(x.dtype).eps)


class EditorBlock(nn.Module):
    """One residual low-rank block: ``y + scale_m * relu(y @ A @ B + bias) + shift_m``."""

    def __init__(self, size: int, rank: int, n_modules: int) -> None:
        super().__init__()
        self.A = nn.Parameter(torch.randn(size, rank))
        self.B = nn.Parameter(torch.zeros(rank, size))
        self.bias = nn.Parameter(torch.zeros(size))
        self.scale = nn.Embedding(n_modules, size)
        self.shift = nn.Embedding(n_modules, size)
        self.scale.weight.data.fill_(1)
        self.shift.weight.data.fill_(0)

    def forward(self, y: Float[Tensor, "token size"], module_idx: Int[Tensor, " 1"]) -> Float[Tensor, "token size"]:
        """The block applied to rows ``y`` of module ``module_idx``."""
        x = (y @ self.A @ self.B + self.bias).clamp(0)
        return self.scale(module_idx) * x + self.shift(module_idx) + y


class EditorNet(nn.Module):
    """The editor of every matrix of one ``(key_size, value_size)`` shape; see the module docstring."""

    def __init__(self, key_size: int, value_size: int, rank: int, n_blocks: int, n_modules: int, lr: float) -> None:
        super().__init__()
        self.key_size, self.value_size = key_size, value_size
        self.normalizer = RunningMeanStd(key_size + value_size)
        self.blocks = nn.ModuleList([EditorBlock(key_size + value_size, rank, n_modules) for _ in range(n_blocks)])
        self.lr = nn.Embedding(n_modules, 1)
        self.lamda = nn.Embedding(n_modules, 1)
        self.lr.weight.data.fill_(lr)
        self.lamda.weight.data.fill_(0)

    def forward(self, keys: Float[Tensor, "token key"], values_grad: Float[Tensor, "token value"],
                module_idx: Int[Tensor, " 1"]) -> tuple[Float[Tensor, "token key"], Float[Tensor, "token value"]]:
        """(pseudo keys, pseudo value gradients) of the normalised, transformed rows."""
        h = self.normalizer(torch.cat((keys, values_grad), -1))
        for block in self.blocks:
            h = block(h, module_idx)
        k, v = h.split([self.key_size, self.value_size], -1)
        return k, v
