"""``bias-lens edit --method contrastive`` in-process on a tiny Llama checkpoint folder.

Oracles: the exported checkpoint reloaded with plain transformers differs from the base in exactly
``n_params_edited`` entries, all inside the references' mask difference and equal to the hand
formula; ``--reference DIR`` (the folder the first run recorded) reproduces the export bit for bit
without training; bad input exits 2 with one line and writes nothing.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bias_lens.cli import main

from conftest import build_tiny

MEASURE = ["--n-samples", "8", "--limit", "8", "--ub-limit", "4", "--retention-limit", "4", "--batch-size", "8"]
TRAIN = ["--reference-steps", "3", "--imp-rounds", "1", "--retrain-steps", "2", "--lr", "1e-2"]


@pytest.fixture
def base_dir(tiny_tokenizer_dir, tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("BIAS_LENS_CACHE", str(tmp_path / "cache"))
    build_tiny("llama", tiny_tokenizer_dir, tmp_path / "base")
    return tmp_path / "base"


def _run(capsys, argv: list[str]) -> dict:
    capsys.readouterr()
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def _state(folder: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return {k: v.detach().clone() for k, v in AutoModelForCausalLM.from_pretrained(folder).state_dict().items()}


def test_contrastive_export_and_reference_round_trip(base_dir, tmp_path, capsys):
    from bias_lens.edit.contrastive import mask_diff
    from bias_lens.edit.references import References
    from bias_lens import load_model

    out = tmp_path / "out"
    argv = ["edit", "--method", "contrastive", "--model", str(base_dir), "--json", "--contrastive-mode", "extrapolate",
            "--alpha", "3", *MEASURE]
    res = _run(capsys, [*argv, *TRAIN, "--out", str(out)])
    base, edited = _state(base_dir), _state(out)
    diff = {k: base[k] != edited[k] for k in base}
    assert res["n_params_edited"] == sum(int(d.sum()) for d in diff.values()) > 0
    ref_dir = res["info"]["reference_dir"]
    refs = References.load(ref_dir, load_model(str(base_dir)))
    located = mask_diff(refs["stereo"], refs["anti"])
    assert res["mask_size"] == located.size == res["info"]["contrastive_size"]
    for k, d in diff.items():
        if d.any():
            m = located.masks[k]
            assert not (d & ~m).any()  # only mask-difference entries changed
            want = base[k][m] + 3.0 * (refs["anti"].weights[k][m] - refs["stereo"].weights[k][m])
            torch.testing.assert_close(edited[k][m], want, rtol=0, atol=1e-7)
    # the saved references reproduce the export without training
    again = tmp_path / "again"
    res2 = _run(capsys, [*argv, "--reference", ref_dir, "--out", str(again)])
    assert res2["n_params_edited"] == res["n_params_edited"]
    assert all(torch.equal(v, _state(again)[k]) for k, v in edited.items())


@pytest.mark.parametrize("extra, needle", [
    (["--reference", "/nonexistent"], "holds no saved references"),
    (["--alpha", "1.5"], "interpolation needs 0 <= alpha <= 1"),
    (["--contrastive-mode", "extrapolate", "--alpha", "0.5"], "extrapolation needs alpha > 1 or alpha < 0"),
    (["--contrastive-k", "10"], "k sets the value_diff size"),
    (["--prune-rate", "1.5"], "pruning rate"),
    (["--epochs", "2"], "--epochs apply to the fine-tuning methods"),
    (["--scale", "module"], "edits no located weights; drop --scale"),
])
def test_bad_contrastive_input_is_one_line_exit_2(extra, needle, base_dir, tmp_path, capsys):
    out = tmp_path / "never"
    assert main(["edit", "--method", "contrastive", "--model", str(base_dir), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert needle in err and len(err.splitlines()) == 1
    assert not out.exists() and not (tmp_path / "cache" / "contrastive").exists()


def test_reference_flags_refused_elsewhere_and_foreign_references(base_dir, tiny_tokenizer_dir, tmp_path, capsys):
    assert main(["edit", "--method", "msme", "--scale", "module", "--localisation", "value_diff"]) == 2
    assert "apply to --method contrastive" in capsys.readouterr().err
    # references of another architecture: refused after loading the model, before any training or writing
    from bias_lens import load_model
    from bias_lens.edit.imp import ReferenceConfig
    from bias_lens.edit.references import make_references

    gpt2 = build_tiny("gpt2", tiny_tokenizer_dir, tmp_path / "gpt2")
    folder = make_references(gpt2, ReferenceConfig(steps=1, rounds=1, retrain_steps=0, batch_size=2)).info["folder"]
    out = tmp_path / "never"
    assert main(["edit", "--method", "contrastive", "--model", str(base_dir), "--reference", folder, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--reference:" in err and "another architecture" in err and len(err.splitlines()) == 1 and not out.exists()
    assert main(["edit", "--method", "contrastive", "--model", str(base_dir), "--reference", folder,
                 "--reference-steps", "3"]) == 2
    assert "a loaded --reference is already trained" in capsys.readouterr().err
    # a saved pair has no neutral reference to move toward
    own = make_references(load_model(str(base_dir)), ReferenceConfig(steps=1, rounds=1, retrain_steps=0, batch_size=2))
    assert main(["edit", "--method", "contrastive", "--model", str(base_dir), "--reference", own.info["folder"],
                 "--reference-side", "neutral", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "has no neutral reference" in err and len(err.splitlines()) == 1 and not out.exists()


def test_value_diff_size_beyond_the_model_is_one_line(base_dir, tmp_path, capsys):
    out = tmp_path / "never"
    argv = ["edit", "--method", "contrastive", "--model", str(base_dir), "--localisation", "value_diff",
            "--contrastive-k", "1000000000", "--out", str(out), *MEASURE, *TRAIN]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "exceeds" in err and len(err.splitlines()) == 1 and not out.exists()
