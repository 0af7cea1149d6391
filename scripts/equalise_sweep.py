"""Dev-only sweep of the equalising fine-tuning options on SmolLM2 (no test split is touched).

    python scripts/equalise_sweep.py --module L29.mlp.down module:msme_align:1e-4:1 neuron:msme_align:1e-3:1

Each spec is ``scale:loss:lr:mass_weight``; ``scale`` is ``module`` (the whole ``--module``) or
``neuron`` (its top 4096 entries by ``neuron_scale`` on the train prompts). Every run:
128 seeded GenBiasEval train samples, early stopping on 64 dev prompts by AFGB-r with the mass
guard (0.9), 48 retention sentences, 3 epochs, a check every step; the dev history is printed.
"""

from __future__ import annotations

import argparse
import random
import time

import torch

from bias_lens import load_model
from bias_lens.benchmarks import load_split
from bias_lens.edit.finetune import FinetuneConfig, masked_finetune
from bias_lens.edit.masks import mask_from_labels
from bias_lens.locate.gradients import neuron_scale


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+", help="scale:loss:lr:mass_weight")
    ap.add_argument("--module", required=True, help="the module to edit, e.g. L29.mlp.down on SmolLM2")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--n-train", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=1)
    ap.add_argument("--optimizer", default="adam")
    ap.add_argument("--patience", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(2)
    lm = load_model("smollm2-135m")
    train = random.Random(0).sample(load_split("genbiaseval", "train"), args.n_train)
    dev = load_split("genbiaseval", "dev")
    masks = {"module": lambda: mask_from_labels(lm.hf, [args.module]),
             "neuron": lambda: mask_from_labels(lm.hf, neuron_scale(lm, [s["prompt"] for s in train],
                                                                    args.module).top_labels(4096))}
    for spec in args.specs:
        scale, loss, lr, mw = spec.split(":")
        cfg = FinetuneConfig(loss=loss, lr=float(lr), epochs=args.epochs, batch_size=32, eval_every=args.eval_every,
                             patience=args.patience, optimizer=args.optimizer,
                             dev_limit=64, retention_limit=48, dev_metric="afgb_renorm", mass_weight=float(mw),
                             mass_floor=0.9)
        t = time.time()
        res = masked_finetune(lm, masks[scale](), train, dev, cfg)
        print(spec, res.status, "best_step", res.best_step, f"{time.time() - t:.0f}s", flush=True)
        for r in res.history:
            print("   ", {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items() if k != "losses"}, flush=True)


if __name__ == "__main__":
    main()
