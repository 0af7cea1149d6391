"""Per-stage result cache of the main job: ``<cache_root>/runs/<key>/<stage>.json``.

Each stage's result is written atomically the moment it is done, so an interrupted run
resumes at the first unfinished stage. Locate results are stored with
:meth:`LocateResult.save`; edits as sparse patches (:func:`bias_lens.edit.patch.save_patch`).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io import atomic_write_text

if TYPE_CHECKING:
    from ..locate.result import LocateResult

log = logging.getLogger(__name__)


class StageCache:
    """JSON / LocateResult / patch storage for one run key; ``enabled=False`` stores nothing."""

    def __init__(self, root: Path, key: str, enabled: bool = True) -> None:
        self.dir = Path(root) / "runs" / key
        self.enabled = enabled
        if enabled:
            self.dir.mkdir(parents=True, exist_ok=True)

    def _p(self, name: str, ext: str = ".json") -> Path:
        return self.dir / (name.replace("/", "_").replace(" ", "_") + ext)

    def get_json(self, name: str) -> Any | None:
        """The cached JSON value ``name``, or None when caching is off, it is missing or damaged."""
        p = self._p(name)
        if not self.enabled or not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError:  # never trust a damaged entry: recompute
            log.warning("ignoring damaged cache entry %s", p)
            return None

    def put_json(self, name: str, value: Any) -> Any:
        """Cache ``value`` under ``name`` (atomic write; nothing when disabled) and return it."""
        if self.enabled:
            atomic_write_text(self._p(name), json.dumps(value, default=str))
        return value

    def get_result(self, name: str) -> LocateResult | None:
        """The cached locate result ``name``, or None when caching is off or it is missing."""
        from ..locate.result import LocateResult

        p = self._p(name, ".locate.json")
        return LocateResult.load(p) if self.enabled and p.exists() else None

    def put_result(self, name: str, result: LocateResult) -> LocateResult:
        """Cache the locate result under ``name`` (nothing when disabled) and return it."""
        if self.enabled:
            result.save(self._p(name, ".locate.json"))
        return result

    def patch_dir(self, name: str) -> Path:
        """The cache folder of the patch of row ``name``."""
        return self._p(name, ".patch")

    def clear(self) -> None:
        """Delete the whole cache folder (missing is fine)."""
        shutil.rmtree(self.dir, ignore_errors=True)
