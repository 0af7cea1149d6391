"""MSME's nested locating (``Where(nesting="msme")``) against the locate functions called by hand.

Oracles: the nested module scan is the flat all-layer scan of :func:`module_scale` restricted to
:func:`layer_scale`'s top block (the same numbers, bit for bit); the row edit's mask is exactly the
``n_selected`` = round(keep x n_rows) kept rows of :func:`row_scale`, every column; the neuron
edit's entries are :func:`neuron_scale`'s with ``rows=`` that row result, all inside the kept rows;
the flat path's labels and masks equal today's recipe written out by hand (top FFN down of the
all-layer scan, top ``k``); the CLI flag reaches the recorded plan and bad input exits 2 with
nothing written.
"""

from __future__ import annotations

import json

import pytest
import torch

from bias_lens.arch import param_ref
from bias_lens.cli import main
from bias_lens.edit.masks import mask_from_labels
from bias_lens.edit.methods import MASKLESS, Equalise, Finetune, Masking
from bias_lens.labels import EntryLabel, RowLabel, parse_as
from bias_lens.locate.gradients import neuron_scale, row_scale
from bias_lens.locate.layers import layer_scale
from bias_lens.locate.modules import module_scale
from bias_lens.pipeline.driver import apply_plan, build_mask, locate, located_labels, split_samples
from bias_lens.pipeline.locate_stage import WEIGHT_MODULES, restrict_modules
from bias_lens.pipeline.plan import EditPlan, Where

from conftest import build_tiny
from test_cli_errors import _fails_cleanly

LIMITS = {"genbiaseval": 4, "retention": 2}
N = 8  # train samples located on


def _plan(scale: str, **where) -> EditPlan:
    return EditPlan(Masking(), Where(scale, **where), n_samples=N)


def _prompts(plan: EditPlan) -> list[str]:
    return [s["prompt"] for s in split_samples(plan)[0]]


def _layer(lm, prompts: list[str], n: int = 1) -> list[int]:
    return [int(lab[1:]) for lab in layer_scale(lm, prompts).top_labels(n)]


def _nested_module_by_hand(lm, prompts: list[str]) -> str:
    """The top weight matrix of the flat all-layer scan restricted to the Eq. 2 top block."""
    (layer,) = _layer(lm, prompts)
    flat = restrict_modules(module_scale(lm, prompts), WEIGHT_MODULES)
    mine = [i for i, lab in enumerate(flat.labels) if lab.startswith(f"L{layer}.")]
    best = max(mine, key=lambda i: (float(flat.scores[i]), -i))  # ties: the first in scan order
    return flat.labels[best]


def test_nested_module_scan_is_the_flat_scan_restricted_to_the_located_layer(tiny):
    plan = _plan("module", nesting="msme")
    prompts = _prompts(plan)
    res = locate(tiny, plan, split_samples(plan)[0])
    (layer,) = _layer(tiny, prompts)
    flat = module_scale(tiny, prompts)
    kinds = [k for k in WEIGHT_MODULES if f"L0.{k}" in flat.labels]
    assert res.labels == [f"L{layer}.{k}" for k in kinds]  # every weight matrix of the block, nothing else
    for j, lab in enumerate(res.labels):  # the all-layer scan's numbers: per prompt bit for bit, the mean to
        assert torch.equal(res.per_prompt[:, j], flat.per_prompt[:, flat.labels.index(lab)])  # summation order
        assert res.score_of(lab) == pytest.approx(flat.score_of(lab), rel=1e-12)
    assert located_labels(plan, res) == [_nested_module_by_hand(tiny, prompts)]
    chain = res.extras["chain"]
    assert chain["layers"] == [f"L{layer}"] and chain["modules"] == pytest.approx(
        {lab: flat.score_of(lab) for lab in res.labels}, rel=1e-12)
    top = max(res.scores.tolist())
    assert chain["module_ties"] == [lab for lab in res.labels if res.score_of(lab) == top]


def test_nested_scan_over_two_layers_and_top_k_modules(tiny_llama):
    plan = _plan("module", nesting="msme", n_layers=2, k=3)
    prompts = _prompts(plan)
    res = locate(tiny_llama, plan, split_samples(plan)[0])
    layers = _layer(tiny_llama, prompts, 2)
    assert res.extras["layers"] == sorted(layers)
    flat = module_scale(tiny_llama, prompts, layers=sorted(layers), modules=list(WEIGHT_MODULES))
    assert torch.equal(res.scores, flat.scores) and located_labels(plan, res) == flat.top_labels(3)


