"""Masks, edits, losses and sparse patches on tiny models: oracles are torch.equal and hand computation."""

from __future__ import annotations

import json

import pytest
import torch

from bias_lens.arch import param_ref
from bias_lens.edit import Edit, ParamMask, mask_from_labels, mask_from_result, without_attention, without_mlp
from bias_lens.edit import losses
from bias_lens.edit.masks import mask_all
from bias_lens.edit.patch import apply_patch, create_patch, load_patch, save_patch
from bias_lens.locate.result import LocateResult


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def assert_same(model, snap) -> None:
    for n, p in model.named_parameters():
        assert torch.equal(p, snap[n]), n


def changed(model, snap) -> dict[str, torch.Tensor]:
    return {n: p.detach() != snap[n] for n, p in model.named_parameters() if not torch.equal(p, snap[n])}


# --------------------------------------------------------------------------- masks
def test_module_row_entry_masks_follow_orientation(tiny):
    hf = tiny.hf
    ref = param_ref(hf, "L1.mlp.down")
    m = mask_from_labels(hf, ["L1.mlp.down/row5", "L1.mlp.down/row7/col3"])
    w = m.masks[ref.weight_name]
    view = w.T if ref.transposed else w
    assert view.shape == (tiny.d_model, tiny.d_mlp)
    expect = torch.zeros_like(view)
    expect[5] = True
    expect[7, 3] = True
    assert torch.equal(view, expect)
    assert m.size == tiny.d_mlp + 1
    mod = mask_from_labels(hf, ["L2.attn.v"])
    vref = param_ref(hf, "L2.attn.v")
    n_bias = vref.bias_view(hf).numel() if vref.bias_name else 0
    assert mod.size == vref.weight_view(hf).numel() + n_bias


def test_neuron_mask_is_down_column_plus_gate_up_rows(tiny):
    hf = tiny.hf
    m = mask_from_labels(hf, ["L0N11"])
    down = param_ref(hf, "L0.mlp.down")
    dv = m.masks[down.weight_name]
    dv = dv.T if down.transposed else dv
    assert dv[:, 11].all() and dv.sum() == tiny.d_model
    kinds = ["mlp.gate", "mlp.up"] if tiny.arch.gated_mlp else ["mlp.up"]
    total = tiny.d_model
    for kind in kinds:
        r = param_ref(hf, f"L0.{kind}")
        wv = m.masks[r.weight_name]
        wv = wv.T if r.transposed else wv
        assert wv[11].all() and wv.sum() == tiny.d_model
        total += tiny.d_model + (1 if r.bias_name else 0)
    assert m.size == total


def test_head_layer_masks_and_algebra(tiny):
    hf = tiny.hf
    dh = tiny.d_head
    h = mask_from_labels(hf, ["L1H2"])
    q, o = param_ref(hf, "L1.attn.q"), param_ref(hf, "L1.attn.o")
    qm = h.masks[q.weight_name]
    qv = (qm.T if q.transposed else qm)[q.rows] if q.rows is not None else (qm.T if q.transposed else qm)
    assert qv[2 * dh : 3 * dh].all() and qv.sum() == dh * tiny.d_model
    om = h.masks[o.weight_name]
    ov = om.T if o.transposed else om
    assert ov[:, 2 * dh : 3 * dh].all() and ov.sum() == dh * tiny.d_model
    layer = mask_from_labels(hf, ["L2"])
    n_block = sum(p.numel() for n, p in hf.named_parameters() if n.startswith(f"{tiny.arch.layers}.2."))
    assert layer.size == n_block
    mod = mask_from_labels(hf, ["L2.mlp.down"])
    assert (layer & mod).size == mod.size and (layer | mod).size == layer.size
    assert (mod | h).size == mod.size + h.size and (mod & h).size == 0
    mlp_part = sum(int(m.sum()) for n, m in layer.masks.items() if f".{tiny.arch.mlp}." in n)
    attn_part = sum(int(m.sum()) for n, m in layer.masks.items() if f".{tiny.arch.attn}." in n)
    assert mlp_part > 0 and attn_part > 0
    assert without_mlp(layer, tiny).size == layer.size - mlp_part
    assert without_attention(layer, tiny).size == layer.size - attn_part
    assert all(".mlp." not in n for n in without_mlp(layer, tiny).names)
    assert all(f".{tiny.arch.attn}." not in n for n in without_attention(layer, tiny).names)


