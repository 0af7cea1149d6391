"""The contrastive reference models: trained on the CDA corpus, pruned by IMP, cached on disk.

A :class:`Subnetwork` is one reference as the weights it owns: the block weight matrices after
training and IMP (pruned entries exactly 0) and their keep masks; everything else equals the base.
:func:`make_references` trains the ``sides`` (``stereo`` on the stereotypical sentences, ``anti`` on
their gender swaps, ``neutral`` on both: :mod:`bias_lens.benchmarks.cda`) from the same base with
the same :class:`~bias_lens.edit.imp.ReferenceConfig` and batch order, so they differ only in the
corpus side. Results are cached in ``<cache_root>/contrastive/<key>/`` (``references.json`` +
one ``<side>.safetensors`` each), the key hashing the base weights' fingerprint, the config, the
sides and the corpus seed; :meth:`References.load` validates a saved folder against the model
(same parameter names, shapes and dtypes, else one ``ValueError``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..io import atomic_write_text, make_temp_dir, replace_dir
from .imp import ReferenceConfig, iterative_pruning

if TYPE_CHECKING:
    from ..lens import LensModel

log = logging.getLogger(__name__)
SIDES = ("stereo", "anti", "neutral")
FORMAT = "bias_lens.contrastive.references/1"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64, "U8": torch.uint8}


def weight_names(lm: LensModel, layers: Sequence[int] | None = None) -> list[str]:
    """Block weight matrices (2-D parameters inside the layers; of ``layers`` only when given): the
    contrastive search and edit space."""
    prefix = lm.arch.layers + "."
    names = [n for n, p in lm.hf.named_parameters() if n.startswith(prefix) and p.ndim == 2]
    if layers is None:
        return names
    bad = sorted(set(layers) - set(range(lm.n_layers)))
    if bad:
        raise ValueError(f"reference layers {bad} do not exist; {lm.name} has blocks 0..{lm.n_layers - 1}")
    return [n for n in names if int(n[len(prefix):].split(".", 1)[0]) in set(layers)]


def fingerprint(lm: LensModel, names: Sequence[str] | None = None) -> str:
    """Content hash of the base's block matrices (name, shape, sum, leading bytes): the cache key's base."""
    params = dict(lm.hf.named_parameters())
    h = hashlib.sha256()
    for n in names if names is not None else weight_names(lm):
        t = params[n].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{n}:{tuple(t.shape)}:{float(t.double().sum()):.10e}".encode())
        h.update(t.reshape(-1)[:1024].numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class Subnetwork:
    """One reference: trained block matrices (pruned entries 0) and their keep masks."""

    name: str
    weights: dict[str, Tensor]
    keep: dict[str, Tensor]

    @property
    def sparsity(self) -> float:
        """Share of pruned entries over its matrices."""
        total = sum(k.numel() for k in self.keep.values())
        return 1.0 - sum(int(k.sum()) for k in self.keep.values()) / max(total, 1)


@dataclass
class References:
    """The trained references of one base model, by side, plus how they were made."""

    subnets: dict[str, Subnetwork]
    config: dict[str, Any]
    fingerprint: str
    info: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, side: str) -> Subnetwork:
        if side not in self.subnets:
            raise ValueError(f"no {side!r} reference here (have {', '.join(self.subnets)}); train it with sides=...")
        return self.subnets[side]

    def save(self, folder: str | Path) -> Path:
        """Write ``references.json`` and one safetensors file per side (atomically, as one folder)."""
        from safetensors.torch import save_file

        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = make_temp_dir(folder.parent, ".refs-")
        try:
            for side, sub in self.subnets.items():
                tensors = {**{f"{n}::weight": w.contiguous() for n, w in sub.weights.items()},
                           **{f"{n}::keep": k.to(torch.uint8).contiguous() for n, k in sub.keep.items()}}
                save_file(tensors, str(tmp / f"{side}.safetensors"))
            meta = {"format": FORMAT, "sides": list(self.subnets), "config": self.config, "fingerprint": self.fingerprint,
                    "info": self.info}
            atomic_write_text(tmp / "references.json", json.dumps(meta, indent=1, default=str))
            replace_dir(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return folder

    @staticmethod
    def check(folder: str | Path, lm: LensModel) -> dict[str, Any]:
        """The saved metadata, after checking every side's tensors against ``lm``'s block matrices
        (names, shapes, dtypes; read from the safetensors headers only). One ValueError otherwise."""
        from safetensors import safe_open

        folder = Path(folder)
        meta_path = folder / "references.json"
        if not meta_path.is_file():
            raise ValueError(f"{folder} holds no saved references (needs references.json)")
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError as err:
            raise ValueError(f"{meta_path} is not valid JSON ({err})") from None
        if meta.get("format") != FORMAT:
            raise ValueError(f"{meta_path} is not a {FORMAT} file")
        params, names = dict(lm.hf.named_parameters()), weight_names(lm, (meta.get("config") or {}).get("layers"))
        want = {f"{n}::{kind}": (tuple(params[n].shape), params[n].dtype if kind == "weight" else torch.uint8)
                for n in names for kind in ("weight", "keep")}
        for side in meta.get("sides", []):
            path = folder / f"{side}.safetensors"
            if not path.is_file():
                raise ValueError(f"{folder} lacks {path.name}")
            with safe_open(str(path), framework="pt") as fh:
                keys = set(fh.keys())
                if keys != set(want):
                    raise ValueError(f"references in {folder} hold {len(keys) // 2} matrices, {lm.name} has "
                                     f"{len(names)} block matrices: they belong to another architecture")
                for key in sorted(keys):
                    sl = fh.get_slice(key)
                    shape, dtype = tuple(sl.get_shape()), _DTYPES.get(sl.get_dtype())
                    if (shape, dtype) != want[key]:
                        raise ValueError(f"reference {side} {key} is {shape} {sl.get_dtype()}, the model's "
                                         f"{want[key][0]} {want[key][1]}: they belong to another model")
        return meta

    @classmethod
    def load(cls, folder: str | Path, lm: LensModel) -> "References":
        """Saved references, checked against ``lm`` first (:meth:`check`)."""
        from safetensors.torch import load_file

        meta = cls.check(folder, lm)
        names, subnets = weight_names(lm, meta["config"].get("layers")), {}
        for side in meta["sides"]:
            raw = load_file(str(Path(folder) / f"{side}.safetensors"))
            subnets[side] = Subnetwork(side, {n: raw[f"{n}::weight"] for n in names},
                                       {n: raw[f"{n}::keep"].bool() for n in names})
        if meta["fingerprint"] != fingerprint(lm, names):
            log.warning("references in %s were trained from other base weights than %s's", folder, lm.name)
        return cls(subnets, meta["config"], meta["fingerprint"], {**meta.get("info", {}), "folder": str(folder)})


def train_subnetwork(lm: LensModel, texts: Sequence[str], cfg: ReferenceConfig, side: str) -> tuple[Subnetwork, dict]:
    """Fine-tune a copy of ``lm`` on ``texts`` and prune it by IMP (``lm`` is unchanged)."""
    names = weight_names(lm, cfg.layers)
    model = copy.deepcopy(lm.hf)
    try:
        base = {n: p.detach().clone() for n, p in lm.hf.named_parameters() if n in set(names)}
        keep, hist = iterative_pruning(model, lm.tokenizer, texts, names, cfg, base)
        params = dict(model.named_parameters())
        weights = {n: params[n].detach().to("cpu").clone() for n in names}
    finally:
        del model
    return Subnetwork(side, weights, keep), hist


def cache_folder(lm: LensModel, cfg: ReferenceConfig, sides: Sequence[str], corpus_seed: int) -> Path:
    """``<cache_root>/contrastive/<key>``: the key hashes the base fingerprint, config, sides, corpus
    seed and corpus version (:data:`bias_lens.benchmarks.cda.CORPUS_VERSION`)."""
    from ..loading import cache_root

    from ..benchmarks.cda import CORPUS_VERSION

    blob = json.dumps({"fp": fingerprint(lm, weight_names(lm, cfg.layers)), "cfg": cfg.to_dict(), "sides": sorted(sides),
                       "corpus_seed": corpus_seed, "corpus": CORPUS_VERSION, "format": FORMAT}, sort_keys=True)
    return cache_root() / "contrastive" / hashlib.sha256(blob.encode()).hexdigest()[:16]


def make_references(lm: LensModel, cfg: ReferenceConfig | None = None, *, sides: Sequence[str] = ("stereo", "anti"),
                    corpus_seed: int = 0, cache: bool = True) -> References:
    """The references of ``sides`` for ``lm`` (from the cache when present; module docstring)."""
    from ..benchmarks.cda import CORPUS_VERSION, build_corpus, texts

    cfg = cfg or ReferenceConfig()
    bad = sorted(set(sides) - set(SIDES))
    if bad or not sides:
        raise ValueError(f"unknown reference sides {bad}; choose from {', '.join(SIDES)}")
    folder = cache_folder(lm, cfg, sides, corpus_seed)
    if cache and (folder / "references.json").is_file():
        log.info("contrastive references from the cache %s", folder)
        return References.load(folder, lm)
    corpus = build_corpus(corpus_seed, cfg.sources) if cfg.sources is not None else build_corpus(corpus_seed)
    subnets, hist = {}, {}
    for side in sides:
        subnets[side], hist[side] = train_subnetwork(lm, texts(corpus["train"], side), cfg, side)
    info = {"history": hist, "n_train_pairs": len(corpus["train"]), "n_dev_pairs": len(corpus["dev"]),
            "corpus_seed": corpus_seed, "corpus": CORPUS_VERSION, "sparsity": cfg.sparsity}
    refs = References(subnets, cfg.to_dict(), fingerprint(lm, weight_names(lm, cfg.layers)), info)
    if cache:
        refs.save(folder)
        refs.info["folder"] = str(folder)
    return refs


def as_model(lm: LensModel, sub: Subnetwork) -> LensModel:
    """A new LensModel: a copy of ``lm`` whose block matrices are the reference's (for measuring it)."""
    from ..lens import LensModel

    hf = copy.deepcopy(lm.hf)
    params = dict(hf.named_parameters())
    with torch.no_grad():
        for n, w in sub.weights.items():
            params[n].copy_(w.to(params[n].device))
    return LensModel(hf, lm.tokenizer, name=f"{lm.name}-{sub.name}")
