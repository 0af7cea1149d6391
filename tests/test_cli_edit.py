"""``bias-lens edit`` and ``bias-lens patch`` in-process on a tiny Llama checkpoint folder.

Oracles: the exported checkpoint is reloaded with plain transformers and compared entry by entry
with the base (only masked entries may differ, and exactly ``n_params_edited`` do); the reported
AFGB before/after is recomputed by hand (plain HF forward, softmax at the last token) on the same
test subset for the base and the reloaded export; patch apply/create/revert through the CLI must
reproduce the checkpoints' tensors bit-for-bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bias_lens.cli import main
from bias_lens.locate.result import LocateResult

from conftest import build_tiny

MEASURE = ["--n-samples", "16", "--limit", "16", "--ub-limit", "8", "--retention-limit", "4", "--batch-size", "8"]
FAST = [*MEASURE, "--dev-limit", "8"]  # --dev-limit: fine-tuning methods only
KEYS = {"afgb", "fbs", "ub", "perplexity", "probe_accuracy"}


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: extra threads only contend with other work on the machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def base_dir(tiny_tokenizer_dir, tmp_path) -> Path:
    build_tiny("llama", tiny_tokenizer_dir, tmp_path / "base")
    return tmp_path / "base"


def _locate(tmp_path: Path, labels: list[str]) -> str:
    path = tmp_path / "loc.json"
    LocateResult("test", labels, torch.arange(len(labels), 0, -1, dtype=torch.float64)).save(path)
    return str(path)


def _cli_json(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def _safetensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@torch.no_grad()
def _afgb_by_hand(folder: Path, n: int = 16) -> float:
    """Mean |p(he) - p(she)| at the last token, one prompt at a time, plain transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bias_lens.benchmarks import load_split
    from bias_lens.benchmarks.runners import subset

    model, tok = AutoModelForCausalLM.from_pretrained(folder).eval(), AutoTokenizer.from_pretrained(folder)
    he, she = tok(" he")["input_ids"], tok(" she")["input_ids"]
    assert len(he) == len(she) == 1
    gaps = []
    for s in subset(load_split("genbiaseval", "test"), n):
        p = torch.softmax(model(**tok(s["prompt"], return_tensors="pt")).logits[0, -1].double(), -1)
        gaps.append(abs(float(p[he[0]] - p[she[0]])))
    return sum(gaps) / len(gaps)


def test_module_edit_json_export_only_masked_entries_and_patch_round_trip(base_dir, tmp_path, capsys):
    loc = _locate(tmp_path, ["L1.mlp.down", "L0.attn.q"])
    out = tmp_path / "edited"
    res = _cli_json(capsys, ["edit", "--scale", "module", "--method", "lftf", "--model", str(base_dir),
                             "--locate-json", loc, "--out", str(out), "--json", "--lr", "1e-2", "--epochs", "1", *FAST])
    assert {"method", "scale", "n_params_edited", "before", "after", "out"} <= set(res)
    assert (res["method"], res["scale"], res["out"]) == ("lftf", "module", str(out))
    assert KEYS <= set(res["before"]) and KEYS <= set(res["after"])
    assert res["mask_size"] == 48 * 96  # k=1: L1.mlp.down only ([d_model, d_mlp])
    assert 0 < res["n_params_edited"] <= res["mask_size"]

    base, edited = _state(base_dir), _state(out)
    diff = {k: int((base[k] != edited[k]).sum()) for k in base if not torch.equal(base[k], edited[k])}
    assert set(diff) == {"model.layers.1.mlp.down_proj.weight"}
    assert sum(diff.values()) == res["n_params_edited"]
    manifest = json.loads((out / "bias_lens_edit.json").read_text())
    assert manifest["params"] == diff and manifest["metrics_after"] == res["after"]
    assert res["before"]["afgb"] == pytest.approx(_afgb_by_hand(base_dir), abs=1e-5)
    assert res["after"]["afgb"] == pytest.approx(_afgb_by_hand(out), abs=1e-5)
    assert res["after"]["afgb"] != res["before"]["afgb"]

    # patch apply (stored patch), create (checkpoint diff) and revert reproduce the weights bit-exactly
    base_t, edited_t = _safetensors(base_dir), _safetensors(out)
    r = _cli_json(capsys, ["patch", "apply", "--base", str(base_dir), "--patch", str(out / "patch"),
                           "--out", str(tmp_path / "applied"), "--json"])
    assert r["n_entries"] == res["mask_size"] or r["n_entries"] >= res["n_params_edited"]
    assert _bit_equal(_safetensors(tmp_path / "applied"), edited_t)
    r = _cli_json(capsys, ["patch", "create", "--base", str(base_dir), "--edited", str(out),
                           "--out", str(tmp_path / "p2"), "--json"])
    assert r["n_entries"] == res["n_params_edited"] and r["params"] == diff
    _cli_json(capsys, ["patch", "apply", "--base", str(base_dir), "--patch", str(tmp_path / "p2"),
                       "--out", str(tmp_path / "applied2"), "--json"])
    assert _bit_equal(_safetensors(tmp_path / "applied2"), edited_t)
    _cli_json(capsys, ["patch", "revert", "--base", str(out), "--patch", str(tmp_path / "p2"),
                       "--out", str(tmp_path / "reverted"), "--json"])
    assert _bit_equal(_safetensors(tmp_path / "reverted"), base_t)

    # a patch applied to the wrong base is refused and writes nothing
    assert main(["patch", "apply", "--base", str(out), "--patch", str(tmp_path / "p2"), "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()


def _bit_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.int32), b[k].view(torch.int32))
                                    for k in a)


