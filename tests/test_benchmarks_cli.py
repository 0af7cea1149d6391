"""``bias-lens evaluate`` and ``bias-lens datasets`` in-process on a tiny model folder."""

from __future__ import annotations

import json

import pytest

from bias_lens.benchmarks import evaluate, load_split, split_sizes, to_jsonl
from bias_lens.cli import main
from bias_lens.lens import load_model
from conftest import build_tiny


@pytest.fixture
def tiny_dir(tiny_tokenizer_dir, tmp_path):
    folder = tmp_path / "model"
    build_tiny("llama", tiny_tokenizer_dir, folder)
    return folder


def test_evaluate_json_and_details(tiny_dir, tmp_path, capsys):
    details = tmp_path / "d.jsonl"
    rc = main(["evaluate", "--suite", "genhinteval", "--split", "dev", "--model", str(tiny_dir), "--limit", "5",
               "--json", "--details", str(details), "--no-progress"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"suite", "split", "n", "metrics"}
    assert (out["suite"], out["split"], out["n"]) == ("genhinteval", "dev", 5)
    assert {"fbs", "fbs_renorm", "afgb", "ub"} <= set(out["metrics"])
    assert all(k == k.lower() and " " not in k and "-" not in k for k in out["metrics"])
    lines = [json.loads(x) for x in details.read_text().splitlines()]
    assert len(lines) == 5
    for d in lines:
        assert {"prompt", "p_he", "p_she", "profession", "f", "s", "template", "hint", "F"} <= set(d)
    # the CLI numbers are the library's numbers (which are tested against plain transformers)
    ref = evaluate(load_model(str(tiny_dir)), "genhinteval", "dev", limit=5)
    assert out["metrics"] == pytest.approx(ref.metrics)
    assert [d["p_he"] for d in lines] == pytest.approx([d["p_he"] for d in ref.details])


def test_evaluate_dama_keys(tiny_dir, capsys):
    assert main(["evaluate", "--suite", "dama", "--model", str(tiny_dir), "--limit", "6", "--json", "--no-progress"]) == 0
    m = json.loads(capsys.readouterr().out)["metrics"]
    assert {"a_s", "a_f", "b", "r2"} <= set(m)


@pytest.mark.parametrize(
    "argv, msg",
    [
        (["--suite", "nope"], "unknown suite"),
        (["--suite", "crows-pairs", "--split", "train"], "no split"),
        (["--suite", "genbiaseval", "--limit", "0"], "--limit"),
        (["--suite", "genbiaseval", "--targets", "he,she,they"], "two words"),
        (["--suite", "stereoset", "--targets", "he,she"], "--targets"),
        (["--suite", "genbiaseval", "--axis", "race"], "--axis"),
        (["--suite", "stereoset", "--split", "test", "--axis", "profession"], "only split"),
            (["--suite", "genbiaseval", "--targets", "he,he"], "repeats"),
            (["--suite", "genbiaseval", "--batch-size", "0"], "--batch-size"),
            (["--suite", "mmlu", "--limit-per-subject", "0"], "--limit-per-subject"),
            (["--suite", "genbiaseval", "--shots", "2"], "apply to mmlu"),
            (["--suite", "humaneval"], "--allow-code-execution"),
        (["--suite", "genbiaseval", "--details", "/nonexistent/dir/x.jsonl"], "does not exist"),
        (["--suite", "genbiaseval", "--model", "/nonexistent/model"], ""),
    ],
)
def test_evaluate_bad_input_one_line_exit_2_no_files(argv, msg, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main(["evaluate", *argv, "--details", str(tmp_path / "out.jsonl")] if "--details" not in argv
              else ["evaluate", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and msg in err
    assert list(tmp_path.iterdir()) == []


def test_datasets_lists_sizes_and_exports(tmp_path, capsys):
    assert main(["datasets", "--json"]) == 0
    sizes = json.loads(capsys.readouterr().out)
    assert sizes["genbiaspro-cg"] == {"train": 1280, "dev": 256, "test": 1024}
    assert sizes["dama"] == split_sizes("dama") and "religion" in sizes
    assert main(["datasets"]) == 0
    text = capsys.readouterr().out
    assert "genbiaspro-cg" in text and "train=1280" in text
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["datasets", "--export", "genbiaseval", "test", "--out", str(a)]) == 0
    assert main(["datasets", "--export", "genbiaseval", "test", "--out", str(b)]) == 0
    assert a.read_bytes() == b.read_bytes() == to_jsonl(load_split("genbiaseval", "test"))
    assert main(["datasets", "--export", "genbiaseval", "nope", "--out", str(tmp_path / "c.jsonl")]) == 2
    assert not (tmp_path / "c.jsonl").exists()
    assert "no split" in capsys.readouterr().err
