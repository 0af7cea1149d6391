"""``bias-lens probe``: next-token probabilities of target words after raw prompts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from . import UsageError, add_json_arg, add_model_arg, model_from_args

if TYPE_CHECKING:
    from ..lens import LensModel


def register(sub: argparse._SubParsersAction) -> None:
    """Add the ``probe`` command (next-token probabilities of the targets after each prompt)."""
    p = sub.add_parser("probe", help="print p(target) as the next token after each prompt")
    add_model_arg(p)
    p.add_argument("--targets", default="he,she", help="comma-separated target words (default: he,she)")
    p.add_argument("--batch-size", type=int, default=32)
    add_json_arg(p)
    p.add_argument("prompts", nargs="+", metavar="PROMPT", help="raw prompt text, used exactly as given")
    p.set_defaults(func=run)


def probe_rows(lm: LensModel, prompts: list[str], words: str) -> list[dict]:
    """One ``{prompt, probs: {word: p}}`` row per prompt: raw next-token probabilities of ``words``."""
    from ..scoring import check_prompts, target_probs
    from ..targets import resolve_targets

    targets = resolve_targets(lm.tokenizer, words)
    probs = target_probs(lm, check_prompts(prompts), targets)
    return [
        {"prompt": p, "probs": {w: float(probs[i, j]) for j, w in enumerate(targets.words)}}
        for i, p in enumerate(prompts)
    ]


def format_table(rows: list[dict]) -> str:
    """The probe rows as an aligned text table (one column per target word)."""
    words = list(rows[0]["probs"])
    width = max(len("prompt"), *(len(r["prompt"]) for r in rows))
    head = f"{'prompt':<{width}}  " + "  ".join(f"p({w})".rjust(9) for w in words)
    lines = [head, "-" * len(head)]
    for r in rows:
        lines.append(f"{r['prompt']:<{width}}  " + "  ".join(f"{r['probs'][w]:9.4f}" for w in words))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Check the prompts, load the model and print the probe table or JSON; returns the exit status."""
    for i, p in enumerate(args.prompts):
        if not p.strip():
            raise UsageError(f"prompt {i + 1} is empty; pass non-empty prompt text")
    from ..targets import parse_words, resolve_targets

    parse_words(args.targets)
    lm = model_from_args(args)
    resolve_targets(lm.tokenizer, args.targets)
    rows = probe_rows(lm, args.prompts, args.targets)
    if args.json:
        json.dump(rows, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(format_table(rows))
    return 0
