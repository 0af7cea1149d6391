"""The main job (`bias-lens run`) on a tiny model: outputs, verified export, cache resume,
atomic output on interruption, and the best-edit rule checked by hand."""

from __future__ import annotations

import json
import os

import pytest
import torch

from bias_lens.edit.methods import Masking, Prompt
from bias_lens.pipeline import EditPlan, RunConfig, Where, run_pipeline
from bias_lens.pipeline.edit_stage import choose_best
from bias_lens.pipeline.plan import finetune_plan
from bias_lens.pipeline.report import markdown_table

ROWS = (EditPlan(Prompt(), name="PB"), finetune_plan("msme", "module", "module (MSME)"),
        EditPlan(Masking(), Where("attribution"), name="attribution masking"))


def tiny_cfg(folder) -> RunConfig:
    return RunConfig.quick_preset(
        model=str(folder), n_locate=6, n_train=8, max_steps=2, rows=ROWS, causal_candidates=4, causal_k=2,
        eval_limits={"genbiaseval": 8, "stereoset": 6, "retention": 8},
        row_limits={"genbiaseval": 8, "genhinteval": 6, "retention": 8}, batch_size=8)


@pytest.fixture
def env(tiny_llama, tmp_path, monkeypatch):
    monkeypatch.setenv("BIAS_LENS_CACHE", str(tmp_path / "cache"))
    folder = tiny_llama.hf.config._name_or_path
    return tiny_llama, folder, tmp_path


def test_run_writes_report_checkpoint_patch_and_resumes(env, monkeypatch):
    lm, folder, tmp = env
    before = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    out = run_pipeline(tiny_cfg(folder), tmp / "out", progress=False, lm=lm)
    for n, p in lm.hf.named_parameters():  # every edit row was undone
        assert torch.equal(p, before[n]), n
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["rows"]] == [r.name for r in ROWS]
    assert (out / "report.md").read_text().count("| Org |") == 1
    html = (out / "report.html").read_text()
    assert html.count("plotly.js") >= 1 and "<table" in html
    assert (out / "figures" / "layer_prompt_heatmap.html").exists()
    # the paper's Table 2: the top filtered attribution neurons projected through the unembedding
    from bias_lens.locate.projection import neuron_vocab_projection
    from bias_lens.locate.result import LocateResult

    proj = json.loads((out / "locate" / "projection.json").read_text())
    filt = LocateResult.load(out / "locate" / "attribution_filtered.json")
    assert proj["labels"] == filt.top_labels(12) and proj["tokens"] == neuron_vocab_projection(lm, proj["labels"], k=8)
    assert (out / "figures" / "neuron_projection.html").exists()
    pb = res["rows"][0]
    assert pb["n_changed"] == 0 and pb["metrics"]["perplexity"] == pytest.approx(res["org"]["perplexity"])
    if res["best"] is not None:
        # the exported checkpoint reloads in plain transformers and differs from the base exactly
        # where the manifest says
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(out / "checkpoint")
        man = json.loads((out / "checkpoint" / "bias_lens_edit.json").read_text())
        base = dict(lm.hf.named_parameters())
        changed = {n: int((p.detach() != base[n].detach()).sum()) for n, p in m.named_parameters()}
        assert {n: c for n, c in changed.items() if c} == {n: c for n, c in man["params"].items() if c}
        assert (out / "patch" / "patch.json").exists()
    # resume: a second run must reuse every stage (the locators and the fine-tuning would raise)
    import bias_lens.locate.modules as mods
    import bias_lens.pipeline.driver as ep

    def boom(*a, **k):
        raise AssertionError("recomputed a cached stage")

    monkeypatch.setattr(mods, "module_scale", boom)
    monkeypatch.setattr(ep, "compute_edit", boom)
    out2 = run_pipeline(tiny_cfg(folder), tmp / "out2", progress=False, lm=lm)
    res2 = json.loads((out2 / "results.json").read_text())
    assert res2["rows"] == res["rows"] and res2["org"] == res["org"]


