"""Sparse patches: an :class:`~bias_lens.edit.edits.Edit` on disk, applicable to a base checkpoint.

A patch is a folder with

* ``patch.safetensors`` — per edited HF parameter ``{name}::indices`` (int64 flat indices into the
  stored layout), ``{name}::values`` (new values, the parameter's dtype) and, when known,
  ``{name}::original`` (the base values, which make ``revert`` possible);
* ``patch.json`` — the manifest: format, method, meta, base model name and (when known) the
  sha256 of the base checkpoint's files, ``payload_sha256`` (of ``patch.safetensors``) and per
  parameter its shape, dtype, layout, entry count, ``base_entries_sha256`` and
  ``edited_entries_sha256`` (see :mod:`bias_lens.edit.patch_integrity`).

:func:`load_patch` verifies the payload hash before using a value; :func:`apply_patch` also
verifies that the base checkpoint's entries are the ones the patch was made from (``revert``:
the ones it wrote) unless ``force_base=True``. It reads the checkpoint's safetensors directly
(no model is built), writes the values and saves a new folder atomically (beside the target,
then renamed); the result equals the edited weights bit-for-bit. Every refusal is a
:class:`PatchError` (a ValueError) raised before anything is written.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import torch

from ..io import make_temp_dir, replace_dir
from .edits import Edit, bits
from .patch_integrity import (DTYPES, BaseMismatchError, LegacyPatchError, PatchCorruptError, PatchError,
                              check_entries, check_payload, entries_sha256, file_sha256, payload_tensor,
                              read_manifest, read_payload, update_from_file)

__all__ = ["FORMAT", "PatchError", "PatchCorruptError", "BaseMismatchError", "LegacyPatchError", "weights_sha256",
           "save_patch", "load_patch", "apply_patch", "create_patch"]

log = logging.getLogger(__name__)
FORMAT = "bias_lens.patch/1"


def weights_sha256(folder: str | Path) -> str:
    """sha256 over the checkpoint's ``*.safetensors`` files (sorted by name)."""
    h = hashlib.sha256()
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    for f in files:
        h.update(f.name.encode())
        update_from_file(h, f)
    return h.hexdigest()


def _check_out(target: Path, force: bool) -> None:
    if target.exists() and (not target.is_dir() or any(target.iterdir())) and not force:
        raise FileExistsError(f"{target} exists and is not empty; choose another path or pass force")


def _atomic_dir(target: Path, force: bool) -> Path:
    _check_out(target, force)
    target.parent.mkdir(parents=True, exist_ok=True)
    return make_temp_dir(target.parent, f".{target.name}.tmp")


_commit = replace_dir


