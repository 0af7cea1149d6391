"""Sparse patches: an :class:`~bias_lens.edit.edits.Edit` on disk, applicable to a base checkpoint.

A patch is a folder with

* ``patch.safetensors`` — per edited HF parameter ``{name}::indices`` (int64 flat indices into the
  stored layout), ``{name}::values`` (new values, the parameter's dtype) and, when known,
  ``{name}::original`` (the base values, which make ``revert`` and base checks possible);
* ``patch.json`` — the manifest: format, method, meta, base model name and weights sha256, and
  per parameter its shape, dtype, layout and entry count.

:func:`apply_patch` reads a base HF checkpoint folder's safetensors directly (no model is
built), writes the values and saves a new folder (atomically: beside the target, then renamed);
the result equals the edited weights bit-for-bit. ``revert=True`` writes the originals back.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..io import replace_dir
from .edits import Edit, bits

FORMAT = "bias_lens.patch/1"
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def weights_sha256(folder: str | Path) -> str:
    """sha256 over the checkpoint's ``*.safetensors`` files (sorted by name)."""
    h = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _atomic_dir(target: Path, force: bool) -> Path:
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise FileExistsError(f"{target} exists and is not empty; choose another path or pass force")
    target.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp", dir=target.parent))


_commit = replace_dir


