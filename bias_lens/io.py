"""Atomic file and folder writes shared by every module that writes output.

A reader never sees a half-written file or folder: content goes to a temporary sibling first
and is moved into place with :func:`os.replace` (atomic on POSIX within one file system).

Permissions follow the process umask, as a plain ``open()``/``mkdir()`` would: ``mkstemp`` and
``mkdtemp`` create their entries 0600/0700 (private), which would make every exported
checkpoint, report and figure unreadable to anyone else. With the usual umask 022 files end up
0644 and folders 0755; a user who wants private output sets umask 077 and gets 0600/0700.
"""

from __future__ import annotations

import os
import shutil
import stat
import tempfile
from pathlib import Path


def current_umask() -> int:
    """The process umask (read by setting it and restoring it at once; Python has no getter)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """Mode a new regular file gets under the current umask (0644 for umask 022)."""
    return 0o666 & ~current_umask()


def dir_mode() -> int:
    """Mode a new folder gets under the current umask (0755 for umask 022)."""
    return 0o777 & ~current_umask()


def make_temp_dir(parent: str | os.PathLike, prefix: str) -> Path:
    """A fresh temporary folder inside ``parent`` (which must exist), with umask permissions.

    Use it to build an output folder before :func:`replace_dir` moves it into place; unlike a bare
    :func:`tempfile.mkdtemp` the folder is not left private (0700).
    """
    tmp = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    os.chmod(tmp, dir_mode())
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` via a temporary file in the same folder; the folder must exist.

    A new file gets the umask mode (:func:`file_mode`); replacing an existing file keeps its mode.
    """
    target = Path(path)
    folder = target.parent if str(target.parent) else Path(".")
    if not folder.is_dir():
        raise FileNotFoundError(f"folder {folder} does not exist; create it or choose another path")
    mode = stat.S_IMODE(target.stat().st_mode) if target.is_file() else file_mode()
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)
            fh.write(data)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """UTF-8 text version of :func:`atomic_write_bytes`."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def apply_umask_tree(root: str | os.PathLike) -> None:
    """Give ``root`` and everything below it the umask modes of freshly created entries.

    Folders get :func:`dir_mode`; files :func:`file_mode`, plus the execute bits the umask allows
    when the file had any. Used on a folder we just built (whose writers may have used
    ``mkstemp``), never on user folders.
    """
    dmode, fmode, xmode = dir_mode(), file_mode(), 0o111 & ~current_umask()
    os.chmod(root, dmode)
    for here, dirs, files in os.walk(root):
        for d in dirs:
            p = os.path.join(here, d)
            if not os.path.islink(p):
                os.chmod(p, dmode)
        for f in files:
            p = os.path.join(here, f)
            if os.path.islink(p):
                continue
            executable = os.stat(p).st_mode & 0o111
            os.chmod(p, fmode | (xmode if executable else 0))


def replace_dir(tmp: Path, target: Path) -> None:
    """Move the finished folder ``tmp`` onto ``target``, replacing an existing one.

    The old folder is first renamed aside, so ``target`` is always either the complete old
    or the complete new content. ``tmp``'s entries first get umask permissions
    (:func:`apply_umask_tree`), so the result can be shared like any folder the user made.
    """
    tmp, target = Path(tmp), Path(target)
    apply_umask_tree(tmp)
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
        os.replace(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, target)
