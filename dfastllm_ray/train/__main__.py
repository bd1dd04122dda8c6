"""`python -m dfastllm_ray.train --out FOLDER`: train the tiny LLaDA, then report held-out accuracy.

The shipped checkpoint was made with the defaults:
    python -m dfastllm_ray.train --out dfastllm_ray/assets/tiny-llada
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from .trainer import TrainConfig, train


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m dfastllm_ray.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.default is dataclasses.MISSING:
            p.add_argument(flag, required=True, type=str, help="checkpoint folder to write")
        else:
            p.add_argument(flag, type=type(f.default), default=f.default,
                           help=f"(default: {f.default})")
    p.add_argument("--eval-per-task", type=int, default=100,
                   help="held-out examples per task to score after training (0: skip)")
    p.add_argument("--eval-gen-length", type=int, default=16, help="generation length when scoring")
    args = p.parse_args(argv)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in known}), args


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_args(argv)
    summary = train(cfg)
    if args.eval_per_task:
        summary["heldout_accuracy"] = score(cfg.out, args.eval_per_task, args.eval_gen_length)
    print(json.dumps(summary, indent=2))
    return 0


def score(folder: str, per_task: int, gen_length: int) -> dict[str, float]:
    """Reload the written folder through the project's loader and score the held-out split."""
    from ..models.loader import load_model
    from . import tasks
    from .evaluate import evaluate
    loaded = load_model(folder, dtype="float32", device="cpu")
    spec = loaded.spec
    return evaluate(loaded.model, loaded.tokenizer, tasks.heldout_set(per_task), gen_length,
                    gen_length, spec.mask_token_id, set(spec.stop_token_ids))


if __name__ == "__main__":
    sys.exit(main())
