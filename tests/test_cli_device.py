"""``--device`` / ``--device-map`` on the model-loading commands: what this machine lacks is one line,
exit 2, before any weight is read; what it has loads the model where asked (same numbers)."""

from __future__ import annotations

import json

import pytest
import torch

from bias_lens.cli import main
from bias_lens.scoring import target_logprobs
from bias_lens.targets import resolve_targets
from conftest import build_tiny

PROMPTS = ["The nurse said that", "The engineer said that"]


@pytest.fixture
def folder(tiny_tokenizer_dir, tmp_path):
    build_tiny("llama", tiny_tokenizer_dir, tmp_path / "llama")
    return tmp_path / "llama"


@pytest.mark.parametrize("flags, needle", [
    (["--device", "cuda"] if not torch.cuda.is_available() else ["--device", "cuda:99"], "--device cuda"),
    (["--device", "toaster"], "is not a device name"),
    (["--device", "cpu", "--device-map", "auto"], "exclude each other"),
])
def test_bad_device_is_one_line_and_exit_2(folder, capsys, flags, needle):
    assert main(["probe", "--model", str(folder), *flags, *PROMPTS]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and needle in err


def test_device_cpu_and_device_map_give_the_plain_numbers(folder, capsys):
    from bias_lens import load_model

    lm = load_model(str(folder))
    want = target_logprobs(lm, PROMPTS, resolve_targets(lm.tokenizer, "he,she")).exp().tolist()
    for flags in (["--device", "cpu"], ["--device-map", "auto"]):
        assert main(["probe", "--model", str(folder), *flags, "--json", *PROMPTS]) == 0
        rows = json.loads(capsys.readouterr().out)
        got = [r["probs"][w] for r in rows for w in ("he", "she")]
        assert got == pytest.approx([p for row in want for p in row], abs=1e-6), flags
