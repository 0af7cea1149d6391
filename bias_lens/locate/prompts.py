"""Where the locating prompts come from: a benchmark split sample, or a user's prompts file.

Default: 200 prompts drawn with a fixed seed from GenBiasEval's train split
(:func:`bias_lens.benchmarks.sample_prompts`). A prompts file holds one raw prompt per line
(UTF-8; the trailing newline is stripped, blank lines are skipped, nothing else is changed).
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)
DEFAULT_SUITE = "genbiaseval"


def read_prompts_file(path: str | os.PathLike[str]) -> list[str]:
    """One prompt per non-blank line; clear errors for a missing, unreadable or empty file."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"prompts file {path} does not exist; pass a text file with one prompt per line")
    if not os.path.isfile(path):
        raise ValueError(f"prompts file {path} is not a file; pass a text file with one prompt per line")
    try:
        with open(path, encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except UnicodeDecodeError as err:
        raise ValueError(f"prompts file {path} is not UTF-8 text ({err.reason}); save it as UTF-8") from err
    prompts = [line for line in lines if line.strip()]
    if not prompts:
        raise ValueError(f"prompts file {path} has no prompts (only blank lines); write one prompt per line")
    return prompts


def resolve_prompts(
    suite: str | None = None, split: str = "train", n: int = 200, seed: int = 0,
    prompts_file: str | os.PathLike[str] | None = None,
) -> list[str]:
    """The prompts to locate with: ``prompts_file`` lines, or ``n`` prompts of ``suite``/``split``.

    Giving both a suite and a prompts file is an error (say which one you mean).
    """
    if prompts_file is not None:
        if suite is not None:
            raise ValueError("give either a suite or a prompts file, not both")
        return read_prompts_file(prompts_file)
    if n < 1:
        raise ValueError(f"the number of samples must be >= 1, got {n}")
    from ..benchmarks import sample_prompts

    suite = suite or DEFAULT_SUITE
    prompts = sample_prompts(suite, split, n, seed)
    if len(prompts) < n:
        log.warning("%s/%s has only %d prompts; using all of them", suite, split, len(prompts))
    return prompts