def test_attribution_mask_zeroes_only_located_down_columns(base_dir, tmp_path, capsys):
    out = tmp_path / "masked"
    res = _cli_json(capsys, ["edit", "--scale", "attribution", "--method", "mask", "--neuron-selection", "attribution", "--k", "3",
                             "--model", str(base_dir),
                             "--out", str(out), "--json", *MEASURE])
    neurons = res["locate"]
    assert len(neurons) == 3 and res["mask_size"] == 3 * 48
    base, edited = _state(base_dir), _state(out)
    for k in base:
        if k.endswith("mlp.down_proj.weight"):
            layer = int(k.split(".")[2])
            cols = [int(lab.split("N")[1]) for lab in neurons if int(lab[1:].split("N")[0]) == layer]
            expect = base[k].clone()
            expect[:, cols] = 0.0
            assert torch.equal(edited[k], expect)
        else:
            assert torch.equal(edited[k], base[k]), k
    assert res["n_params_edited"] == sum(int((base[k] != edited[k]).sum()) for k in base)


def test_dama_exports_only_the_projected_down_projections(base_dir, tmp_path, capsys):
    """DAMA through the CLI: W_down of the default layers <- P W_down, everything else bitwise equal,
    and the export's patch reproduces it."""
    out = tmp_path / "dama"
    res = _cli_json(capsys, ["edit", "--method", "dama", "--null-dim", "4", "--dama-update", "mixed",
                             "--max-requests", "8", "--model", str(base_dir), "--out", str(out), "--json", *MEASURE])
    layers = res["info"]["layers"]
    assert res["method"] == "dama" and res["n_params_edited"] > 0 and layers == [0] and res["plan"]["method"]["kind"] == "dama"
    base, edited = _state(base_dir), _state(out)
    changed = {k for k in base if not torch.equal(base[k], edited[k])}
    assert changed == {f"model.layers.{l}.mlp.down_proj.weight" for l in layers}
    assert (out / "patch" / "patch.json").exists()


def test_lftf_without_mlp_edits_only_attention_and_prompt_changes_no_weights(base_dir, tmp_path, capsys):
    loc = _locate(tmp_path, ["L2"])
    out = tmp_path / "lftf"
    _cli_json(capsys, ["edit", "--scale", "layer", "--method", "lftf", "--drop", "mlp", "--model", str(base_dir),
                             "--locate-json", loc, "--out", str(out), "--json", "--lr", "1e-2", "--epochs", "1", *FAST])
    base, edited = _state(base_dir), _state(out)
    changed = {k for k in base if not torch.equal(base[k], edited[k])}
    assert all(k.startswith("model.layers.2.") and ".mlp." not in k for k in changed)  # norms + attention only
    assert any(".self_attn." in k for k in changed)
    pb = _cli_json(capsys, ["edit", "--method", "prompt", "--model", str(base_dir), "--json", *MEASURE])
    assert pb["n_params_edited"] == 0 and pb["out"] is None
    assert pb["after"]["perplexity"] == pb["before"]["perplexity"]
    assert pb["after"]["afgb"] != pb["before"]["afgb"]


