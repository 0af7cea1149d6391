"""``LocateResult.save`` / ``load`` / ``save_dir``: the JSON round trip, and the result folder the CLI
writes (new or empty unless forced, built in a temporary sibling, never half-written)."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from bias_lens.locate.result import RESULT_FILE, LocateResult, check_out_dir


def result() -> LocateResult:
    return LocateResult("row", ["L1.mlp.down/row0", "L1.mlp.down/row1", "L1.mlp.down/row2"],
                        torch.tensor([0.5, math.nan, -1.25], dtype=torch.float64), variant="v",
                        per_prompt=torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], dtype=torch.float64),
                        extras={"selected": [0, 2]}, ascending=True, model="tiny", n_samples=2)


def _siblings(folder):
    return sorted(p.name for p in folder.iterdir())


def test_save_load_round_trip_is_atomic_with_umask_mode(tmp_path):
    r = result()
    path = r.save(tmp_path / "r.json")
    assert _siblings(tmp_path) == ["r.json"]  # no temporary file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    data = json.loads(path.read_text())
    assert data["scores"][::2] == [0.5, -1.25] and math.isnan(data["scores"][1]) and data["per_prompt"] == [[1, 2, 3], [4, 5, 6]] and data["ascending"]
    back = LocateResult.load(path)
    assert back.labels == r.labels and back.extras == {"selected": [0, 2]} and back.ascending and back.n_samples == 2
    assert torch.equal(back.scores.nan_to_num(7.0), r.scores.nan_to_num(7.0)) and torch.equal(back.per_prompt.double(), r.per_prompt)


def test_save_dir_writes_result_and_extra_files(tmp_path):
    out = tmp_path / "res"

    def extra(folder):
        (folder / "fig.html").write_text("<html>")
        return [folder / "fig.html"]

    written = result().save_dir(out, extra=extra)
    assert written == [out / RESULT_FILE, out / "fig.html"]
    assert _siblings(out) == ["fig.html", RESULT_FILE] and _siblings(tmp_path) == ["res"]
    assert LocateResult.load(out / RESULT_FILE).labels == result().labels


def test_save_dir_into_an_empty_folder(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    assert result().save_dir(out) == [out / RESULT_FILE]
    assert _siblings(out) == [RESULT_FILE]


def test_non_empty_folder_refused_then_replaced_as_a_whole_with_force(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "old.html").write_text("earlier run")
    with pytest.raises(ValueError, match="not empty.*force=True"):
        result().save_dir(out)
    assert _siblings(out) == ["old.html"] and _siblings(tmp_path) == ["res"]
    result().save_dir(out, force=True)
    assert _siblings(out) == [RESULT_FILE] and _siblings(tmp_path) == ["res"]  # old file gone, no temp folder


def test_failing_extra_leaves_the_old_folder_and_no_temp(tmp_path):
    out = tmp_path / "res"
    out.mkdir()
    (out / "old.html").write_text("earlier run")

    def boom(folder):
        (folder / "half.html").write_text("<ht")
        raise RuntimeError("figure failed")

    with pytest.raises(RuntimeError, match="figure failed"):
        result().save_dir(out, force=True, extra=boom)
    assert _siblings(out) == ["old.html"] and (out / "old.html").read_text() == "earlier run"
    assert _siblings(tmp_path) == ["res"]


def test_check_out_dir_errors_write_nothing(tmp_path):
    f = tmp_path / "file.txt"
    f.write_text("x")
    with pytest.raises(ValueError, match="not a folder"):
        check_out_dir(f)
    with pytest.raises(ValueError, match="parent folder .* does not exist"):
        result().save_dir(tmp_path / "a" / "b")
    assert _siblings(tmp_path) == ["file.txt"]
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(ValueError, match="pass --force"):
        check_out_dir(tmp_path / "d", force_hint="--force")
    assert check_out_dir(tmp_path / "d", force=True) == tmp_path / "d"
    assert check_out_dir(tmp_path / "new") == tmp_path / "new" and not (tmp_path / "new").exists()
