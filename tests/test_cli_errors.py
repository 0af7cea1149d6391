"""Every user-facing CLI error is one line on stderr, exit status 2, no traceback, no file touched.

Run in-process through :func:`bias_lens.cli.main` (an uncaught exception would escape ``main``
and fail the test, so "no traceback" is proven without a 6 s subprocess per case); the few
checks that need a fresh interpreter (``--version``, lazy imports) use one. Each case snapshots
its working folder (paths, bytes and modes) before the command and compares after.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bias_lens.cli import main
from conftest import build_tiny

PROMPTS = ["The nurse laughed because", "The doctor said that"]


@pytest.fixture(scope="module")
def model_dir(tiny_tokenizer_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("err_tiny")
    build_tiny("llama", tiny_tokenizer_dir, folder)
    return folder


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder (also the cwd) holding a prompts file."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    return tmp_path


def _snapshot(root: Path) -> dict[str, tuple[bytes | None, int]]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None, p.stat().st_mode)
            for p in sorted(root.rglob("*"))}


def _fails_cleanly(capsys, root: Path, argv: list[str], needle: str) -> str:
    """Run ``main(argv)``; assert exit 2, one stderr line naming the command, ``needle`` in it,
    nothing on stdout and ``root`` unchanged. Returns the line."""
    before = _snapshot(root)
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith(f"bias-lens {argv[0]}: error:") and needle in lines[0], lines[0]
    assert "Traceback" not in err and out == ""
    assert _snapshot(root) == before
    return lines[0]


# --------------------------------------------------------------------------- locate --out
def test_locate_out_non_empty_folder_refused(capsys, model_dir, work):
    out = work / "res"
    out.mkdir()
    (out / "notes.txt").write_text("user data")
    _fails_cleanly(capsys, work, ["locate", "bmi", "--model", str(model_dir), "--prompts-file", "prompts.txt",
                                  "--out", str(out)], "not empty")


def test_locate_out_earlier_result_refused_then_forced_replaced(capsys, model_dir, work):
    """A layer result folder is not silently turned into a bmi result with the old HTML beside it."""
    out = work / "res"
    base = ["--model", str(model_dir), "--prompts-file", "prompts.txt", "--out", str(out)]
    assert main(["locate", "layer", *base]) == 0
    err = capsys.readouterr().err
    from bias_lens.plot.io import chromium_path

    png = chromium_path() is not None  # a PNG beside each HTML figure when a Chromium is installed (CI has one)
    assert f"wrote {5 + 3 * png} files to {out}" in err  # result.json, 3 figures (+ PNGs), plotly.min.js
    assert json.loads((out / "result.json").read_text())["method"] == "layer"
    _fails_cleanly(capsys, work, ["locate", "bmi", *base], "--force")
    assert main(["locate", "bmi", *base, "--force"]) == 0
    want = ["bmi.html", *(["bmi.png"] if png else []), "plotly.min.js", "result.json"]
    assert sorted(p.name for p in out.iterdir()) == want
    assert json.loads((out / "result.json").read_text())["method"] == "bmi"
    assert not [p for p in work.iterdir() if p.name.startswith(".")]  # no temp folder left beside it


def test_locate_batch_size_zero(capsys, model_dir, work):
    _fails_cleanly(capsys, work, ["locate", "bmi", "--model", str(model_dir), "--prompts-file", "prompts.txt",
                                  "--batch-size", "0", "--out", "o"], "--batch-size")


# --------------------------------------------------------------------------- model specs
def test_truncated_safetensors_beside_bin(capsys, model_dir, work):
    import torch
    from safetensors.torch import load_file

    bad = work / "model"
    bad.mkdir()
    for f in model_dir.iterdir():
        (bad / f.name).write_bytes(f.read_bytes())
    torch.save(load_file(model_dir / "model.safetensors"), bad / "pytorch_model.bin")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    line = _fails_cleanly(capsys, work, ["locate", "bmi", "--model", str(bad), "--prompts-file", "prompts.txt"],
                          "truncated")
    assert "model.safetensors" in line


def test_gguf_file_that_is_not_gguf(capsys, work):
    (work / "model.gguf").write_bytes(os.urandom(256))
    _fails_cleanly(capsys, work, ["probe", "--model", str(work / "model.gguf"), "x"], "GGUF")


def test_checkpoint_file_instead_of_folder(capsys, model_dir, work):
    line = _fails_cleanly(capsys, work, ["probe", "--model", str(model_dir / "config.json"), "x"], "pass the folder")
    assert str(model_dir) in line


def test_gguf_path_is_accepted_and_converted_once(monkeypatch, tmp_path):
    """A ``.gguf`` path resolves to a cached dense folder (the embedded model's own converter)."""
    from bias_lens import loading

    monkeypatch.setenv("BIAS_LENS_CACHE", str(tmp_path / "cache"))
    gguf = tmp_path / "my-model.Q4.gguf"
    gguf.write_bytes(b"GGUF")
    calls = []
    monkeypatch.setattr(loading, "_converted", lambda g, target: calls.append((g, target)) or target)
    path, local = loading.resolve_spec(str(gguf))
    assert local and calls == [(gguf.resolve(), Path(path))]
    assert Path(path).parent == tmp_path / "cache" and Path(path).name.startswith("gguf-my-model.Q4-")
    embedded = loading.embedded_gguf_path()
    assert loading.resolve_spec(str(embedded))[0] == loading.resolve_spec("smollm2-135m")[0]


# --------------------------------------------------------------------------- evaluate / patch
def test_evaluate_unknown_suite(capsys, work):
    _fails_cleanly(capsys, work, ["evaluate", "--suite", "nosuch"], "unknown suite")


def test_evaluate_batch_size_zero(capsys, work):
    _fails_cleanly(capsys, work, ["evaluate", "--suite", "genbiaseval", "--batch-size", "0"], "--batch-size")


def test_evaluate_duplicate_targets(capsys, model_dir, work):
    _fails_cleanly(capsys, work, ["evaluate", "--suite", "genbiaseval", "--targets", "he,he", "--model", str(model_dir),
                                  "--limit", "4", "--no-progress"], "repeats")


@pytest.mark.parametrize("targets", ["he,photosynthesis", "he,\u0416\u0416\u0416"])
def test_evaluate_multi_token_or_absent_target(capsys, model_dir, work, targets):
    _fails_cleanly(capsys, work, ["evaluate", "--suite", "genbiaseval", "--targets", targets, "--model", str(model_dir),
                                  "--limit", "4", "--no-progress"], "several tokens")


def test_patch_apply_missing_folder(capsys, model_dir, work):
    _fails_cleanly(capsys, work, ["patch", "apply", "--base", str(model_dir), "--patch", str(work / "nope"),
                                  "--out", str(work / "out")], "not a folder")


# --------------------------------------------------------------------------- startup
def test_version_and_lazy_help_need_no_torch():
    """``--version`` answers, and building the parser for ``--help`` imports neither torch nor
    transformers (a fresh interpreter: this one has torch loaded already)."""
    from bias_lens import __version__

    ver = subprocess.run([sys.executable, "-m", "bias_lens", "--version"], capture_output=True, text=True, timeout=60)
    assert ver.returncode == 0 and ver.stdout.strip() == f"bias-lens {__version__}"
    code = ("import sys, contextlib, io\n"
            "from bias_lens.cli import main\n"
            "buf = io.StringIO()\n"
            "with contextlib.redirect_stdout(buf):\n"
            "    try:\n        main(['--help'])\n    except SystemExit as e:\n        assert e.code == 0\n"
            "assert 'locate' in buf.getvalue() and 'evaluate' in buf.getvalue()\n"
            "print(sorted(m for m in ('torch', 'transformers', 'plotly') if m in sys.modules))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"
