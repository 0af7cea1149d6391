"""``bias-lens`` command line: a thin router over the library; every command has ``--json``.

Each subcommand lives in its own module exposing ``register(subparsers)``; the router adds them
in :data:`COMMANDS` order. Errors a user can fix (unknown model, empty prompt, a target not in the
vocabulary, a bad option) exit with status 2 and one line on stderr.

Startup is lazy: importing this package imports neither torch nor transformers, and
:func:`main` fully registers only the command named on the command line (some commands' options
need the library, e.g. ``evaluate`` lists the benchmark suites); the others are listed by the
summary in their module docstring. So ``bias-lens --help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..lens import LensModel

COMMANDS: tuple[str, ...] = ("probe", "run", "evaluate", "datasets", "edit", "patch", "locate")


class UsageError(Exception):
    """A user-fixable problem; printed as one line, exit status 2."""


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The ``bias-lens`` parser; with ``argv``, only the command it names is fully registered.

    ``argv=None`` registers every command (for introspection). With ``argv`` naming no command
    (``--help``, ``--version``, a typo) each command is listed by its docstring summary only.
    """
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="bias-lens",
        description="Locate social bias inside language models, edit exactly those weights, export checkpoints.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress at INFO level on stderr")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else _command_of(argv)
    for name in COMMANDS:
        module = importlib.import_module(f"bias_lens.cli.{name.replace('-', '_')}")
        if argv is None or name == chosen:
            module.register(sub)
        elif chosen is None:
            sub.add_parser(name, help=_summary(module.__doc__))
    return parser


def _command_of(argv: Sequence[str]) -> str | None:
    """The command named in ``argv``: its first non-option word (top-level options take no value)."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def _summary(doc: str | None) -> str:
    """``"``bias-lens edit``: locate, edit ... export.\n..."`` -> ``"locate, edit ... export"``."""
    first = (doc or "").strip().splitlines()[0] if doc and doc.strip() else ""
    return first.split("``: ", 1)[-1].rstrip(".")


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types reported as one-line user errors (exit 2) instead of a traceback; imported lazily."""
    from ..loading import ModelLoadError
    from ..targets import TargetError

    return (UsageError, ModelLoadError, TargetError, ValueError, KeyError, FileNotFoundError, FileExistsError)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``bias-lens``: parse ``argv``, set up logging, run the command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    _quiet_third_party()
    try:
        return int(args.func(args) or 0)
    except user_errors() as err:
        msg = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"bias-lens {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bias-lens {args.command}: interrupted", file=sys.stderr)
        return 130


def _quiet_third_party() -> None:
    import os
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*deprecated.*")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover - transformers always present in practice
        pass


#: ``--dtype`` choices (the names of :data:`bias_lens.loading.DTYPES`, listed here so the parser needs no torch).
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
#: ``--device-map`` choices (accelerate's automatic placements)
DEVICE_MAPS: tuple[str, ...] = ("auto", "balanced", "balanced_low_0", "sequential")


def add_model_arg(p: argparse.ArgumentParser) -> None:
    """Add the shared ``--model`` and ``--dtype`` options (what to load, and in which precision)."""
    p.add_argument("--model", default="smollm2-135m", help="embedded name, local HF folder, or cached hub id (default: smollm2-135m)")
    p.add_argument("--dtype", default="float32", metavar="{" + ",".join(DTYPE_NAMES) + "}",
                   help="precision of the weights (default float32; see docs/half_precision.md)")
    p.add_argument("--device", default=None, help="put the whole model on this device (cpu, cuda, cuda:1, mps)")
    p.add_argument("--device-map", default=None, choices=DEVICE_MAPS,
                   help="shard the model over every visible device with accelerate (not with --device)")


def model_from_args(args: argparse.Namespace) -> LensModel:
    """The :class:`~bias_lens.lens.LensModel` of ``--model`` in ``--dtype``: the one place a command loads
    its model (a bad ``--dtype`` is a one-line error, exit 2, before anything is read)."""
    from ..lens import load_model
    from ..loading import resolve_dtype

    dtype = resolve_dtype(args.dtype)
    device, device_map = getattr(args, "device", None), getattr(args, "device_map", None)
    if device is not None and device_map is not None:
        raise UsageError("--device and --device-map exclude each other: --device puts the whole model on one "
                         "device, --device-map shards it; pass one")
    if device is not None:
        check_device(device)
    return load_model(args.model, dtype=dtype, device=device, device_map=device_map)


def check_device(device: str) -> None:
    """Refuse a ``--device`` this machine does not have, in one line (before any weight is read)."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as err:
        raise UsageError(f"--device {device!r} is not a device name (use cpu, cuda, cuda:N or mps): {err}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device on this machine; drop --device (CPU) or run on a GPU machine")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) visible")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {device}: no MPS device on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {device}: unsupported device type {dev.type!r} (use cpu, cuda, cuda:N or mps)")


def add_json_arg(p: argparse.ArgumentParser) -> None:
    """Add the shared ``--json`` flag (machine-readable output on stdout)."""
    p.add_argument("--json", action="store_true", help="print machine-readable JSON on stdout")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
