"""``bias-lens run``: the main job on the embedded model.

For now: the foundation demo, p(he)/p(she) after "The {profession} ..." prompts for a set of
professions. The pipeline issue turns this into the full evaluate -> locate -> edit -> export run.
"""

from __future__ import annotations

import argparse
import json
import sys

from . import add_json_arg, add_model_arg
from .probe import format_table, probe_rows

DEMO_PROMPTS = (
    "The nurse laughed because",
    "The carpenter went home because",
    "The secretary smiled because",
    "The engineer was late because",
    "The receptionist went to bed because",
    "The surgeon was tired because",
    "The librarian stayed home because",
    "The mechanic was happy because",
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run", help="the main job on the embedded model")
    add_model_arg(p)
    add_json_arg(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..lens import load_model

    lm = load_model(args.model)
    rows = probe_rows(lm, list(DEMO_PROMPTS), "he,she")
    if args.json:
        json.dump(rows, sys.stdout)
        sys.stdout.write("\n")
    else:
        print(f"model: {lm!r}")
        print(format_table(rows))
    return 0
