"""`python -m dfastllm_ray.train --out FOLDER [--family llada|dream|ar|sdar]`: train a tiny model,
then report held-out accuracy. Commands of the shipped checkpoints: docs/tiny_model.md.

Long runs: `--eval-every N` keeps the best model in --out; the resume state and log.jsonl go to
--state-dir (default runs/<name of out>); `--resume` continues an interrupted run exactly.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

from .trainer import TrainConfig, train


def _flag_type(default):
    if isinstance(default, bool):
        return lambda s: {"true": True, "1": True, "false": False, "0": False}[s.lower()]
    return type(default)


def parse_args(argv: list[str] | None = None) -> tuple[TrainConfig, argparse.Namespace]:
    p = argparse.ArgumentParser(prog="python -m dfastllm_ray.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.default is dataclasses.MISSING:
            p.add_argument(flag, required=True, type=str, help="model folder to write")
        elif isinstance(f.default, bool):
            p.add_argument(flag, action="store_true", help=f"(default: {f.default})")
        else:
            p.add_argument(flag, type=_flag_type(f.default), default=f.default,
                           help=f"(default: {f.default})")
    p.add_argument("--eval-final", type=int, default=100,
                   help="held-out examples per task to score the written folder with (0: skip)")
    p.add_argument("--eval-gen-length", type=int, default=32, help="generation length when scoring")
    p.add_argument("--eval-block-length", type=int, default=8,
                   help="block length when scoring (8: configs/tiny.yaml's default; an SDAR "
                        "model is scored in blocks of its config's block_size)")
    args = p.parse_args(argv)
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in vars(args).items() if k in known}), args


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pin_threads(threads: int, argv: list[str]) -> None:
    """Re-start this command with the thread pools sized from the first moment. Setting
    torch.set_num_threads(1) after the pools started with 2 threads left MKL's choice of kernel
    varying between processes (same seed, different sha256 in 1 run of 3); with the variables set
    before torch loads, every run matched (measured while building this trainer)."""
    if all(os.environ.get(v) == str(threads) for v in THREAD_VARS):
        return
    env = {**os.environ, **{v: str(threads) for v in THREAD_VARS}}
    os.execve(sys.executable, [sys.executable, "-m", "dfastllm_ray.train", *argv], env)


def main(argv: list[str] | None = None, reexec: bool = False) -> int:
    """reexec: allowed to replace this process (`pin_threads`); only the command line is."""
    argv = sys.argv[1:] if argv is None else argv
    cfg, args = parse_args(argv)
    if reexec and cfg.device == "cpu":
        pin_threads(cfg.threads, argv)
    summary = train(cfg)
    if args.eval_final:
        summary["heldout_accuracy"] = score(cfg.out, args.eval_final, args.eval_gen_length,
                                            args.eval_block_length)
    if args.eval_final and cfg.family == "sdar":
        summary["heldout_accuracy_sequential"] = score(cfg.out, args.eval_final,
                                                       args.eval_gen_length, 0, "sequential")
    print(json.dumps(summary, indent=2))
    return 0


def score(folder: str, per_task: int, gen_length: int, block_length: int,
          sdar_strategy: str = "low_confidence_dynamic") -> dict[str, float]:
    """Reload the written folder through the project's loader and score the held-out split
    (seed 0) with the reference schedule (one token per step, low-confidence order); an SDAR
    folder with its own reference loop, greedy, in blocks of its block_size (evaluate.py)."""
    from ..models.loader import load_model
    from . import tasks
    from .evaluate import evaluate
    loaded = load_model(folder, dtype="float32", device="cpu")
    spec = loaded.spec
    sdar = spec.block_size is not None
    return evaluate(loaded.model, loaded.tokenizer, tasks.heldout_set(per_task), gen_length,
                    spec.block_size if sdar else block_length, spec.mask_token_id,
                    set(spec.stop_token_ids), logits_shift=spec.logits_shift,
                    causal=spec.mask_token_id is None,
                    block_strategy=sdar_strategy if sdar else None)


if __name__ == "__main__":
    sys.exit(main(reexec=True))