@pytest.mark.parametrize("keep,order", [(0.5, "descending"), (0.25, "ascending")])
def test_row_edit_masks_every_kept_row_all_columns(tiny_llama, keep, order):
    plan = _plan("row", nesting="msme", row_keep=keep, row_order=order)
    prompts = _prompts(plan)
    res = locate(tiny_llama, plan, split_samples(plan)[0])
    module = _nested_module_by_hand(tiny_llama, prompts)
    hand = row_scale(tiny_llama, prompts, module, order=order, keep=keep)
    assert torch.equal(res.scores, hand.scores) and res.extras["module"] == module
    n_rows = hand.extras["n_rows"]
    assert hand.extras["n_selected"] == round(keep * n_rows)
    labels = located_labels(plan, res)
    assert sorted(labels) == sorted(hand.extras["selected"]) and len(labels) == round(keep * n_rows)
    kept = {parse_as(lab, RowLabel).row for lab in labels}
    cos = hand.scores.tolist()
    inside, outside = [cos[r] for r in kept], [cos[r] for r in range(n_rows) if r not in kept]
    assert (min(inside) >= max(outside)) if order == "descending" else (max(inside) <= min(outside))
    mask = build_mask(tiny_llama, plan, res)
    ref = param_ref(tiny_llama.hf, module)  # Llama: stored [out, in], a row is a stored row
    want = torch.zeros(ref.weight_view(tiny_llama.hf).shape, dtype=torch.bool)
    want[sorted(kept)] = True  # whole rows: every column
    assert list(mask.masks) == [ref.weight_name] and torch.equal(mask.masks[ref.weight_name], want)
    chain = res.extras["chain"]
    assert chain["module"] == module and chain["rows"]["selected_rows"] == sorted(kept)
    assert (chain["rows"]["n_selected"], chain["rows"]["order"]) == (len(kept), order)


def test_neuron_entries_are_neuron_scale_inside_the_kept_rows(tiny_llama):
    plan = _plan("neuron", nesting="msme")
    prompts = _prompts(plan)
    res = locate(tiny_llama, plan, split_samples(plan)[0])
    module = _nested_module_by_hand(tiny_llama, prompts)
    rows = row_scale(tiny_llama, prompts, module)
    hand = neuron_scale(tiny_llama, prompts, module, rows=rows)
    assert res.labels == hand.labels and torch.equal(res.scores, hand.scores)
    kept = set(rows.extras["selected_rows"])
    assert all(parse_as(lab, EntryLabel).row in kept for lab in res.labels)
    labels = located_labels(plan, res)
    assert sorted(labels) == sorted(hand.labels)  # the whole entry set, no top-k cut
    assert build_mask(tiny_llama, plan, res).size == len(hand.labels) == mask_from_labels(tiny_llama.hf, hand.labels).size
    assert res.extras["chain"]["entries"]["n_entries"] == len(hand.labels)


def test_flat_path_is_todays_recipe(tiny_llama):
    plan0 = EditPlan(Masking(), Where("row"), n_samples=N)
    old = json.loads(json.dumps(plan0.to_dict()))
    for key in ("nesting", "n_layers", "row_keep", "row_order"):
        del old["where"][key]  # a plan written before the fields existed reads as flat
    assert EditPlan.from_dict(old).where == plan0.where and plan0.where.nesting == "flat"
    prompts = _prompts(plan0)
    full = module_scale(tiny_llama, prompts)
    top = restrict_modules(full, ("mlp.down",)).top_labels(1)[0]
    hand = {"module": full.top_labels(1), "row": row_scale(tiny_llama, prompts, top).top_labels(4),
            "neuron": neuron_scale(tiny_llama, prompts, top).top_labels(4096)}
    train = split_samples(plan0)[0]
    for scale, labels in hand.items():
        plan = EditPlan(Masking(), Where(scale), n_samples=N)
        assert located_labels(plan, locate(tiny_llama, plan, train)) == labels
    snap = {n: p.detach().clone() for n, p in tiny_llama.hf.named_parameters()}
    run = apply_plan(tiny_llama, plan0, limits=LIMITS, batch_size=8)
    run.handle.undo()
    assert run.record.labels == hand["row"] and run.record.cost_p == 4 * 96 and "located_chain" not in run.record.info
    assert all(torch.equal(p, snap[n]) for n, p in tiny_llama.hf.named_parameters())


