"""Export an edited model as a self-contained, verified Hugging Face checkpoint (GUIDE example 6).

:func:`export_checkpoint` writes, into a temporary folder beside the target:

* ``config.json`` (quantization entries removed), ``*.safetensors`` weights of the real HF model
  (never TransformerLens-processed weights), the tokenizer with its chat template, and
  ``generation_config.json``;
* ``bias_lens_edit.json``: base model name and sha256 of its weights, the dtype the weights are
  written in (the model's: a bfloat16 model exports bfloat16), each parameter that differs
  from the base with its number of changed entries, the method, hyper-parameters, seed, metrics
  before/after and the bias_lens version.

It then verifies the folder: reloads it with plain ``AutoModelForCausalLM.from_pretrained``,
checks that the logits on fixed prompts equal the in-memory model's, and that exactly the
manifest's parameters and entry counts differ from the base checkpoint. Only then is the folder
renamed into place; on any failure (or interruption) it is removed and the error re-raised, so no
half-written or unverified checkpoint is ever left behind.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..io import make_temp_dir, replace_dir
from .edits import bits
from .patch import _checkpoint_tensors, weights_sha256

if TYPE_CHECKING:
    from collections.abc import Sequence

    from ..lens import LensModel

log = logging.getLogger(__name__)
MANIFEST = "bias_lens_edit.json"
VERIFY_PROMPTS = ("The nurse said that", "The engineer said that", "The capital of France is", "Two plus two is")


class ExportError(RuntimeError):
    """Verification of a written checkpoint failed (the folder has been removed)."""


def base_folder(lm: LensModel) -> Path | None:
    """The local checkpoint folder ``lm`` was loaded from (to diff the export against), or None."""
    p = getattr(lm.hf.config, "_name_or_path", "") or ""
    return Path(p) if p and Path(p).is_dir() and any(Path(p).glob("*.safetensors")) else None


def _write(lm, tmp: Path) -> None:
    lm.hf.save_pretrained(tmp, safe_serialization=True)
    cfg_path = tmp / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in ("quantization_config", "_name_or_path"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    lm.tokenizer.save_pretrained(tmp)
    if not (tmp / "generation_config.json").is_file():
        from transformers import GenerationConfig

        GenerationConfig.from_model_config(lm.hf.config).save_pretrained(tmp)


def changed_entries(base: Path, folder: Path) -> dict[str, int]:
    """Bitwise count of differing entries per tensor between two checkpoint folders.

    When the export's dtype differs from the base's (a bfloat16 model loaded from a float32
    checkpoint), the base is compared as loaded: rounded once to the exported dtype, as
    ``from_pretrained(dtype=...)`` rounds it, so an unedited entry counts as unchanged.
    """
    a, b = _checkpoint_tensors(base), _checkpoint_tensors(folder)
    if set(a) != set(b):
        raise ExportError(f"exported tensors differ in names from the base: {sorted(set(a) ^ set(b))[:5]}")
    out = {}
    for n in a:
        ta, tb = a[n][1][n], b[n][1][n]
        if ta.shape != tb.shape or not (ta.dtype == tb.dtype or ta.is_floating_point() and tb.is_floating_point()):
            raise ExportError(f"{n}: exported {tuple(tb.shape)} {tb.dtype} vs base {tuple(ta.shape)} {ta.dtype}")
        k = int((bits(ta.reshape(-1).to(tb.dtype)) != bits(tb.reshape(-1))).sum())
        if k:
            out[n] = k
    return out


@torch.no_grad()
def _logits(model, tokenizer, prompts) -> list[torch.Tensor]:
    return [model(**tokenizer(p, return_tensors="pt").to(model.device)).logits.cpu() for p in prompts]


def verify(lm: LensModel, folder: Path, manifest: dict[str, Any], base: Path | None, prompts: Sequence[str] = VERIFY_PROMPTS) -> None:
    """Raise :class:`ExportError` unless ``folder`` reloads to the in-memory model and differs from ``base``
    exactly as the manifest says."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = next(lm.hf.parameters()).dtype
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, use_safetensors=True).to(lm.device).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    for p, x, y in zip(prompts, _logits(lm.hf, lm.tokenizer, prompts), _logits(model, tok, prompts)):
        if x.shape != y.shape or not torch.equal(x, y):
            diff = (x - y).abs().max().item() if x.shape == y.shape else "shape"
            raise ExportError(f"reloaded checkpoint's logits differ from the in-memory model on {p!r} (max diff {diff})")
    if base is not None:
        got = changed_entries(base, folder)
        if got != manifest["params"]:
            raise ExportError(f"changed entries {got} do not match the manifest {manifest['params']}")


def export_checkpoint(
    lm: LensModel,
    out: str | Path,
    *,
    method: str,
    base: str | Path | None = None,
    base_name: str | None = None,
    hyperparams: dict[str, Any] | None = None,
    seed: int | None = None,
    metrics_before: dict[str, float] | None = None,
    metrics_after: dict[str, float] | None = None,
    extra: dict[str, Any] | None = None,
    force: bool = False,
    prompts: Sequence[str] = VERIFY_PROMPTS,
) -> Path:
    """Write the current weights of ``lm`` as a verified HF checkpoint folder at ``out``.

    ``base`` is the unedited checkpoint folder (default: the folder ``lm`` was loaded from); with
    it the manifest records the base sha256 and the per-parameter changed-entry counts, and the
    verification checks them. Refuses a non-empty ``out`` unless ``force``.
    """
    from .. import __version__

    target = Path(out)
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise FileExistsError(f"{target} exists and is not empty; choose another --out or pass force=True")
    base_dir = Path(base) if base is not None else base_folder(lm)
    if base_dir is not None and not any(base_dir.glob("*.safetensors")):
        raise FileNotFoundError(f"base {base_dir} has no *.safetensors weights")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = make_temp_dir(target.parent, f".{target.name}.tmp")
    try:
        _write(lm, tmp)
        manifest = {
            "format": "bias_lens.edit/1",
            "base_model": base_name or lm.name,
            "base_path": str(base_dir) if base_dir else None,
            "base_sha256": weights_sha256(base_dir) if base_dir else None,
            "params": changed_entries(base_dir, tmp) if base_dir else {},
            "dtype": str(next(lm.hf.parameters()).dtype).removeprefix("torch."),
            "method": method,
            "hyperparams": hyperparams or {},
            "seed": seed,
            "metrics_before": metrics_before or {},
            "metrics_after": metrics_after or {},
            "bias_lens_version": __version__,
            **(extra or {}),
        }
        manifest["n_changed"] = int(sum(manifest["params"].values()))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, default=str))
        verify(lm, tmp, manifest, base_dir, prompts)
        replace_dir(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("exported %s (%d changed entries) to %s", method, manifest["n_changed"], target)
    return target