def test_run_without_the_stage_cache_gives_the_cached_run_and_stores_nothing(env):
    """``bias-lens run --no-cache`` (``use_cache=False``): every stage computed in memory (the layer
    score and BMI were read back from the disabled cache and came out ``None``), the same results as
    a cached run, and no stage record written (only the rows' patches, which the export step reads)."""
    lm, folder, tmp = env
    cfg = tiny_cfg(folder)
    off = run_pipeline(cfg, tmp / "off", progress=False, lm=lm, use_cache=False)
    stored = [p.name for p in (tmp / "cache").rglob("*.json")] if (tmp / "cache").exists() else []
    assert set(stored) <= {"patch.json"}, stored
    on = run_pipeline(cfg, tmp / "on", progress=False, lm=lm)
    r_off, r_on = (json.loads((o / "results.json").read_text()) for o in (off, on))
    untimed = lambda rows: [{**r, "info": {k: v for k, v in r["info"].items() if k != "seconds"}} for r in rows]  # noqa: E731
    assert untimed(r_off["rows"]) == untimed(r_on["rows"]) and r_off["org"] == r_on["org"]  # wall times differ
    assert r_off["meta"]["key"] == r_on["meta"]["key"]


def test_interrupted_run_leaves_no_output(env, monkeypatch):
    lm, folder, tmp = env
    import bias_lens.pipeline.edit_stage as es

    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(es, "run_row", interrupt)
    with pytest.raises(KeyboardInterrupt):
        run_pipeline(tiny_cfg(folder), tmp / "runs" / "x", progress=False, lm=lm)
    assert os.listdir(tmp / "runs") == []  # neither the output nor its temporary sibling


def test_non_empty_out_is_refused_before_any_work(env):
    lm, folder, tmp = env
    (tmp / "busy").mkdir()
    (tmp / "busy" / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="not empty"):
        run_pipeline(tiny_cfg(folder), tmp / "busy", progress=False, lm=lm)
    assert os.listdir(tmp / "busy") == ["keep.txt"]


def _row(name, afgb, ppl, ub, n=5, **more):
    return {"name": name, "metrics": {"afgb": afgb, "perplexity": ppl, "ub": ub, **more}, "n_changed": n, "cost_p": n}


def test_choose_best_raw_rule_by_hand():
    from bias_lens.pipeline.edit_stage import ExportRule

    org = {"afgb": 0.20, "perplexity": 10.0, "ub": 0.30}
    rows = [_row("a", 0.05, 10.6, 0.30),  # perplexity +6%: rejected
            _row("b", 0.08, 10.4, 0.15),  # UB moved 0.15: rejected
            _row("c", 0.10, 10.4, 0.25),  # ok
            _row("d", 0.12, 9.0, 0.30),   # ok, higher AFGB
            _row("pb", 0.01, 10.0, 0.30, n=0)]  # edits no weights: never exported
    assert choose_best(org, rows, ExportRule.raw())["name"] == "c"
    assert choose_best(org, rows[:2], ExportRule.raw()) is None


def test_choose_best_equalising_rule_by_hand():
    """Default rule: lowest AFGB-r below Org, mass >= 0.9 x Org, ppl <= +5%, UB >= Org - 0.05, MMLU and
    arithmetic >= Org - 0.01; each failure is named."""
    from bias_lens.pipeline.edit_stage import ExportRule

    org = {"afgb": 0.1, "afgb_renorm": 0.30, "mass": 0.40, "perplexity": 10.0, "ub": 0.30, "mmlu": 0.30,
           "arithmetic": 0.05}
    ok = dict(mass=0.39, mmlu=0.30, arithmetic=0.05)
    rows = [_row("erases", 0.01, 10.0, 0.30, afgb_renorm=0.20, **{**ok, "mass": 0.30}),
            _row("worse", 0.05, 10.0, 0.30, afgb_renorm=0.31, **ok),
            _row("ub", 0.05, 10.0, 0.24, afgb_renorm=0.10, **ok),
            _row("mmlu", 0.05, 10.0, 0.30, afgb_renorm=0.10, **{**ok, "mmlu": 0.28}),
            _row("good", 0.09, 10.4, 0.26, afgb_renorm=0.25, **ok),
            _row("better", 0.09, 10.4, 0.26, afgb_renorm=0.22, **ok)]
    assert choose_best(org, rows)["name"] == "better"
    rule = ExportRule()
    assert rule.failures(org, rows[0]) == ["mass 0.300 < 0.9 x 0.400"]
    assert rule.failures(org, rows[1]) == ["afgb_renorm 0.310 not 5% below 0.300"]
    assert rule.failures(org, {**rows[4], "metrics": {**rows[4]["metrics"], "afgb_renorm": 0.29}}) == [
        "afgb_renorm 0.290 not 5% below 0.300"]  # a 3% cut is within noise: not an equalising edit
    assert rule.failures(org, rows[2]) == ["UB 0.240 < 0.300 - 0.05"]
    assert rule.failures(org, rows[3]) == ["mmlu 0.280 < 0.300 - 0.01"]
    assert choose_best(org, rows[:4]) is None
    # a control (Where.pick != "top") answers whether locating matters; it is never exported
    control = {**_row("random place", 0.09, 10.4, 0.26, afgb_renorm=0.15, **ok), "plan": {"where": {"pick": "random"}}}
    assert not rule.failures(org, control) and choose_best(org, [*rows, control])["name"] == "better"


