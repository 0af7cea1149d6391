"""Patch integrity: a damaged patch or a wrong base is refused before anything is written.

Oracles: hashes recomputed here with plain ``hashlib`` from the raw files (the safetensors header
parsed by hand) and from the base checkpoint's own tensors; "nothing changed" is the sha256 of
every file under the test folder before and after a refusal; applied results are compared bitwise
with the checkpoint written by hand (``tensor.view(-1)[indices] = values``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from bias_lens.cli import main
from bias_lens.edit import Edit, mask_from_labels
from bias_lens.edit.patch import (BaseMismatchError, LegacyPatchError, PatchCorruptError, PatchError, apply_patch,
                                  create_patch, load_patch, save_patch)

DOWN = "model.layers.1.mlp.down_proj.weight"


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _same_bits(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)


def _by_hand(weights: dict[str, torch.Tensor], edit: Edit, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: v.clone() for k, v in weights.items()}
    for n, idx in edit.indices.items():
        out[n].view(-1)[idx] = values[n]
    return out


def _header(f: Path) -> tuple[int, dict]:
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    return 8 + n, json.loads(raw[8:8 + n])


def _flip(f: Path, key: str, n_bytes: int = 40) -> None:
    """Flip one bit in each of ``n_bytes`` bytes of tensor ``key``: for float32, bit 0x40 of the top
    byte (the exponent's high bit: |x| < 1 becomes a huge but finite value); for int64 indices,
    bit 0x01 of the low byte (each index moves by one: still in range)."""
    start, header = _header(f)
    lo, hi = header[key]["data_offsets"]
    width, pos, bit = (8, 0, 0x01) if header[key]["dtype"] == "I64" else (4, 3, 0x40)
    assert (hi - lo) // width >= n_bytes
    raw = bytearray(f.read_bytes())
    for k in range(n_bytes):
        raw[start + lo + k * width + pos] ^= bit
    f.write_bytes(bytes(raw))


def _cli_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def made(tiny_llama, tmp_path):
    """A stored patch (with originals), its base folder and the edited checkpoint written from it."""
    hf = tiny_llama.hf
    base = Path(hf.config._name_or_path)
    mask = mask_from_labels(hf, ["L1.mlp.down/row1", "L1.mlp.down/row3", "L0.attn.q/row2"])
    edit = Edit.from_fn(hf, mask, lambda _n, o: o * -2.5 + 0.125, method="t")
    h = edit.apply_(hf)
    try:
        save_patch(edit, tmp_path / "p", originals=h.originals, base_name="tiny")
    finally:
        h.undo()
    edited = apply_patch(base, tmp_path / "p", tmp_path / "edited")
    return SimpleNamespace(base=base, patch=tmp_path / "p", edited=edited, edit=edit, root=tmp_path,
                           orig=h.originals)


def test_manifest_hashes_match_independent_recomputation(made):
    man = json.loads((made.patch / "patch.json").read_text())
    assert man["payload_sha256"] == hashlib.sha256((made.patch / "patch.safetensors").read_bytes()).hexdigest()
    base, edited = _weights(made.base), _weights(made.edited)
    assert set(man["params"]) == set(made.edit.indices)
    for n, idx in made.edit.indices.items():
        for key, src in (("base_entries_sha256", base), ("edited_entries_sha256", edited)):
            h = hashlib.sha256(f"{n}\0torch.float32\0".encode())
            h.update(idx.to(torch.int64).numpy().tobytes())
            h.update(src[n].reshape(-1)[idx].numpy().tobytes())  # the checkpoint's own entries
            assert man["params"][n][key] == h.hexdigest(), (n, key)
    assert _same_bits(edited, _by_hand(base, made.edit, made.edit.values))


@pytest.mark.parametrize("key", [f"{DOWN}::values", f"{DOWN}::original", f"{DOWN}::indices"])
def test_flipped_payload_bytes_refused_and_nothing_changes(made, key, capsys):
    f = made.patch / "patch.safetensors"
    _flip(f, key)
    damaged = load_file(str(f))[key]  # the damage is the silent kind: the file parses, values stay plausible
    if key.endswith("indices"):
        assert int(damaged.max()) < made.edit.shapes[DOWN][0] * made.edit.shapes[DOWN][1]
    else:
        assert bool(damaged.isfinite().all()) and float(damaged.abs().max()) > 1e6
    before = _tree(made.root)
    for revert, src in ((False, made.base), (True, made.edited)):
        with pytest.raises(PatchCorruptError, match="corrupted or truncated"):
            apply_patch(src, made.patch, made.root / "out", revert=revert)
        with pytest.raises(PatchCorruptError):
            apply_patch(src, made.patch, made.root / "out", revert=revert, force_base=True)  # payload check stays
    with pytest.raises(PatchCorruptError):
        load_patch(made.patch)
    err = _cli_error(capsys, ["patch", "apply", "--base", str(made.base), "--patch", str(made.patch),
                              "--out", str(made.root / "out")])
    assert "corrupted or truncated" in err and "patch.safetensors" in err
    _cli_error(capsys, ["patch", "revert", "--base", str(made.edited), "--patch", str(made.patch),
                        "--out", str(made.root / "out"), "--force-base"])
    assert _tree(made.root) == before and not (made.root / "out").exists()


@pytest.mark.parametrize("size", ["empty", "half"])
def test_truncated_or_empty_payload_is_one_line(made, size, capsys):
    f = made.patch / "patch.safetensors"
    raw = f.read_bytes()
    f.write_bytes(b"" if size == "empty" else raw[: len(raw) // 2])
    before = _tree(made.root)
    with pytest.raises(PatchCorruptError, match="truncated"):
        apply_patch(made.base, made.patch, made.root / "out")
    _cli_error(capsys, ["patch", "apply", "--base", str(made.base), "--patch", str(made.patch),
                        "--out", str(made.root / "out")])
    # a legacy patch (no hash) with the same damage: still one PatchCorruptError, not a SafetensorError
    man = json.loads((made.patch / "patch.json").read_text())
    del man["payload_sha256"]
    (made.patch / "patch.json").write_text(json.dumps(man))
    with pytest.raises(PatchCorruptError, match="not a readable safetensors file"):
        load_patch(made.patch, allow_legacy=True)
    err = _cli_error(capsys, ["patch", "apply", "--base", str(made.base), "--patch", str(made.patch),
                              "--out", str(made.root / "out"), "--allow-legacy"])
    assert "not a readable safetensors file" in err
    assert {k: v for k, v in _tree(made.root).items() if k != "p/patch.json"} == \
           {k: v for k, v in before.items() if k != "p/patch.json"}
    assert not (made.root / "out").exists()


def test_invalid_json_and_unknown_dtype_name_the_problem(made, capsys):
    mf = made.patch / "patch.json"
    good = mf.read_text()
    mf.write_text(good[: len(good) // 2])
    with pytest.raises(PatchCorruptError, match="is not valid JSON") as exc:
        load_patch(made.patch)
    assert str(mf) in str(exc.value)
    assert str(mf) in _cli_error(capsys, ["patch", "apply", "--base", str(made.base), "--patch", str(made.patch),
                                          "--out", str(made.root / "out")])
    man = json.loads(good)
    man["params"][DOWN]["dtype"] = "torch.int8"
    mf.write_text(json.dumps(man))
    with pytest.raises(PatchError, match=rf"{DOWN.replace('.', '[.]')} has dtype 'torch.int8'"):
        apply_patch(made.base, made.patch, made.root / "out")
    assert "torch.int8" in _cli_error(capsys, ["patch", "apply", "--base", str(made.base), "--patch",
                                               str(made.patch), "--out", str(made.root / "out")])
    assert not (made.root / "out").exists()


def _modified_base(made) -> tuple[Path, dict[str, torch.Tensor]]:
    """A copy of the base whose first patched entry of DOWN differs (a base that differs on purpose)."""
    other = made.root / "other_base"
    shutil.copytree(made.base, other)
    f = next(f for f in other.glob("*.safetensors") if DOWN in load_file(str(f)))
    data = load_file(str(f))
    data[DOWN] = data[DOWN].clone()
    data[DOWN].view(-1)[made.edit.indices[DOWN][0]] += 1.0
    save_file(data, str(f), metadata={"format": "pt"})
    return other, _weights(other)


def test_wrong_base_refused_and_force_base_applies(made, capsys):
    other, w = _modified_base(made)
    before = _tree(made.root)
    with pytest.raises(BaseMismatchError, match=r"wrong base.*force_base") as exc:
        apply_patch(other, made.patch, made.root / "out")
    assert DOWN in str(exc.value) and f"1 of {made.edit.indices[DOWN].numel()} differ" in str(exc.value)
    with pytest.raises(BaseMismatchError, match="wrong base"):  # applying twice
        apply_patch(made.edited, made.patch, made.root / "out")
    with pytest.raises(BaseMismatchError, match="edited checkpoint"):  # reverting the unedited base
        apply_patch(made.base, made.patch, made.root / "out", revert=True)
    assert "--force-base" in _cli_error(capsys, ["patch", "apply", "--base", str(other), "--patch", str(made.patch),
                                                 "--out", str(made.root / "out")])
    assert _tree(made.root) == before and not (made.root / "out").exists()
    out = apply_patch(other, made.patch, made.root / "out", force_base=True)
    assert _same_bits(_weights(out), _by_hand(w, made.edit, made.edit.values))
    capsys.readouterr()
    assert main(["patch", "apply", "--base", str(other), "--patch", str(made.patch), "--out",
                 str(made.root / "out2"), "--force-base"]) == 0
    assert _same_bits(_weights(made.root / "out2"), _weights(out))
    back = apply_patch(made.edited, made.patch, made.root / "back", revert=True)
    assert _same_bits(_weights(back), _weights(made.base))


def test_legacy_patch_refused_unless_allowed_then_checked_against_originals(made, capsys, caplog):
    mf = made.patch / "patch.json"
    man = json.loads(mf.read_text())
    del man["payload_sha256"]
    for p in man["params"].values():
        del p["base_entries_sha256"], p["edited_entries_sha256"]
    mf.write_text(json.dumps(man))
    with pytest.raises(LegacyPatchError, match="bias-lens patch create") as exc:
        apply_patch(made.base, made.patch, made.root / "out")
    assert "--allow-legacy" in str(exc.value)
    _cli_error(capsys, ["patch", "apply", "--base", str(made.base), "--patch", str(made.patch),
                        "--out", str(made.root / "out")])
    assert not (made.root / "out").exists()
    with caplog.at_level(logging.WARNING, logger="bias_lens.edit.patch_integrity"):
        out = apply_patch(made.base, made.patch, made.root / "out", allow_legacy=True)
    assert "legacy patch" in caplog.text
    assert _same_bits(_weights(out), _weights(made.edited))
    other, _ = _modified_base(made)
    with pytest.raises(BaseMismatchError, match="1 of"):  # the originals still guard the base
        apply_patch(other, made.patch, made.root / "out2", allow_legacy=True)
    assert not (made.root / "out2").exists()


def test_patch_without_originals_needs_force_base(made, tmp_path):
    save_patch(made.edit, tmp_path / "bare")
    man = json.loads((tmp_path / "bare" / "patch.json").read_text())
    assert man["has_original"] is False and all(p["base_entries_sha256"] is None for p in man["params"].values())
    with pytest.raises(BaseMismatchError, match="saved without originals"):
        apply_patch(made.base, tmp_path / "bare", tmp_path / "out")
    with pytest.raises(PatchError, match="cannot be reverted"):
        apply_patch(made.edited, tmp_path / "bare", tmp_path / "out", revert=True, force_base=True)
    assert not (tmp_path / "out").exists()
    out = apply_patch(made.base, tmp_path / "bare", tmp_path / "out", force_base=True)
    assert _same_bits(_weights(out), _weights(made.edited))
    with pytest.raises(ValueError, match="originals of"):  # originals that do not fit are refused before writing
        save_patch(made.edit, tmp_path / "bad", originals={n: o[:1] for n, o in made.orig.items()})
    assert not (tmp_path / "bad").exists()


def test_created_patch_refuses_wrong_base_and_warns_on_resaved_files(made, caplog):
    diff = create_patch(made.base, made.edited, made.root / "diff")
    assert json.loads((diff / "patch.json").read_text())["base_sha256"]
    resaved = made.root / "resaved"
    shutil.copytree(made.base, resaved)
    for f in resaved.glob("*.safetensors"):  # same tensors, other file bytes
        save_file(load_file(str(f)), str(f), metadata={"format": "pt", "note": "re-saved"})
    with caplog.at_level(logging.WARNING, logger="bias_lens.edit.patch"):
        out = apply_patch(resaved, diff, made.root / "out")
    assert "every patched entry matches" in caplog.text
    assert _same_bits(_weights(out), _weights(made.edited))
    with pytest.raises(BaseMismatchError, match="wrong base"):
        apply_patch(made.edited, diff, made.root / "twice")
