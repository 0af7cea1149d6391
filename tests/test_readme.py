"""The README is true: exactly two set-up commands, CI runs the test command verbatim, and the
Python quickstart runs as written (on a tiny model instead of SmolLM2, nothing else changed)."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _setup_commands() -> list[str]:
    section = README.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return [b.strip() for b in re.findall(r"```bash\n(.*?)```", section, re.S)]


def test_two_setup_commands_and_ci_runs_the_test_command():
    cmds = _setup_commands()
    assert cmds == ["bash scripts/main.sh", "bash scripts/test.sh"]
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert cmds[1] in [line.strip() for line in ci]
    for c in cmds:
        assert (ROOT / c.split()[1]).exists()


def test_python_quickstart_runs(tiny_llama, tmp_path, monkeypatch):
    code = README.split("## Python quickstart", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    folder = tiny_llama.hf.config._name_or_path
    code = (code.replace('"smollm2-135m"', repr(folder)).replace('"L29.mlp.down"', '"L2.mlp.down"')
            .replace("200, seed=0", "8, seed=0").replace("[:128]", "[:8]").replace("limit=200", "limit=16")
            .replace('"out/debiased"', repr(str(tmp_path / "debiased"))))
    monkeypatch.setenv("BIAS_LENS_TEST_QUICKSTART", "1")
    ns: dict = {}
    exec(compile(code, "README-quickstart", "exec"), ns)
    assert (tmp_path / "debiased" / "bias_lens_edit.json").exists()
    assert ns["mask"].size == ns["entries"].extras["n_entries"]


def test_readme_results_are_the_committed_runs():
    """The README's SmolLM2 results block is exactly what scripts/readme_results.py renders from
    figures/results.json (the committed output of the full run), and its figures exist."""
    import importlib.util

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("readme_results", root / "scripts" / "readme_results.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    readme = (root / "README.md").read_text()
    assert mod.current_block(readme) == mod.render(), "README results are stale: run scripts/readme_results.py RUN_DIR"
    res = json.loads((root / "figures" / "results.json").read_text())
    assert not res["meta"]["config"]["quick"], "the README shows a full run"
    import re

    for target in re.findall(r"\]\((figures/[^)]+)\)", mod.render()):  # every image and figure link
        assert (root / target).exists(), target