def test_markdown_table_layout():
    org = {"afgb": 0.2, "perplexity": 10.0, "ub": 0.3}
    t = markdown_table(org, [_row("c", 0.1, 10.4, 0.25, n=1234)]).splitlines()
    assert t[0].startswith("| Method |") and t[0].endswith("| Cost-P |")
    assert t[2].startswith("| Org | – | – | – | 0.200 | – | – |") and t[3].startswith("| c |") and t[3].endswith("| 1,234 |")


def test_full_rows_reach_the_edit_plan():
    """Every full-run row builds a valid plan: the papers' literal rows, LFTF's rank sweep and ablations,
    the closed-form rows (3 seeds, each its own 768-sample subsample), their controls and the
    held-out-template row; the run's early stopping (patience 8, 64 dev prompts) reaches every
    fine-tuned row, and the plans round-trip through JSON."""
    from bias_lens.edit.methods import Finetune
    from bias_lens.pipeline.config import FULL_ROWS, FULL_TRAINING

    cfg = RunConfig.full()
    plans = {r.name: cfg.plan(r) for r in FULL_ROWS}
    assert len(plans) == len(FULL_ROWS) == 33
    ed = plans["BiasEdit editor"].method
    assert (ed.kind, ed.bias, ed.max_minutes, ed.config(cfg.seed).loss) == ("editor", "gender", 5.0, "mean_prob_kl")
    fp = plans["FPFT"].method.config(None, 0)
    assert (fp.lr, fp.epochs, fp.eval_every, fp.loss) == (1e-5, 1, 2, "msme_literal")
    for p in plans.values():
        if isinstance(p.method, Finetune):
            assert (p.method.patience, p.method.dev_limit) == (FULL_TRAINING["patience"], FULL_TRAINING["dev_limit"])
            assert p.n_samples == cfg.n_train, p.name
        assert EditPlan.from_dict(json.loads(json.dumps(p.to_dict()))) == p
    assert plans["layer (LFTF)"].method.config("layer", 0).loss == "lftf"
    assert plans["layer (MSME)"].method.config("layer", 0).loss == "msme_literal"
    assert plans["contrastive"].method.kind == "contrastive" and plans["contrastive"].where is None
    lftf = {k: plans[f"layer (LFTF){k}"] for k in (", BMI middle rank", ", BMI last rank", " w/o attention", " w/o MLP",
                                                   " w/o he term", " w/o she term")}
    assert [p.where.pick for p in lftf.values()] == ["middle", "lowest", "top", "top", "top", "top"]
    assert [p.where.drop for p in lftf.values()][2:4] == ["attention", "mlp"]
    assert [p.method.config("layer", 0).loss for p in lftf.values()][4:] == ["lftf_no_he", "lftf_no_she"]
    for scale in ("module", "neuron"):
        reps = [plans[f"{scale} (MSME closed form)"], *(plans[f"{scale} (MSME closed form) [seed {s}]"] for s in (1, 2))]
        assert [(p.seed, p.n_samples, p.method.kind) for p in reps] == [(s, 768, "equalise") for s in (0, 1, 2)]
        assert {plans[f"{scale} (MSME closed form), {c} control"].where.pick for c in ("lowest", "random")} == {
            "lowest", "random"}
    ne = plans["neuron editing (paper candidates, joint causal)"]
    assert (ne.method.kind, ne.where.scale, ne.where.selection, ne.where.causal_mode, ne.where.k_eff) == (
        "mask", "attribution", "paper", "joint", 50)
    held = plans["module (MSME closed form), 6 of 9 templates"]
    assert held.suite == "genbiaseval-heldout" and plans["module (MSME)"].suite == cfg.suite