def save_patch(
    edit: Edit, path: str | Path, *, originals: dict[str, torch.Tensor] | None = None, base_name: str = "",
    base_sha256: str | None = None, force: bool = False,
) -> Path:
    """Write ``edit`` (and the base ``originals`` of its entries, e.g. ``handle.originals``) as a patch folder."""
    from safetensors.torch import save_file

    target = Path(path)
    tmp = _atomic_dir(target, force)
    try:
        tensors: dict[str, torch.Tensor] = {}
        params: dict[str, Any] = {}
        for n, idx in edit.indices.items():
            tensors[f"{n}::indices"] = idx.to(torch.int64).contiguous()
            tensors[f"{n}::values"] = edit.values[n].contiguous()
            if originals is not None:
                tensors[f"{n}::original"] = originals[n].detach().cpu().contiguous()
            params[n] = {"shape": list(edit.shapes[n]), "dtype": str(edit.dtypes[n]), "layout": edit.layouts[n], "n": int(idx.numel())}
        save_file(tensors, str(tmp / "patch.safetensors"))
        manifest = {"format": FORMAT, "method": edit.method, "meta": edit.meta, "base_model": base_name,
                    "base_sha256": base_sha256, "has_original": originals is not None, "params": params}
        (tmp / "patch.json").write_text(json.dumps(manifest, indent=1, default=str))
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_patch(path: str | Path) -> tuple[Edit, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """``(edit, originals or None, manifest)`` from a patch folder."""
    from safetensors.torch import load_file

    path = Path(path)
    if not (path / "patch.json").is_file() or not (path / "patch.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a bias_lens patch (needs patch.json and patch.safetensors)")
    man = json.loads((path / "patch.json").read_text())
    if man.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown patch format {man.get('format')!r}; expected {FORMAT}")
    t = load_file(str(path / "patch.safetensors"))
    P = man["params"]
    edit = Edit({n: t[f"{n}::indices"] for n in P}, {n: t[f"{n}::values"] for n in P},
                {n: tuple(P[n]["shape"]) for n in P}, {n: _DTYPES[P[n]["dtype"]] for n in P},
                {n: P[n]["layout"] for n in P}, man.get("method", ""), man.get("meta") or {})
    orig = {n: t[f"{n}::original"] for n in P} if man.get("has_original") else None
    return edit, orig, man


def _checkpoint_tensors(folder: Path) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights; pass a Hugging Face checkpoint folder")
    out = {}
    for f in files:
        data = load_file(str(f))
        for k in data:
            out[k] = (f, data)
    return out


def _checkpoint_layouts(folder: Path) -> dict[str, str]:
    from transformers import AutoConfig, AutoModelForCausalLM

    from .edits import layouts

    cfg = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    return layouts(model)


def apply_patch(base: str | Path, patch: str | Path, out: str | Path, *, revert: bool = False, force: bool = False) -> Path:
    """Write ``base`` checkpoint with the patch applied (``revert``: its originals restored) to ``out``.

    Refuses (writing nothing) when a tensor is missing or differs in shape/dtype/layout, or, for a
    patch with originals, when the base's entries are not the patch's originals (apply) or values
    (revert): the patch was made for another checkpoint.
    """
    from safetensors.torch import save_file

    base, out = Path(base), Path(out)
    edit, orig, _ = load_patch(patch)
    if revert and orig is None:
        raise ValueError(f"patch {patch} stores no original values, so it cannot be reverted")
    tensors = _checkpoint_tensors(base)
    lay = _checkpoint_layouts(base)
    new = {n: (orig[n] if revert else edit.values[n]) for n in edit.indices}
    expect = (edit.values if revert else orig) or {}
    for n, idx in edit.indices.items():
        if n not in tensors:
            raise ValueError(f"patch edits {n!r}, which the checkpoint {base} does not contain")
        t = tensors[n][1][n]
        if tuple(t.shape) != edit.shapes[n] or t.dtype != edit.dtypes[n] or lay.get(n, "out_in") != edit.layouts[n]:
            raise ValueError(f"{n}: checkpoint has {tuple(t.shape)} {t.dtype} {lay.get(n)}, patch expects "
                             f"{edit.shapes[n]} {edit.dtypes[n]} {edit.layouts[n]}")
        if n in expect and not torch.equal(bits(t.reshape(-1)[idx]), bits(expect[n])):
            raise ValueError(f"{n}: the checkpoint's entries are not the ones this patch was made from; wrong base?")
    tmp = _atomic_dir(out, force)
    try:
        for f in base.iterdir():
            if f.suffix != ".safetensors" and f.is_file():
                shutil.copy2(f, tmp / f.name)
        by_file: dict[Path, dict[str, torch.Tensor]] = {}
        for k, (f, data) in tensors.items():
            by_file.setdefault(f, data)
        for n, idx in edit.indices.items():
            f, data = tensors[n]
            t = data[n].clone()
            t.view(-1)[idx] = new[n]
            by_file[f][n] = t
        for f, data in by_file.items():
            save_file({k: v.contiguous() for k, v in data.items()}, str(tmp / f.name), metadata={"format": "pt"})
        _commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def create_patch(base: str | Path, edited: str | Path, out: str | Path, *, force: bool = False) -> Path:
    """Diff two checkpoints bitwise and save the differing entries (with originals) as a patch."""
    base, edited = Path(base), Path(edited)
    a, b = _checkpoint_tensors(base), _checkpoint_tensors(edited)
    if set(a) != set(b):
        raise ValueError(f"{base} and {edited} hold different tensors: {sorted(set(a) ^ set(b))[:5]}")
    lay = _checkpoint_layouts(base)
    idx, vals, orig, shapes, dtypes = {}, {}, {}, {}, {}
    for n in a:
        ta, tb = a[n][1][n], b[n][1][n]
        if ta.shape != tb.shape or ta.dtype != tb.dtype:
            raise ValueError(f"{n}: {tuple(ta.shape)} {ta.dtype} in the base but {tuple(tb.shape)} {tb.dtype} in the edit")
        diff = torch.nonzero(bits(ta.reshape(-1)) != bits(tb.reshape(-1)))[:, 0]
        if diff.numel():
            idx[n], vals[n], orig[n] = diff, tb.reshape(-1)[diff].clone(), ta.reshape(-1)[diff].clone()
            shapes[n], dtypes[n] = tuple(ta.shape), ta.dtype
    edit = Edit(idx, vals, shapes, dtypes, {n: lay.get(n, "out_in") for n in idx}, "checkpoint_diff",
                {"base": str(base), "edited": str(edited)})
    return save_patch(edit, out, originals=orig, base_name=str(base), base_sha256=weights_sha256(base), force=force)
