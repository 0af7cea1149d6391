"""Progress bars where users wait: one switch, ``progress=``, off by default in library calls.

Every long-running function (locate passes, gradient scans, masked fine-tuning) takes
``progress: bool = False`` and wraps its loop with :func:`bar`. Disabled, :func:`bar` returns the
iterable itself (or a do-nothing counter), so results and timings are exactly those of the plain
loop; enabled, it is a ``tqdm.auto`` bar (a widget in Jupyter when ipywidgets is installed, text
on stderr otherwise). The CLI and the notebooks turn it on.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, TypeVar

T = TypeVar("T")


class NullBar:
    """The disabled bar: ``update``/``set_postfix``/``close`` and ``with`` do nothing."""

    def update(self, n: int = 1) -> None:
        """Do nothing (the tqdm ``update`` signature)."""
        pass

    def set_postfix(self, *args: Any, **kwargs: Any) -> None:
        """Do nothing (the tqdm ``set_postfix`` signature)."""
        pass

    def close(self) -> None:
        """Do nothing (the tqdm ``close`` signature)."""
        pass

    def __enter__(self) -> "NullBar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def bar(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str | None = None,
        enabled: bool = False, **kwargs: Any) -> Any:
    """A ``tqdm.auto`` bar over ``iterable`` when ``enabled``; else ``iterable`` unchanged.

    Without an iterable it is a manual counter (``.update(n)``, ``.close()``, usable in ``with``):
    a :class:`NullBar` when disabled. ``kwargs`` go to tqdm (e.g. ``file=`` in tests, ``unit=``).
    """
    if not enabled:
        return NullBar() if iterable is None else iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, **kwargs)


def batch_count(n_items: int, batch_size: int) -> int:
    """Number of batches ``iter_batches`` yields for ``n_items`` (the bar's total)."""
    return -(-n_items // max(1, batch_size))