def test_mask_from_result_takes_top_k_and_rejects_bad_labels(tiny_llama):
    res = LocateResult("x", ["L0.mlp.up", "L1.mlp.down", "L2N3"], torch.tensor([0.1, 0.9, 0.5]))
    m = mask_from_result(tiny_llama.hf, res, k=2)
    assert set(m.names) >= {"model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight"}
    assert "model.layers.0.mlp.up_proj.weight" not in m.names
    for bad in ["L9.mlp.down", "L0.mlp.down/row999", "L0N9999", "nonsense"]:
        with pytest.raises((ValueError, KeyError)):
            mask_from_labels(tiny_llama.hf, [bad])


# --------------------------------------------------------------------------- edits
def test_apply_changes_only_masked_entries_and_undo_is_bit_exact(tiny):
    hf = tiny.hf
    snap = snapshot(hf)
    mask = mask_from_labels(hf, ["L1.mlp.down/row3", "L0N5", "L2.attn.q", "L1H1"])
    edit = Edit.from_fn(hf, mask, lambda n, old: old * 3 + 1)
    assert_same(hf, snap)  # computing touched nothing
    h = edit.apply_(tiny)
    diff = changed(hf, snap)
    for n, d in diff.items():
        assert not (d & ~mask.masks[n]).any(), f"{n} changed outside the mask"
    assert sum(int(d.sum()) for d in diff.values()) == mask.size  # x*3+1 != x for these values
    assert h.size == mask.size
    h.undo()
    assert_same(hf, snap)
    with pytest.raises(RuntimeError):
        h.undo()


def test_apply_refuses_mismatch_and_changes_nothing(tiny_llama, tiny_tokenizer_dir, tmp_path):
    from conftest import build_tiny

    hf = tiny_llama.hf
    mask = mask_from_labels(hf, ["L0.mlp.down", "L1.mlp.up"])
    edit = Edit.scale(hf, mask, 0.0)
    other = build_tiny("gpt2", tiny_tokenizer_dir, tmp_path / "g")
    snap = snapshot(other.hf)
    with pytest.raises(ValueError, match="does not have"):
        edit.apply_(other)
    assert_same(other.hf, snap)
    snap = snapshot(hf)
    bad_shape = Edit(dict(edit.indices), dict(edit.values), {**edit.shapes, "model.layers.1.mlp.up_proj.weight": (1, 96 * 48)},
                     edit.dtypes, edit.layouts)
    with pytest.raises(ValueError, match="shape"):
        bad_shape.apply_(hf)
    bad_dtype = Edit(edit.indices, edit.values, edit.shapes, {**edit.dtypes, "model.layers.0.mlp.down_proj.weight": torch.float16},
                     edit.layouts)
    with pytest.raises(ValueError, match="dtype"):
        bad_dtype.apply_(hf)
    bad_layout = Edit(edit.indices, edit.values, edit.shapes, edit.dtypes, {n: "in_out" for n in edit.layouts})
    with pytest.raises(ValueError, match="layout"):
        bad_layout.apply_(hf)
    assert_same(hf, snap)


def test_edits_compose_later_wins_and_undo_stack(tiny):
    hf = tiny.hf
    snap = snapshot(hf)
    a = Edit.from_fn(hf, mask_from_labels(hf, ["L1.mlp.down/row2", "L1.mlp.down/row4"]), lambda n, o: o + 1)
    b = Edit.from_fn(hf, mask_from_labels(hf, ["L1.mlp.down/row4", "L0.mlp.up/row0"]), lambda n, o: o - 7)
    both = a.then(b)
    h = both.apply_(hf)
    after = snapshot(hf)
    h.undo()
    ha, hb = a.apply_(hf), b.apply_(hf)
    for n, p in hf.named_parameters():
        assert torch.equal(p, after[n]), n
    hb.undo()
    ha.undo()
    assert_same(hf, snap)


