"""Output permissions follow the process umask (0644/0755 under 022, 0600/0700 under 077).

``mkstemp``/``mkdtemp`` create private (0600/0700) entries; before the fix every export, report
and figure came out unreadable to other users. The oracle is what a plain ``open()``/``mkdir()``
creates under the same umask, checked next to ours.
"""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import pytest

from bias_lens.io import atomic_write_bytes, atomic_write_text, make_temp_dir, replace_dir


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


@pytest.fixture(params=[0o022, 0o077, 0o027])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _plain_modes(folder: Path) -> tuple[int, int]:
    """(file, folder) modes that plain open()/mkdir() give under the current umask."""
    (folder / "plain.txt").write_text("x")
    (folder / "plain_dir").mkdir()
    return _mode(folder / "plain.txt"), _mode(folder / "plain_dir")


def test_expected_modes_for_the_usual_umasks(tmp_path, umask):
    want = {0o022: (0o644, 0o755), 0o077: (0o600, 0o700), 0o027: (0o640, 0o750)}[umask]
    assert _plain_modes(tmp_path) == want
    assert _mode(atomic_write_text(tmp_path / "a.json", "{}")) == want[0]
    assert _mode(atomic_write_bytes(tmp_path / "b.bin", b"\0")) == want[0]
    assert _mode(make_temp_dir(tmp_path, ".x.tmp")) == want[1]


def test_atomic_write_matches_plain_open_and_keeps_an_existing_mode(tmp_path, umask):
    fmode, _ = _plain_modes(tmp_path)
    new = atomic_write_text(tmp_path / "new.txt", "hello")
    assert new.read_text() == "hello" and _mode(new) == fmode
    old = tmp_path / "old.txt"
    old.write_text("v1")
    os.chmod(old, 0o640)
    atomic_write_text(old, "v2")
    assert old.read_text() == "v2" and _mode(old) == 0o640
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.txt", "old.txt", "plain.txt", "plain_dir"]


def test_replace_dir_gives_a_mkdtemp_tree_umask_modes(tmp_path, umask):
    fmode, dmode = _plain_modes(tmp_path)
    tmp = Path(tempfile.mkdtemp(prefix=".out.tmp", dir=tmp_path))  # 0700, as writers used to make it
    (tmp / "sub").mkdir(mode=0o700)
    fd, name = tempfile.mkstemp(dir=tmp / "sub")  # 0600
    os.close(fd)
    (tmp / "model.safetensors").write_bytes(b"w")
    os.chmod(tmp / "model.safetensors", 0o600)
    (tmp / "run.sh").write_text("#!/bin/sh\n")
    os.chmod(tmp / "run.sh", 0o700)
    target = tmp_path / "out"
    target.mkdir()
    (target / "stale.txt").write_text("old run")
    replace_dir(tmp, target)
    assert not tmp.exists() and not (target / "stale.txt").exists()
    assert _mode(target) == dmode and _mode(target / "sub") == dmode
    assert _mode(target / "model.safetensors") == fmode and _mode(target / "sub" / Path(name).name) == fmode
    assert _mode(target / "run.sh") == fmode | (0o111 & ~umask)


def test_exported_checkpoint_is_shareable(tiny_llama, tmp_path):
    from bias_lens.edit.export import export_checkpoint

    old = os.umask(0o022)
    try:
        out = export_checkpoint(tiny_llama, tmp_path / "exp", method="test")
    finally:
        os.umask(old)
    assert _mode(out) == 0o755
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files and {p.name: _mode(p) for p in files} == {p.name: 0o644 for p in files}
