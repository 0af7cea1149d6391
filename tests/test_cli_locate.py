"""``bias-lens locate``: JSON schema, --out files, and one-line exit-2 errors that write nothing.

Run in-process on a tiny Llama saved to a folder; each method's CLI output is compared with the
library function called directly on the same checkpoint (those functions have their own oracle
tests).
"""

from __future__ import annotations

import json

import pytest
import torch

from bias_lens.cli import main
from bias_lens.lens import load_model
from bias_lens.locate.result import LocateResult

PROMPTS = ["The nurse laughed because", "The carpenter went home because", "The doctor said that", "The baker went home because"]


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matmuls are far slower with 2 threads on this shared 2-core machine; restore after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    from conftest import build_tiny

    folder = tmp_path_factory.mktemp("cli_tiny")
    build_tiny("llama", tiny_tokenizer_dir, folder)
    return folder


@pytest.fixture(scope="module")
def lm(model_dir):
    return load_model(str(model_dir))


@pytest.fixture
def pfile(tmp_path):
    f = tmp_path / "prompts.txt"
    f.write_text("\n".join(PROMPTS[:2]) + "\n\n  \n" + "\n".join(PROMPTS[2:]) + "\n")
    return f


def _run_json(capsys, *argv):
    capsys.readouterr()
    assert main(list(argv) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_row_json_matches_library(capsys, model_dir, lm, pfile):
    from bias_lens.locate.gradients import row_scale

    out = _run_json(capsys, "locate", "row", "--model", str(model_dir), "--prompts-file", str(pfile), "--module", "L1.mlp.down",
                    "--order", "ascending", "--keep", "0.25")
    want = row_scale(lm, PROMPTS, "L1.mlp.down", order="ascending", keep=0.25)
    assert {"method", "model", "n_samples", "labels", "scores", "variant", "selected", "selected_rows"} <= set(out)
    assert out["method"] == "row" and out["n_samples"] == 4 and out["labels"] == want.labels
    assert torch.allclose(torch.tensor(out["scores"], dtype=torch.float64), want.scores.double(), atol=1e-6)
    assert out["selected_rows"] == want.extras["selected_rows"] and "ascending" in out["variant"]


def test_neuron_out_writes_result_and_figures(capsys, model_dir, lm, pfile, tmp_path):
    from bias_lens.locate.gradients import neuron_scale

    out_dir = tmp_path / "res"
    out = _run_json(capsys, "locate", "neuron", "--model", str(model_dir), "--prompts-file", str(pfile),
                    "--module", "L2.attn.o", "--out", str(out_dir))
    want = neuron_scale(lm, PROMPTS, "L2.attn.o")
    assert out["labels"] == want.labels and out["scores"] == want.scores.tolist()
    assert out["n_entries"] == want.extras["n_entries"] and out["n_rows"] == lm.d_model // 2
    assert out["choices"] == want.extras["choices"].tolist()
    names = sorted(p.name for p in out_dir.iterdir())
    assert "result.json" in names and "entries.html" in names and not any(n.endswith(".tmp") for n in names)
    loaded = LocateResult.load(out_dir / "result.json")
    assert loaded.labels == want.labels and torch.equal(loaded.scores, want.scores.double())


def test_row_out_figures(capsys, model_dir, pfile, tmp_path):
    out_dir = tmp_path / "rows"
    assert main(["locate", "row", "--model", str(model_dir), "--prompts-file", str(pfile), "--module", "L0.mlp.down",
                 "--out", str(out_dir), "--top", "3"]) == 0
    text = capsys.readouterr().out
    assert "n_selected: 24" in text and len([ln for ln in text.splitlines() if "/row" in ln]) == 3
    html = (out_dir / "row_cosines.html").read_text()
    assert "selected rows (24)" in html
    assert json.loads((out_dir / "result.json").read_text())["n_selected"] == 24


@pytest.mark.parametrize("method,extra", [
    ("attribution", []), ("attribution", ["--heads"]), ("circuit", ["--from", "L2N5", "--k", "3"]),
    ("general-neurons", []),
])
def test_existing_methods_json(capsys, model_dir, lm, pfile, method, extra):
    out = _run_json(capsys, "locate", method, "--model", str(model_dir), "--prompts-file", str(pfile), *extra)
    if method == "attribution":
        from bias_lens.locate.attribution import head_attribution, neuron_attribution

        want = (head_attribution if "--heads" in extra else neuron_attribution)(lm, PROMPTS, "he,she")
    elif method == "circuit":
        from bias_lens.locate.circuit import trace_circuit

        want = trace_circuit(lm, "L2N5", PROMPTS, top_k=3).to_result()
    else:
        from bias_lens.locate.general_neurons import detect_general, position_stats

        want = detect_general(position_stats(lm, PROMPTS, batch_size=16), model=lm.name)
    assert out["method"] == want.method and out["labels"] == want.labels and out["n_samples"] == 4
    assert torch.allclose(torch.tensor(out["scores"], dtype=torch.float64), want.scores.double(), atol=1e-6)


def test_causal_json(capsys, model_dir, lm, pfile):
    from bias_lens.locate.attribution import neuron_attribution
    from bias_lens.locate.causal import causal_selection

    out = _run_json(capsys, "locate", "causal", "--model", str(model_dir), "--prompts-file", str(pfile),
                    "--candidates", "4", "--k", "2")
    cand = neuron_attribution(lm, PROMPTS, "he,she").top_labels(4)
    want = causal_selection(lm, cand, PROMPTS, "he,she", k=2)
    assert out["labels"] == cand and out["selected"] == want.extras["selected"]
    assert torch.allclose(torch.tensor(out["scores"], dtype=torch.float64), want.scores.double(), atol=1e-9)


@pytest.mark.parametrize("method", ["layer", "bmi", "module"])
def test_layer_module_methods_json(capsys, model_dir, lm, pfile, tmp_path, method):
    from bias_lens.locate import layers

    out = _run_json(capsys, "locate", method, "--model", str(model_dir), "--prompts-file", str(pfile), "--out", str(tmp_path / "o"))
    figs = {"layer": {"layers", "layer_prompt", "argmax_layer"}, "bmi": {"bmi"}, "module": {"modules", "modules_final"}}[method]
    assert {p.stem for p in (tmp_path / "o").glob("*.html")} == figs
    assert LocateResult.load(tmp_path / "o" / "result.json").labels == out["labels"]
    if method == "module":
        from bias_lens.locate.modules import module_scale

        want = module_scale(lm, PROMPTS, "he,she")
    else:
        want = layers.bmi(lm, PROMPTS) if method == "bmi" else layers.layer_scale(lm, PROMPTS, "he,she")
    assert out["method"] == want.method and out["labels"] == want.labels
    assert torch.allclose(torch.tensor(out["scores"], dtype=torch.float64), want.scores.double(), atol=1e-6)


@pytest.mark.parametrize("argv,needle", [
    (["row", "--module", "L1.mlp.down", "--prompts-file", "{missing}"], "does not exist"),
    (["row", "--module", "L1.mlp.down", "--prompts-file", "{empty}"], "no prompts"),
    (["row", "--suite", "genbiaseval", "--prompts-file", "{pfile}"], "not both"),
    (["row", "--prompts-file", "{pfile}"], "row needs --module"),
    (["neuron", "--prompts-file", "{pfile}"], "neuron needs --module"),
    (["row", "--module", "L1.mlp.bogus", "--prompts-file", "{pfile}"], "--module"),
    (["row", "--module", "L9.mlp.down", "--prompts-file", "{pfile}"], "out of range"),
    (["row", "--module", "L1.mlp.down", "--keep", "1.5", "--prompts-file", "{pfile}"], "--keep"),
    (["row", "--module", "L1.mlp.down", "--targets", "he,,she", "--prompts-file", "{pfile}"], "empty target"),
    (["neuron", "--module", "L1.mlp.down", "--targets", "he,she,they", "--prompts-file", "{pfile}"], "exactly two"),
    (["circuit", "--prompts-file", "{pfile}"], "--from"),
    (["circuit", "--from", "L2H1", "--prompts-file", "{pfile}"], "--from"),
    (["row", "--module", "L1.mlp.down", "--suite", "nosuch"], "unknown suite"),
    (["row", "--module", "L1.mlp.down", "--n-samples", "0"], "--n-samples"),
    (["layer", "--layers", "a,b", "--prompts-file", "{pfile}"], "--layers"),
])
def test_bad_input_exits_2_one_line_no_files(capsys, model_dir, pfile, tmp_path, argv, needle):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n \n")
    subs = {"{missing}": str(tmp_path / "nope.txt"), "{empty}": str(empty), "{pfile}": str(pfile)}
    argv = [subs.get(a, a) for a in argv]
    out_dir = tmp_path / "should_not_exist"
    capsys.readouterr()
    code = main(["locate", *argv, "--model", str(model_dir), "--out", str(out_dir), "--json"])
    err = capsys.readouterr()
    assert code == 2 and err.out == ""
    lines = err.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("bias-lens locate: error:") and needle in lines[0]
    assert not out_dir.exists()


def test_out_parent_missing(capsys, model_dir, pfile, tmp_path):
    code = main(["locate", "row", "--module", "L1.mlp.down", "--model", str(model_dir), "--prompts-file", str(pfile), "--out", str(tmp_path / "a" / "b")])
    assert code == 2 and "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