# --------------------------------------------------------------------------- losses (hand-computed values)
def test_losses_against_hand_values():
    p = torch.tensor([[0.3, 0.1], [0.2, 0.2]], dtype=torch.float64)
    f = torch.tensor([[0.5, 0.5], [0.6, 0.4]], dtype=torch.float64)
    assert losses.msme_literal(p, f).item() == pytest.approx(((0.15 + 0.05) + (0.12 + 0.08)) / 2)
    q1 = (0.75, 0.25)
    kl1 = 0.5 * torch.log(torch.tensor(0.5 / q1[0])) + 0.5 * torch.log(torch.tensor(0.5 / q1[1]))
    kl2 = 0.6 * torch.log(torch.tensor(0.6 / 0.5)) + 0.4 * torch.log(torch.tensor(0.4 / 0.5))
    assert losses.msme_align(p, f).item() == pytest.approx(float(kl1 + kl2) / 2)
    assert losses.msme_align_l2(p, f).item() == pytest.approx(((0.25**2) * 2 + (0.1**2) * 2) / 2)
    assert losses.lftf(p).item() == pytest.approx((0.4 + 0.4) / 2)
    assert losses.LOSSES["lftf_no_he"](p, f).item() == pytest.approx(0.15)
    assert losses.LOSSES["lftf_no_she"](p, f).item() == pytest.approx(0.25)
    assert losses.gap(p).item() == pytest.approx(0.1)
    assert losses.msme_align(torch.tensor([[0.06, 0.04]]), torch.tensor([[0.6, 0.4]])).item() == pytest.approx(0, abs=1e-7)
    with pytest.raises(ValueError):
        losses.get_loss("nope")
    with pytest.raises(ValueError):
        losses.msme_literal(p, f[:1])


# --------------------------------------------------------------------------- patches
def test_patch_round_trip_bit_exact_on_fresh_base(tiny, tmp_path):
    from transformers import AutoModelForCausalLM

    base_dir = tiny.hf.config._name_or_path
    mask = mask_from_labels(tiny.hf, ["L2.mlp.down/row1", "L0N4", "L1H0"])
    edit = Edit.from_fn(tiny.hf, mask, lambda n, o: o * -2.5 + 0.125)
    h = edit.apply_(tiny)
    edited = snapshot(tiny.hf)
    save_patch(edit, tmp_path / "p", originals=h.originals, base_name=tiny.name)
    edit2, orig, man = load_patch(tmp_path / "p")
    assert man["params"] and set(edit2.indices) == set(edit.indices)
    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    edit2.apply_(fresh)
    for n, p in fresh.named_parameters():
        assert torch.equal(p, edited[n]), n
    # checkpoint-level apply, revert and diff
    out = apply_patch(base_dir, tmp_path / "p", tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, edited[n]), n
    back = apply_patch(out, tmp_path / "p", tmp_path / "reverted", revert=True)
    h.undo()
    for n, p in AutoModelForCausalLM.from_pretrained(back).named_parameters():
        assert torch.equal(p, dict(tiny.hf.named_parameters())[n]), n
    diff = create_patch(base_dir, out, tmp_path / "diff")
    d_edit, d_orig, _ = load_patch(diff)
    assert d_edit.size == sum(edit.changed_counts(tiny.hf).values())
    with pytest.raises(FileExistsError):
        apply_patch(base_dir, tmp_path / "p", tmp_path / "edited")
    with pytest.raises(ValueError, match="wrong base"):  # applying twice: entries are no longer the originals
        apply_patch(out, tmp_path / "p", tmp_path / "twice")
    assert not (tmp_path / "twice").exists()
    assert json.loads((tmp_path / "p" / "patch.json").read_text())["format"] == "bias_lens.patch/1"


def test_mask_all_counts_every_parameter(tiny_llama):
    assert mask_all(tiny_llama).size == sum(p.numel() for p in tiny_llama.hf.parameters())
    assert isinstance(ParamMask({}), ParamMask) and ParamMask({}).size == 0