def test_apply_plan_records_the_located_chain(tiny_llama):
    plan = _plan("neuron", nesting="msme")
    snap = {n: p.detach().clone() for n, p in tiny_llama.hf.named_parameters()}
    run = apply_plan(tiny_llama, plan, limits=LIMITS, batch_size=8)
    try:
        chain = run.record.info["located_chain"]
        changed = {n: int((p != snap[n]).sum()) for n, p in tiny_llama.hf.named_parameters() if not torch.equal(p, snap[n])}
    finally:
        run.handle.undo()
    assert all(torch.equal(p, snap[n]) for n, p in tiny_llama.hf.named_parameters())
    ent = run.located
    assert chain["module"] == ent.extras["module"] and chain["layers"] == [ent.extras["module"].split(".")[0]]
    assert chain["entries"]["n_entries"] == len(ent.labels) == run.record.cost_p
    assert chain["rows"]["selected_rows"] == ent.extras["rows"]
    assert sum(changed.values()) == run.record.n_changed <= run.record.cost_p  # zeroed entries, nothing else
    assert run.record.plan["where"]["nesting"] == "msme"


def test_where_round_trips_and_rejects_bad_nesting():
    plan = EditPlan(Finetune(), Where("neuron", nesting="msme", n_layers=2, row_keep=0.25, row_order="ascending"))
    d = json.loads(json.dumps(plan.to_dict()))
    assert {k: d["where"][k] for k in ("nesting", "n_layers", "row_keep", "row_order")} == {
        "nesting": "msme", "n_layers": 2, "row_keep": 0.25, "row_order": "ascending"}
    back = EditPlan.from_dict(d)
    assert (back.where, back.method) == (plan.where, plan.method)
    bad = [(dict(scale="row", nesting="deep"), "nesting must be"), (dict(scale="layer", nesting="msme"), "no nesting"),
           (dict(scale="attribution", nesting="msme"), "no nesting"), (dict(scale="row", nesting="msme", k=4), "row-keep instead"),
           (dict(scale="module", n_layers=2), "n-layers counts"), (dict(scale="row", nesting="msme", row_keep=0), "row-keep must"),
           (dict(scale="row", row_keep=1.5), "row-keep must"), (dict(scale="row", row_order="up"), "row-order must"),
           (dict(scale="module", row_keep=0.25), "change nothing"), (dict(scale="row", row_keep=0.25), "change nothing"),
           (dict(scale="module", nesting="msme", n_layers=0), "n-layers must")]
    for kw, needle in bad:
        with pytest.raises(ValueError, match=needle):
            Where(**kw)
    with pytest.raises(ValueError, match="use nesting 'flat'"):
        EditPlan(Equalise(), Where("module", nesting="msme"))


def test_cli_nesting_flag_reaches_the_plan(tiny_tokenizer_dir, tmp_path, capsys):
    from bias_lens.cli.edit import MASKLESS_METHODS

    assert MASKLESS_METHODS == MASKLESS
    lm = build_tiny("llama", tiny_tokenizer_dir, tmp_path / "base")
    capsys.readouterr()
    argv = ["edit", "--method", "mask", "--scale", "row", "--nesting", "msme", "--model", str(tmp_path / "base"),
            "--n-samples", "8", "--limit", "4", "--ub-limit", "2", "--retention-limit", "2", "--batch-size", "8", "--json"]
    assert main(argv) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["plan"]["where"]["nesting"] == "msme" and res["info"]["located_chain"]["nesting"] == "msme"
    rows = res["info"]["located_chain"]["rows"]
    n_cols = param_ref(lm.hf, res["info"]["located_chain"]["module"]).weight_view(lm.hf).shape[1]
    assert rows["n_selected"] == round(0.5 * rows["n_rows"]) and res["mask_size"] == rows["n_selected"] * n_cols


@pytest.mark.parametrize("extra,needle", [
    (["--method", "fpft", "--nesting", "msme"], "not to --method fpft"),
    (["--method", "msme", "--scale", "attribution", "--nesting", "flat"], "not to --scale attribution"),
    (["--method", "msme", "--scale", "layer", "--nesting", "msme"], "no nesting"),
    (["--method", "msme", "--scale", "row", "--k", "4", "--nesting", "msme"], "row-keep instead"),
    (["--method", "equalise", "--scale", "module", "--nesting", "msme"], "use nesting 'flat'"),
])
def test_cli_bad_nesting_exits_2_and_writes_nothing(tmp_path, monkeypatch, capsys, extra, needle):
    monkeypatch.chdir(tmp_path)
    _fails_cleanly(capsys, tmp_path, ["edit", *extra, "--out", str(tmp_path / "out")], needle)
    assert not (tmp_path / "out").exists()


def test_cli_unknown_nesting_is_a_usage_error(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as err:
        main(["edit", "--method", "msme", "--scale", "row", "--nesting", "deep", "--out", str(tmp_path / "out")])
    assert err.value.code == 2 and "invalid choice" in capsys.readouterr().err and not any(tmp_path.iterdir())
