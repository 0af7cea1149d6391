"""export_checkpoint: verified by plain-transformers reload; failures and interruptions leave nothing.

Oracles: the exported folder reloaded with ``AutoModelForCausalLM.from_pretrained`` (no bias_lens)
gives the in-memory edited model's logits exactly, and a bitwise diff against the base checkpoint
equals the manifest's per-parameter counts and the edit's own entries. Failures are injected by
corrupting a written weight (verification must catch it) or raising mid-write.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bias_lens.edit import Edit, mask_from_labels
from bias_lens.edit import export as export_mod
from bias_lens.edit.export import MANIFEST, ExportError, export_checkpoint


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _edit(tiny) -> Edit:
    mask = mask_from_labels(tiny.hf, ["L1.mlp.down/row3", "L0.attn.q/row1/col2"])
    return Edit.from_fn(tiny.hf, mask, lambda _n, old: old + 0.5, method="test")


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_export_reloads_in_plain_transformers_and_manifest_is_exact(tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    edit = _edit(tiny)
    h = edit.apply_(tiny.hf)
    try:
        out = export_checkpoint(tiny, tmp_path / "exp", method="test", seed=3, hyperparams={"lr": 1.0},
                                metrics_before={"afgb": 0.2}, metrics_after={"afgb": 0.1})
        model = AutoModelForCausalLM.from_pretrained(out).eval()
        tok = AutoTokenizer.from_pretrained(out)
        ids = tok("The nurse said that", return_tensors="pt")
        with torch.no_grad():
            assert torch.equal(model(**ids).logits, tiny.hf(**ids).logits)
    finally:
        h.undo()
    man = json.loads((out / MANIFEST).read_text())
    assert man["params"] == edit.changed_counts(_fresh(tiny)) == {n: int(i.numel()) for n, i in edit.indices.items()}
    assert man["seed"] == 3 and man["metrics_after"] == {"afgb": 0.1} and man["base_sha256"]
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and (out / "generation_config.json").is_file()
    # only the edited entries differ from the base, by the edit's values
    base = {}
    for f in Path(tiny.hf.config._name_or_path).glob("*.safetensors"):
        base.update(load_file(str(f)))
    new = {}
    for f in out.glob("*.safetensors"):
        new.update(load_file(str(f)))
    for n in base:
        expect = base[n].clone()
        if n in edit.indices:
            expect.view(-1)[edit.indices[n]] = edit.values[n]
        assert torch.equal(new[n], expect), n


def _fresh(tiny):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny.hf.config._name_or_path)


def test_injected_corruption_is_caught_and_leaves_no_folder(tiny_llama, tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    real_write = export_mod._write

    def corrupt(lm, tmp: Path) -> None:
        real_write(lm, tmp)
        f = next(tmp.glob("*.safetensors"))
        data = load_file(str(f))
        name = next(n for n in data if "down_proj" in n)
        data[name] = data[name].clone()
        data[name].view(-1)[0] += 1.0
        save_file(data, str(f), metadata={"format": "pt"})

    monkeypatch.setattr(export_mod, "_write", corrupt)
    with pytest.raises(ExportError, match="logits differ|do not match"):
        export_checkpoint(tiny_llama, tmp_path / "exp", method="test")
    assert _leftovers(tmp_path) == ["llama"]  # only the base folder of the fixture


def test_interrupted_write_leaves_no_folder_and_refuses_nonempty(tiny_llama, tmp_path, monkeypatch):
    real_write = export_mod._write

    def interrupted(lm, tmp: Path) -> None:
        real_write(lm, tmp)
        raise KeyboardInterrupt

    monkeypatch.setattr(export_mod, "_write", interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_checkpoint(tiny_llama, tmp_path / "exp", method="test")
    assert _leftovers(tmp_path) == ["llama"]
    monkeypatch.undo()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="not empty"):
        export_checkpoint(tiny_llama, full, method="test")
    assert _leftovers(full) == ["x"]
    out = export_checkpoint(tiny_llama, full, method="noop", force=True)  # unedited: empty manifest diff
    assert json.loads((out / MANIFEST).read_text())["params"] == {}