# --method contrastive: tests/test_contrastive_cli.py


@pytest.mark.parametrize("argv, needle", [
    (["edit", "--method", "msme"], "needs --scale"),
    (["edit", "--method", "msme", "--solver", "finetune", "--scale", "module", "--lr", "-1"], "lr must be > 0"),
    (["edit", "--method", "msme", "--scale", "module", "--locate-json", "/nonexistent.json"], "does not exist"),
    (["edit", "--method", "prompt", "--out", "/tmp/x"], "nothing to export"),
    (["edit", "--method", "lftf", "--scale", "row", "--k", "0"], "k must be >= 1"),
    (["edit", "--method", "mask", "--scale", "module", "--dev-limit", "8"], "--dev-limit apply to the fine-tuning"),
    (["edit", "--method", "msme", "--scale", "module", "--alpha", "0.5"], "apply to --method contrastive"),
    (["edit", "--method", "fpft", "--scale", "module"], "edits no located weights; drop --scale"),
    (["edit", "--method", "msme", "--scale", "module", "--null-dim", "8"], "apply to --method dama"),
    (["edit", "--method", "dama", "--lr", "0.1"], "apply to the fine-tuning methods"),
    (["edit", "--method", "dama", "--dama-layers", "0"], "n-layers must be >= 1"),
    (["edit", "--method", "msme", "--solver", "finetune", "--scale", "module", "--dev-metric", "afgb_renorm", "--mass-floor", "2"],
     "mass_floor in (0, 1]"),
    (["patch", "apply", "--base", "/nonexistent", "--patch", "/x", "--out", "/y"], "is not a folder"),
])
def test_bad_input_is_one_line_exit_2(argv, needle, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1


def test_bad_labels_or_nonempty_out_change_nothing(base_dir, tmp_path, capsys):
    before = _safetensors(base_dir)
    loc = _locate(tmp_path, ["L7.mlp.down"])  # the tiny model has 3 layers
    assert main(["edit", "--scale", "module", "--method", "msme", "--solver", "finetune", "--model", str(base_dir),
                 "--locate-json", loc, "--out", str(tmp_path / "o"), *FAST]) == 2
    assert "layer" in capsys.readouterr().err and not (tmp_path / "o").exists()
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("x")
    assert main(["edit", "--scale", "module", "--method", "msme", "--solver", "finetune", "--model", str(base_dir),
                 "--locate-json", _locate(tmp_path, ["L1.mlp.down"]), "--out", str(full), *FAST]) == 2
    assert "not empty" in capsys.readouterr().err and [p.name for p in full.iterdir()] == ["keep.txt"]
    assert _bit_equal(_safetensors(base_dir), before)


def test_rolled_back_edit_exits_3_writes_nothing_and_says_why(base_dir, tmp_path, capsys, monkeypatch):
    """A guard that rolls the edit back to step 0 is a failure: exit 3, one stderr line naming the
    guard and its numbers, status 'unchanged' in --json, no output folder, the base untouched."""
    import bias_lens.edit.measure as measure

    calls = {"n": 0}

    def rising_ppl(lm, texts, *, batch_size=32):  # the base reads 10.0, every later check 20.0
        calls["n"] += 1
        return 10.0 if calls["n"] == 1 else 20.0

    monkeypatch.setattr(measure, "retention_perplexity", rising_ppl)
    loc = _locate(tmp_path, ["L1.mlp.down"])
    out = tmp_path / "edited"
    before = _safetensors(base_dir)
    capsys.readouterr()
    rc = main(["edit", "--scale", "module", "--method", "msme", "--solver", "finetune", "--model", str(base_dir),
               "--locate-json", loc, "--out", str(out), "--json", "--lr", "1e-2", "--epochs", "1", *FAST])
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert rc == 3 and not out.exists()
    assert res["status"] == "unchanged" and res["finetune_status"] == "retention_rollback" and res["out"] is None
    assert res["n_params_edited"] == 0
    err = [line for line in cap.err.splitlines() if line.startswith("bias-lens edit:")]
    assert len(err) == 1 and "retention guard" in err[0] and "20.00 > 10.00" in err[0]
    after = _safetensors(base_dir)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_attribution_mask_runs_the_paper_pipeline_and_masks_its_selection(base_dir, tmp_path, capsys):
    """Default neuron selection of ``--scale attribution --method mask``: the driver's selection equals
    ``paper_selection`` called directly on the same seeded prompts, and the export zeroes exactly the
    selected neurons' down_proj / o_proj columns (FFN and attention value neurons)."""
    from bias_lens import load_model
    from bias_lens.benchmarks import load_split
    from bias_lens.locate.neuron_pipeline import paper_selection
    from bias_lens.pipeline.driver import N_PAPER_DEV, N_PAPER_HINT, N_PAPER_LOCATE, _sample

    out = tmp_path / "paper"
    res = _cli_json(capsys, ["edit", "--scale", "attribution", "--method", "mask", "--causal-mode", "joint", "--k", "4",
                             "--model", str(base_dir), "--out", str(out), "--json", *MEASURE])
    sel = res["info"]["neuron_selection"]
    lm = load_model(str(base_dir))
    train = _sample(_sample(load_split("genbiaseval", "train"), 16, 0), 256, 0)
    dev = [s["prompt"] for s in _sample(load_split("genbiaseval", "dev"), N_PAPER_DEV, 0)]
    hint = _sample(load_split("genhinteval", "dev"), N_PAPER_HINT, 0)
    ref = paper_selection(lm, [s["prompt"] for s in train][:N_PAPER_LOCATE], dev, k=4, mode="joint", hint=hint)
    assert sel["selected"] == ref.selected and sel["candidates"] == ref.candidates and sel["general"] == ref.general
    assert sel["causal_variant"].startswith("joint") and sel["causal_variant"].endswith("ub>=base-0.05")
    assert 1 <= len(ref.selected) <= 4 and sel["n_hint"] == N_PAPER_HINT
    from bias_lens.locate.projection import neuron_vocab_projection

    assert sel["projection"] == neuron_vocab_projection(lm, ref.selected, k=10)  # Table 2 of the selection
    base, edited = _state(base_dir), _state(out)
    expect = {k: v.clone() for k, v in base.items()}
    d_head = lm.d_head
    for lab in ref.selected:
        if "V" in lab:
            layer, rest = lab[1:].split("H")
            h, d = map(int, rest.split("V"))
            expect[f"model.layers.{layer}.self_attn.o_proj.weight"][:, h * d_head + d] *= 0.0  # the edit scales by 0: -0.0 where negative
        else:
            layer, n = map(int, lab[1:].split("N"))
            expect[f"model.layers.{layer}.mlp.down_proj.weight"][:, n] *= 0.0
    assert _bit_equal(edited, expect)
    assert res["n_params_edited"] == sum(int((base[k] != edited[k]).sum()) for k in base) > 0
    assert res["locate"] == ref.selected


@pytest.mark.parametrize("argv, msg", [
    (["--scale", "module", "--method", "mask", "--neuron-selection", "paper"], "--scale attribution"),
    (["--scale", "attribution", "--method", "mask", "--neuron-selection", "attribution", "--causal-mode", "joint"],
     "--neuron-selection paper"),
    (["--scale", "attribution", "--method", "msme", "--neuron-selection", "paper"], "use method 'mask'"),
])
def test_neuron_selection_flags_are_checked(argv, msg, base_dir, capsys):
    assert main(["edit", *argv, "--model", str(base_dir)]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_paper_selection_that_keeps_nothing_exits_3_and_writes_nothing(base_dir, tmp_path, capsys, monkeypatch):
    """A causal selection with no neuron: no edit, the model unchanged, exit 3 with the reason, no folder."""
    import bias_lens.pipeline.driver as drv

    empty = LocateResult("causal", ["L0N1", "L1H0V2"], torch.tensor([0.1, 0.2], dtype=torch.float64),
                         extras={"selected": [], "selection": {"filtered": ["L0N1", "L1H0V2"]}})
    monkeypatch.setattr(drv, "_paper_neurons", lambda lm, prompts, plan: empty)
    out = tmp_path / "none"
    capsys.readouterr()
    assert main(["edit", "--scale", "attribution", "--method", "mask", "--model", str(base_dir), "--out", str(out),
                 "--json", *MEASURE]) == 3
    cap = capsys.readouterr()
    res = json.loads(cap.out)
    assert res["n_params_edited"] == 0 and res["after"] == res["before"] and res["out"] is None
    assert "kept none of the 2 candidates" in cap.err and not out.exists()
