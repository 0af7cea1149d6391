"""Integrity of sparse patch folders: payload and base hashes, one-line errors for damaged folders.

:func:`~bias_lens.edit.patch.save_patch` records in ``patch.json``

* ``payload_sha256``: sha256 of the ``patch.safetensors`` bytes. Every load checks it before a
  value is used, so a flipped byte, a truncated or an emptied payload is refused;
* per parameter ``base_entries_sha256``: sha256 of exactly the entries the patch writes, as they
  were in the base it was made from (see :func:`entries_sha256`), and ``edited_entries_sha256``,
  the same over the patch's new values. ``apply`` checks the first on the checkpoint it is given,
  ``revert`` the second.

Why entries and not whole files or tensors: a patch defines only its entries, so a checkpoint
that was re-saved (other file metadata or sharding) or that carries another edit elsewhere is a
valid base, while any difference in a written entry is caught; and :func:`save_patch` gets only
the handle's originals, never the full tensors. Cost: one gather + hash of the touched entries
(a whole ``mlp.down`` of SmolLM2-135M, 885k entries: ~30 ms on a loaded 2-core CPU).

A patch without ``payload_sha256`` (written before these checks) is refused unless the caller
opts in (``allow_legacy=True`` / ``--allow-legacy``); it is then used with a logged warning and
only the old check (base entries equal the stored originals) applies.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .edits import bits

log = logging.getLogger(__name__)

DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}
RECREATE = "recreate it with `bias-lens patch create --base BASE --edited EDITED --out NEW` (or re-run the edit)"


class PatchError(ValueError):
    """A patch folder that cannot be used as it is (the message says why and what to do)."""


class PatchCorruptError(PatchError):
    """The patch's own files are damaged: payload hash mismatch, unreadable payload or manifest."""


class BaseMismatchError(PatchError):
    """The checkpoint's entries are not the ones the patch was made from (or, for revert, wrote)."""


class LegacyPatchError(PatchError):
    """The patch predates the integrity hashes and the caller did not opt in to using it."""


def update_from_file(h: "hashlib._Hash", path: Path) -> None:
    """Feed a file's bytes to ``h`` in 1 MiB chunks."""
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of the file at ``path`` (read in chunks)."""
    h = hashlib.sha256()
    update_from_file(h, Path(path))
    return h.hexdigest()


def _raw(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def entries_sha256(name: str, indices: Tensor, values: Tensor) -> str:
    """sha256 over the parameter name, dtype, int64 flat indices and the values' raw bytes."""
    h = hashlib.sha256()
    h.update(f"{name}\0{values.dtype}\0".encode())
    h.update(_raw(indices.to(torch.int64)))
    h.update(_raw(values))
    return h.hexdigest()


def read_manifest(path: Path, fmt: str) -> dict[str, Any]:
    """``patch.json`` parsed and shape-checked; errors name the file."""
    f = path / "patch.json"
    try:
        man = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PatchCorruptError(f"{f} is not valid JSON ({err}); the patch is damaged: {RECREATE}") from None
    if not isinstance(man, dict):
        raise PatchCorruptError(f"{f} holds a JSON {type(man).__name__}, not a patch manifest object; {RECREATE}")
    if man.get("format") != fmt:
        raise PatchError(f"{f}: unknown patch format {man.get('format')!r}; expected {fmt}")
    params = man.get("params")
    if not isinstance(params, dict) or not all(isinstance(p, dict) for p in params.values()):
        raise PatchCorruptError(f"{f} has no valid 'params' mapping; the patch is damaged: {RECREATE}")
    for n, p in params.items():
        missing = [k for k in ("shape", "dtype", "layout") if k not in p]
        if missing:
            raise PatchCorruptError(f"{f}: entry {n!r} lacks {missing}; the patch is damaged: {RECREATE}")
        if p["dtype"] not in DTYPES:
            raise PatchError(f"{f}: {n} has dtype {p['dtype']!r}, which patches do not support "
                             f"(supported: {', '.join(DTYPES)})")
    return man


def check_payload(path: Path, man: dict[str, Any], allow_legacy: bool) -> None:
    """Refuse a payload whose bytes differ from ``payload_sha256`` (or a legacy patch unless allowed)."""
    f = path / "patch.safetensors"
    want = man.get("payload_sha256")
    if want is None:
        if not allow_legacy:
            raise LegacyPatchError(f"{path} has no payload_sha256 (written before patch integrity checks), so "
                                   f"corruption cannot be detected; {RECREATE}, or pass allow_legacy=True "
                                   "(--allow-legacy) to use it unchecked")
        log.warning("%s has no integrity hashes (legacy patch): using it unchecked", path)
        return
    got = file_sha256(f)
    if got != want:
        raise PatchCorruptError(f"{f} ({f.stat().st_size} bytes) does not match the sha256 in patch.json "
                                f"({got[:12]}... != {want[:12]}...): the payload is corrupted or truncated; {RECREATE}")


def read_payload(path: Path) -> dict[str, Tensor]:
    """``patch.safetensors`` as tensors; an unreadable file is one :class:`PatchCorruptError`."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    f = path / "patch.safetensors"
    try:
        return load_file(str(f))
    except SafetensorError as err:
        raise PatchCorruptError(f"{f} ({f.stat().st_size} bytes) is not a readable safetensors file ({err}); "
                                f"{RECREATE}") from None


def payload_tensor(path: Path, t: dict[str, Tensor], key: str, dtype: torch.dtype, n: int | None) -> Tensor:
    """One payload tensor, checked against the manifest's dtype and entry count."""
    if key not in t:
        raise PatchCorruptError(f"{path}/patch.safetensors lacks {key!r}, which patch.json lists; {RECREATE}")
    v = t[key]
    if v.dtype != dtype or v.ndim != 1 or (n is not None and v.numel() != n):
        raise PatchCorruptError(f"{path}/patch.safetensors: {key} is {v.dtype} {tuple(v.shape)}, patch.json says "
                                f"{dtype} ({n},); {RECREATE}")
    return v


def check_entries(name: str, base: Path, entries: Tensor, indices: Tensor, param: dict[str, Any],
                  reference: Tensor | None, revert: bool) -> None:
    """Refuse unless the checkpoint's ``entries`` are the patch's base entries (``revert``: its values).

    ``reference`` (the stored originals, or for revert the values) serves only to count the differing
    entries, and for a legacy patch without hashes as the check itself.
    """
    want = param.get("edited_entries_sha256" if revert else "base_entries_sha256")
    if want is None and reference is None:
        raise BaseMismatchError(f"{name}: the patch records no base for its entries (saved without originals), so "
                                f"{base} cannot be checked; pass force_base=True (--force-base) to apply it anyway")
    n_diff = None if reference is None else int((bits(entries) != bits(reference)).sum())
    if (entries_sha256(name, indices, entries) == want) if want is not None else n_diff == 0:
        return
    what = "the patch's new values (is it the edited checkpoint?)" if revert else "the ones this patch was made from"
    count = "" if n_diff is None else f" ({n_diff} of {entries.numel()} differ)"
    raise BaseMismatchError(f"{name}: the entries of {base} are not {what}{count}; wrong base? "
                            "pass force_base=True (--force-base) if it differs on purpose")