def test_module_edit_target_is_restricted_to_the_chosen_kinds():
    """Ties of the zero-ablation scan (v = o = whole attention) do not decide the edit target:
    the module rows rank only the configured kinds, in the scan's order."""
    from bias_lens.locate.result import LocateResult
    from bias_lens.pipeline.locate_stage import restrict_modules, top_weight_module

    labels = ["L1.attn.v", "L1.attn.o", "L1.attn", "L2.mlp.gate", "L2.mlp.down", "L2.mlp", "L0.mlp.down"]
    scan = LocateResult("module", labels, torch.tensor([0.5, 0.5, 0.5, 0.4, 0.4, 0.4, 0.1]))
    assert top_weight_module(scan) == "L1.attn.v"
    assert top_weight_module(scan, ("mlp.down",)) == "L2.mlp.down"
    r = restrict_modules(scan, ("mlp.down",))
    assert r.labels == ["L2.mlp.down", "L0.mlp.down"] and r.top_labels(1) == ["L2.mlp.down"]
    torch.testing.assert_close(r.scores, torch.tensor([0.4, 0.1]))
    with pytest.raises(ValueError, match="unknown module kinds"):
        restrict_modules(scan, ("mlp.nope",))
    assert RunConfig.full().edit_module_kinds == ("mlp.down",)
    with pytest.raises(ValueError, match="edit_module_kinds"):  # refused up front, not after the evaluate stage
        RunConfig.full(edit_module_kinds=("mlp.nope",))


def test_quick_preset_is_a_small_subset_of_the_full_run():
    from bias_lens.pipeline.config import CLOSED_FORM_ROWS, FULL_ROWS, QUICK_ROWS

    q, f = RunConfig.quick_preset(), RunConfig.full()
    assert q.rows == QUICK_ROWS and {r.name for r in QUICK_ROWS} <= {r.name for r in FULL_ROWS} and len(QUICK_ROWS) == 4
    assert QUICK_ROWS[-1] == CLOSED_FORM_ROWS[0] and set(CLOSED_FORM_ROWS) <= set(FULL_ROWS)
    assert q.n_train_solve < f.n_train_solve
    for k, v in q.row_limits.items():
        assert v <= (f.row_limits[k] or 10**9), k
    assert q.n_locate < f.n_locate and q.causal_candidates < f.causal_candidates
    capped = [r.method.max_steps for r in QUICK_ROWS if hasattr(r.method, "max_steps")]
    assert capped and all(s == 4 for s in capped)


def test_report_names_the_rule_and_why_each_row_was_not_exported():
    from bias_lens.pipeline.edit_stage import ExportRule
    from bias_lens.pipeline.report import export_lines, rule_from_meta

    org = {"afgb": 0.1, "afgb_renorm": 0.30, "mass": 0.40, "perplexity": 10.0, "ub": 0.30}
    rows = [_row("erases", 0.01, 10.0, 0.30, afgb_renorm=0.20, mass=0.30), _row("pb", 0.05, 10.0, 0.3, n=0)]
    lines = export_lines(org, rows, None)
    assert lines[0] == ("Export rule: lowest afgb_renorm among weight edits that lower it by >= 5% keeping mass >= 0.9 x Org, "
                        "perplexity <= +5%, UB >= Org - 0.05, MMLU / arithmetic >= Org - 0.01.")
    assert "| erases | mass 0.300 < 0.9 x 0.400 |" in lines and "| pb | changes no weights |" in lines
    assert "**No row passed; nothing exported.**" in lines
    assert rule_from_meta({}) == ExportRule.raw()  # runs before the rule was recorded
    assert rule_from_meta({"export_rule": {"objective": "afgb_renorm", "min_mass": 0.8}}).min_mass == 0.8


def test_editor_row_runs_in_the_main_job(env):
    """The BiasEdit row goes through the one driver inside `bias-lens run`: its measured StereoSet
    SS equals the suite scored by hand on the model edited with the editor's shift from the same
    requests, its Cost-P is the edited matrices' size, and the model is unchanged afterwards."""
    from bias_lens.benchmarks.runners import evaluate
    from bias_lens.edit.editor import Editor, EditorConfig, editor_edit
    from bias_lens.edit.methods import EditorMethod
    from bias_lens.pipeline.driver import editor_requests

    lm, folder, tmp = env
    Editor(lm, EditorConfig(top=2, rank=8, n_edits=4, chunk=4)).save(tmp / "ed")
    row = EditPlan(EditorMethod(editor_dir=str(tmp / "ed")), name="BiasEdit editor")
    before = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    cfg = tiny_cfg(folder)
    from dataclasses import replace

    cfg = replace(cfg, rows=(row,), row_limits={**cfg.row_limits, "stereoset": 6})
    out = run_pipeline(cfg, tmp / "out", progress=False, lm=lm)
    assert all(torch.equal(p, before[n]) for n, p in lm.hf.named_parameters())
    (rec,) = json.loads((out / "results.json").read_text())["rows"]
    editor = Editor.load(lm, tmp / "ed")
    d = lm.d_mlp * lm.d_model
    assert rec["name"] == "BiasEdit editor" and rec["n_changed"] == 2 * d == rec["cost_p"]  # the two matrices
    assert rec["info"]["modules"] == ["L1.mlp.down", "L2.mlp.down"] and rec["info"]["n_requests"] == 4
    h = editor_edit(lm, editor, editor_requests("gender", editor.config.n_edits, cfg.seed)).apply_(lm.hf)
    try:
        want = evaluate(lm, "stereoset", "test", limit=6).metrics["ss"]
    finally:
        h.undo()
    assert rec["metrics"]["ss"] == pytest.approx(want)


