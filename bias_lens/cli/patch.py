"""``bias-lens patch create|apply|revert``: sparse weight patches between HF checkpoint folders.

* ``create --base B --edited E --out P``: the entries where ``E`` differs bitwise from ``B``
  (with ``B``'s originals) as a patch folder;
* ``apply --base B --patch P --out O``: ``B`` with the patch's values written (bit-exact ``E``);
* ``revert --base E --patch P --out O``: ``E`` with the patch's originals written back (bit-exact ``B``).

All writes are atomic (beside the target, then renamed). Before anything is written, apply and
revert check the patch's payload sha256 (a damaged patch is always refused) and that the base's
patched entries are the ones the patch was made from (revert: the ones it wrote); ``--force-base``
skips only the second check, for a base that differs on purpose. A patch written before these
hashes existed is refused unless ``--allow-legacy``. Every refusal is one line on stderr, exit 2.
Thin wrapper over :mod:`bias_lens.edit.patch`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import UsageError, add_json_arg


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``patch`` command (create / apply / revert sparse weight patches)."""
    p = sub.add_parser("patch", help="create / apply / revert sparse weight patches of HF checkpoints")
    p.add_argument("action", choices=("create", "apply", "revert"))
    p.add_argument("--base", required=True, metavar="DIR", help="checkpoint folder the action starts from")
    p.add_argument("--edited", default=None, metavar="DIR", help="create: the edited checkpoint folder")
    p.add_argument("--patch", default=None, metavar="DIR", help="apply/revert: the patch folder")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (new or empty unless --force)")
    p.add_argument("--force", action="store_true", help="replace a non-empty --out")
    p.add_argument("--force-base", action="store_true",
                   help="apply/revert: skip the check that --base holds the entries the patch was made from "
                        "(the payload hash is still checked)")
    p.add_argument("--allow-legacy", action="store_true",
                   help="apply/revert: accept a patch written before integrity hashes (with a warning)")
    add_json_arg(p)
    p.set_defaults(func=run)


def _folder(path: str | None, flag: str, action: str) -> Path:
    if path is None:
        raise UsageError(f"patch {action} needs {flag} DIR")
    p = Path(path)
    if not p.is_dir():
        raise UsageError(f"{flag} {p} is not a folder")
    return p


def run(args: argparse.Namespace) -> int:
    """Run the patch action; a :class:`PatchError` becomes a one-line usage error. Returns the exit status."""
    from ..edit.patch import PatchError

    try:
        return _run(args)
    except PatchError as err:
        raise UsageError(str(err)) from None


def _run(args: argparse.Namespace) -> int:
    from ..edit.patch import FORMAT, apply_patch, create_patch
    from ..edit.patch_integrity import read_manifest

    base = _folder(args.base, "--base", args.action)
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.force:
        raise UsageError(f"--out {out} exists and is not empty; choose another folder or pass --force")
    if args.action == "create":
        if args.patch is not None:
            raise UsageError("patch create takes --edited, not --patch")
        if args.force_base or args.allow_legacy:
            raise UsageError("--force-base and --allow-legacy apply to patch apply/revert, not create")
        edited = _folder(args.edited, "--edited", "create")
        create_patch(base, edited, out, force=args.force)
        patch_dir = out
    else:
        if args.edited is not None:
            raise UsageError(f"patch {args.action} takes --patch, not --edited")
        patch_dir = _folder(args.patch, "--patch", args.action)
        apply_patch(base, patch_dir, out, revert=args.action == "revert", force=args.force,
                    force_base=args.force_base, allow_legacy=args.allow_legacy)
    man = read_manifest(patch_dir, FORMAT)  # checked by the action above
    counts = {n: int(p["n"]) for n, p in man["params"].items()}
    payload = {"action": args.action, "out": str(out), "patch": str(patch_dir), "n_entries": sum(counts.values()),
               "params": counts, "method": man.get("method", "")}
    if args.json:
        json.dump(payload, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"patch {args.action}: {payload['n_entries']} entries in {len(counts)} tensors -> {out}")
    return 0
