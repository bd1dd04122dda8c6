"""Block diffusion (SDAR) offline: the official loop one request at a time against the engine.

    python benchmarks/sdar_offline.py                                  # the fixture's tiny SDAR
    python benchmarks/sdar_offline.py --model dfastllm_ray/assets/tiny-sdar --tasks 20
    python benchmarks/sdar_offline.py --model dfastllm_ray/assets/tiny-sdar --tasks 20 \
        --top-k 0 --temperature 1.0                                    # sampled: accuracy only
    python benchmarks/sdar_offline.py --random-weights sdar-4b --device cuda --batch 64 \
        --prompt-len 512 --gen-len 256 --max-len 1024 --skip-reference  # a GPU, no download

Paths, over the same prompts (`--batch` random ids of `--prompt-len`, or with `--tasks N` the
task suite's held-out questions, N per task, in the model's chat template): "reference" =
`sampling.sdar_generate.block_diffusion_generate` (the official loop, batch 1, requests one after
another), then the engine with `block_store="separate"` (the official forward order) and
`"fused"` (each block's K/V stored by the next block's first forward), all requests submitted at
once. At `--top-k 1` (the default: SDAR's greedy form) every path must return the same tokens:
the script checks it ("same tokens"). Sampled settings draw from the official RNG in the
reference and the engine's counter RNG in the engine (the same law, other numbers): compare
their accuracy, not their tokens. The engine stops a request after the block holding EOS; the
reference gets the same stop ids (`stopping_criteria_idx`), so both stop at the same block.
Printed per path: tokens/s (returned tokens), NFE per request, tokens per forward (TPF), engine
steps, the speed ratio to the reference and, with `--tasks`, exact-match accuracy. Times are the
wall clock of one run on this machine: compare the ratios of one run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfastllm_ray.engine.config import EngineConfig  # noqa: E402
from dfastllm_ray.engine.engine import Engine  # noqa: E402
from dfastllm_ray.models.loader import load_model  # noqa: E402
from dfastllm_ray.models.random_weights import random_model  # noqa: E402
from dfastllm_ray.sampling.params import SamplingParams  # noqa: E402
from dfastllm_ray.sampling.sdar_generate import (BlockDiffusionParams,  # noqa: E402
                                                 block_diffusion_generate)

FIXTURE = ROOT / "tests" / "fixtures" / "sdar" / "sdar-tiny"


def random_prompts(spec, n: int, length: int, seed: int) -> list[list[int]]:
    """Random prompt ids below the special tokens (never the mask)."""
    g = torch.Generator().manual_seed(seed)
    top = min(t for t in (spec.mask_token_id, spec.eos_token_id, spec.vocab_size) if t is not None)
    return [torch.randint(0, top, (length,), generator=g).tolist() for _ in range(n)]


def task_prompts(loaded, per_task: int) -> tuple[list[list[int]], list[str]]:
    """The held-out questions in the chat template, and their answers."""
    from dfastllm_ray.train import tasks
    from dfastllm_ray.train.evaluate import prompt_ids
    examples = tasks.heldout_set(per_task)
    return [prompt_ids(loaded.tokenizer, ex.prompt) for ex in examples], [ex.answer for ex in examples]


def until_stop(tokens: list[int], stops) -> list[int]:
    """The tokens before the first stop id (what the engine returns)."""
    cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokens[:cut]


def run_reference(loaded, batch: list[list[int]], args) -> tuple[list[list[int]], int, float]:
    stops = tuple(loaded.spec.stop_token_ids)        # the engine's early exit, as official stop ids
    p = BlockDiffusionParams(gen_length=args.gen_len, block_length=args.block_len,
                             denoising_steps=args.steps, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, remasking_strategy=args.strategy,
                             stopping_criteria_idx=stops or None, overwrite_committed=False)
    gen = torch.Generator(device=loaded.device).manual_seed(args.seed)
    outs, nfe, t0 = [], 0, time.perf_counter()
    for ids in tqdm(batch, desc="reference", unit="req", disable=args.no_progress):
        prompt = torch.tensor([ids], device=loaded.device)
        out = block_diffusion_generate(loaded.model, prompt, p, loaded.spec, gen)
        outs.append(until_stop(out.x[0, len(ids):len(ids) + args.gen_len].tolist(), stops))
        nfe += out.nfe
    return outs, nfe, time.perf_counter() - t0


def run_engine(loaded, batch: list[list[int]], args, store: str):
    eng = Engine(loaded, EngineConfig(max_num_seqs=len(batch), block_store=store,
                                      exact_ties=True, max_model_len=args.max_len))
    t0 = time.perf_counter()
    for i, ids in enumerate(batch):
        blocks = -(-(len(ids) + args.gen_len) // args.block_len) - len(ids) // args.block_len
        eng.add_request(str(i), ids, SamplingParams(
            max_tokens=args.gen_len, block_length=args.block_len, steps=args.steps * blocks,
            top_k=args.top_k or None, top_p=args.top_p, temperature=args.temperature,
            seed=args.seed + i, remasking_strategy=args.strategy))
    done = {}
    with tqdm(total=len(batch), desc=store, unit="req", disable=args.no_progress) as bar:
        while eng.has_unfinished():
            for o in eng.step():
                if o.finished:
                    done[o.request_id] = o
                    bar.update()
    wall = time.perf_counter() - t0
    outs = [until_stop(done[str(i)].token_ids[:args.gen_len], loaded.spec.stop_token_ids)
            for i in range(len(batch))]
    return outs, sum(o.nfe for o in done.values()), wall, eng.stats()["engine_steps"]


def accuracy(loaded, outs: list[list[int]], answers: list[str] | None) -> str:
    if answers is None:
        return "-"
    right = sum(loaded.tokenizer.decode(o) == a for o, a in zip(outs, answers))
    return f"{right / len(answers):.3f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(FIXTURE))
    ap.add_argument("--random-weights", default=None, help="a published shape (models/shapes.py, "
                    "e.g. sdar-4b) with random weights instead of --model")
    ap.add_argument("--tasks", type=int, default=None, metavar="N",
                    help="the task suite's held-out questions, N per task (a trained model)")
    ap.add_argument("--batch", type=int, default=16, help="random prompts (without --tasks)")
    ap.add_argument("--prompt-len", type=int, default=13)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--block-len", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per block")
    ap.add_argument("--strategy", default="low_confidence_dynamic")
    ap.add_argument("--top-k", type=int, default=1, help="1: the greedy form; 0: off")
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", help="float32 | bfloat16 | auto")
    ap.add_argument("--skip-reference", action="store_true", help="engine paths only")
    ap.add_argument("--no-progress", action="store_true")
    return ap.parse_args(argv)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    loaded = (random_model(args.random_weights, args.device, args.dtype) if args.random_weights
              else load_model(args.model, args.dtype, args.device))
    answers = None
    if args.tasks:
        batch, answers = task_prompts(loaded, args.tasks)
    else:
        batch = random_prompts(loaded.spec, args.batch, args.prompt_len, args.seed)
    ref = None if args.skip_reference else run_reference(loaded, batch, args)
    print(f"sdar offline: {loaded.name}, {len(batch)} requests, "
          f"{'held-out tasks' if args.tasks else f'prompt {args.prompt_len}'}, gen {args.gen_len}, "
          f"block {args.block_len}, {args.steps} steps/block, {args.strategy}, T={args.temperature} "
          f"top_k={args.top_k} top_p={args.top_p}, {args.threads} torch thread(s), "
          f"{loaded.device}, {loaded.dtype}")
    print(f"{'path':>10} | tok/s | NFE/req | TPF  | steps | x reference | same tokens | accuracy")
    if ref is not None:
        tokens = sum(len(t) for t in ref[0])    # returned tokens (an early stop returns fewer)
        print(f"{'reference':>10} | {tokens / ref[2]:5.0f} | {ref[1] / len(batch):7.1f} | "
              f"{tokens / ref[1]:4.2f} | {ref[1]:5d} |        1.00 | {'-':>11} | "
              f"{accuracy(loaded, ref[0], answers)}")
    for store in ("separate", "fused"):
        outs, nfe, wall, steps = run_engine(loaded, batch, args, store)
        tokens = sum(len(t) for t in outs)
        same = "-" if ref is None or args.top_k != 1 else "yes" if outs == ref[0] else "NO"
        ratio = f"{ref[2] / wall:11.2f}" if ref is not None else f"{'-':>11}"
        print(f"{store:>10} | {tokens / wall:5.0f} | {nfe / len(batch):7.1f} | "
              f"{tokens / nfe:4.2f} | {steps:5d} | {ratio} | {same:>11} | "
              f"{accuracy(loaded, outs, answers)}")


if __name__ == "__main__":
    main()