def _param_entry(edit: Edit, n: str, originals: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    idx = edit.indices[n]
    entry = {"shape": list(edit.shapes[n]), "dtype": str(edit.dtypes[n]), "layout": edit.layouts[n],
             "n": int(idx.numel()), "edited_entries_sha256": entries_sha256(n, idx, edit.values[n]),
             "base_entries_sha256": None}
    if originals is not None:
        o = originals.get(n)
        if o is None or o.dtype != edit.dtypes[n] or tuple(o.shape) != tuple(idx.shape):
            got = "nothing" if o is None else f"{o.dtype} {tuple(o.shape)}"
            raise ValueError(f"originals of {n}: expected {edit.dtypes[n]} {tuple(idx.shape)} (one per edited entry), "
                             f"got {got}; pass the handle's .originals")
        entry["base_entries_sha256"] = entries_sha256(n, idx, o)
    return entry


def save_patch(
    edit: Edit, path: str | Path, *, originals: dict[str, torch.Tensor] | None = None, base_name: str = "",
    base_sha256: str | None = None, force: bool = False,
) -> Path:
    """Write ``edit`` (and the base ``originals`` of its entries, e.g. ``handle.originals``) as a patch folder.

    Records ``payload_sha256`` and per parameter the entries' hashes. Without ``originals`` the
    patch knows no base: it cannot be reverted and applying it needs ``force_base=True``.
    """
    from safetensors.torch import save_file

    target = Path(path)
    params = {n: _param_entry(edit, n, originals) for n in edit.indices}  # validates before any write
    tmp = _atomic_dir(target, force)
    try:
        tensors: dict[str, torch.Tensor] = {}
        for n, idx in edit.indices.items():
            tensors[f"{n}::indices"] = idx.to(torch.int64).contiguous()
            tensors[f"{n}::values"] = edit.values[n].contiguous()
            if originals is not None:
                tensors[f"{n}::original"] = originals[n].detach().cpu().contiguous()
        save_file(tensors, str(tmp / "patch.safetensors"))
        manifest = {"format": FORMAT, "method": edit.method, "meta": edit.meta, "base_model": base_name,
                    "base_sha256": base_sha256, "has_original": originals is not None,
                    "payload_sha256": file_sha256(tmp / "patch.safetensors"), "params": params}
        (tmp / "patch.json").write_text(json.dumps(manifest, indent=1, default=str))
        _commit(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def load_patch(path: str | Path, *, allow_legacy: bool = False
               ) -> tuple[Edit, dict[str, torch.Tensor] | None, dict[str, Any]]:
    """``(edit, originals or None, manifest)`` from a patch folder, after checking its payload hash.

    Raises :class:`PatchCorruptError` for a damaged manifest or payload (hash mismatch, truncated,
    empty, missing tensors), :class:`PatchError` for an unknown format or dtype, and
    :class:`LegacyPatchError` for a patch without hashes unless ``allow_legacy`` (then: a warning).
    """
    path = Path(path)
    if not (path / "patch.json").is_file() or not (path / "patch.safetensors").is_file():
        raise FileNotFoundError(f"{path} is not a bias_lens patch (needs patch.json and patch.safetensors)")
    man = read_manifest(path, FORMAT)
    check_payload(path, man, allow_legacy)
    t = read_payload(path)
    P = man["params"]
    dt = {n: DTYPES[P[n]["dtype"]] for n in P}
    idx = {n: payload_tensor(path, t, f"{n}::indices", torch.int64, P[n].get("n")) for n in P}
    vals = {n: payload_tensor(path, t, f"{n}::values", dt[n], idx[n].numel()) for n in P}
    orig = ({n: payload_tensor(path, t, f"{n}::original", dt[n], idx[n].numel()) for n in P}
            if man.get("has_original") else None)
    try:
        edit = Edit(idx, vals, {n: tuple(P[n]["shape"]) for n in P}, dt, {n: P[n]["layout"] for n in P},
                    man.get("method", ""), man.get("meta") or {})
    except ValueError as err:
        raise PatchCorruptError(f"{path}: {err}") from None
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


def apply_patch(base: str | Path, patch: str | Path, out: str | Path, *, revert: bool = False, force: bool = False,
                force_base: bool = False, allow_legacy: bool = False) -> Path:
    """Write ``base`` checkpoint with the patch applied (``revert``: its originals restored) to ``out``.

    Checks, before anything is written: the payload hash (always); that every tensor exists with
    the patch's shape, dtype and layout (always); that the base's entries hash to the patch's
    ``base_entries_sha256`` (``revert``: ``edited_entries_sha256``), unless ``force_base`` (a base
    that differs on purpose). A refusal is a :class:`PatchError`; ``out`` is then not created.
    """
    from safetensors.torch import save_file

    base, out = Path(base), Path(out)
    _check_out(out, force)
    edit, orig, man = load_patch(patch, allow_legacy=allow_legacy)
    if revert and orig is None:
        raise PatchError(f"patch {patch} stores no original values, so it cannot be reverted")
    tensors = _checkpoint_tensors(base)
    lay = _checkpoint_layouts(base)
    new = {n: (orig[n] if revert else edit.values[n]) for n in edit.indices}
    reference = edit.values if revert else orig
    for n, idx in edit.indices.items():
        if n not in tensors:
            raise BaseMismatchError(f"patch edits {n!r}, which the checkpoint {base} does not contain")
        t = tensors[n][1][n]
        if tuple(t.shape) != edit.shapes[n] or t.dtype != edit.dtypes[n] or lay.get(n, "out_in") != edit.layouts[n]:
            raise BaseMismatchError(f"{n}: checkpoint has {tuple(t.shape)} {t.dtype} {lay.get(n)}, patch expects "
                                    f"{edit.shapes[n]} {edit.dtypes[n]} {edit.layouts[n]}")
        if not force_base:
            check_entries(n, base, t.reshape(-1)[idx], idx, man["params"][n],
                          None if reference is None else reference[n], revert)
    if force_base:
        log.warning("applying %s to %s without checking its base entries (force_base)", patch, base)
    elif not revert and man.get("base_sha256") and weights_sha256(base) != man["base_sha256"]:
        log.warning("%s: files differ from the checkpoint %s was made from, but every patched entry matches",
                    base, patch)
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