def test_seed_and_control_summaries_by_hand():
    """Seed repetitions ("X", "X [seed s]") are summarised as mean ± sample sd; each control is shown
    beside its located row once, with the export rule's verdict."""
    import statistics

    from bias_lens.pipeline.report import control_lines, seed_lines

    org = {"afgb": 0.1, "afgb_renorm": 0.30, "mass": 0.40, "perplexity": 10.0, "ub": 0.30}
    rows = [_row("m", 0.05, 10.1, 0.30, afgb_renorm=0.15, mass=0.41),
            _row("m [seed 1]", 0.05, 10.2, 0.29, afgb_renorm=0.17, mass=0.40),
            _row("m [seed 2]", 0.05, 10.3, 0.28, afgb_renorm=0.19, mass=0.39),
            {**_row("m, lowest control", 0.05, 10.0, 0.30, afgb_renorm=0.29, mass=0.40), "plan": {"where": {"pick": "lowest"}}},
            {**_row("m, random control", 0.05, 12.0, 0.30, afgb_renorm=0.10, mass=0.40), "plan": {"where": {"pick": "random"}}}]
    lines = seed_lines(org, rows)
    assert lines[2].startswith("| Org | – | 0.300 | 0.400 |")
    want = f"{statistics.fmean([0.15, 0.17, 0.19]):.3f} ± {statistics.stdev([0.15, 0.17, 0.19]):.3f}"
    assert lines[3].startswith(f"| m | 3 | {want} |") and len(lines) == 4
    assert seed_lines(org, rows[:1]) == []
    ctl = control_lines(org, rows)
    assert [ln.split(" | ")[1] for ln in ctl[2:]] == ["located", "lowest", "random"]  # located row once
    assert ctl[2].endswith("| yes |") and "not 5% below" in ctl[3] and "perplexity 12.00 > 10.00" in ctl[4]
    assert control_lines(org, rows[:3]) == []


def test_paper_neuron_rows_locate_on_their_own_prompts():
    """The main job hands its attribution / causal results to attribution-masking rows, but a row
    with the paper's neuron selection locates through the driver's pipeline (no stage result)."""
    from bias_lens.pipeline.edit_stage import located_for

    paper = EditPlan(Masking(), Where("attribution", selection="paper", causal_mode="joint"))
    assert located_for(paper, {}) is None
    with pytest.raises(ValueError, match="use method 'mask'"):
        EditPlan(finetune_plan("msme", "attribution", "x").method, Where("attribution", selection="paper"))
    with pytest.raises(ValueError, match="attribution scale"):
        Where("module", selection="paper")
    assert Where("attribution", selection="paper").k_eff == 50 and Where("attribution").k_eff == 8


def test_paper_neuron_row_runs_in_the_main_job(env):
    """The joint paper row through ``run_pipeline``: located by the driver on the row's own prompts (not the
    stage's attribution result), every stage recorded, the labels its selection, the model restored."""
    from bias_lens.pipeline.config import PAPER_NEURON_ROW

    lm, folder, tmp = env
    before = {n: p.detach().clone() for n, p in lm.hf.named_parameters()}
    cfg = RunConfig.quick_preset(
        model=str(folder), n_locate=6, n_train=8, max_steps=2, rows=(EditPlan(Prompt(), name="PB"), PAPER_NEURON_ROW),
        causal_candidates=4, causal_k=2, eval_limits={"genbiaseval": 8, "retention": 8},
        row_limits={"genbiaseval": 8, "genhinteval": 6, "retention": 8}, batch_size=8)
    out = run_pipeline(cfg, tmp / "out", progress=False, lm=lm)
    assert all(torch.equal(p, before[n]) for n, p in lm.hf.named_parameters())
    row = json.loads((out / "results.json").read_text())["rows"][1]
    sel = row["info"]["neuron_selection"]
    assert sel["causal_variant"].startswith("joint") and row["labels"] == sel["selected"][:50]
    assert sel["candidates"] and sel["n_dev"] > 0 and sel["n_hint"] > 0
    assert (row["n_changed"] > 0) == bool(sel["selected"])
    if not sel["selected"]:
        assert row["info"]["status"] == "empty_selection" and row["metrics"] == row["before"]
