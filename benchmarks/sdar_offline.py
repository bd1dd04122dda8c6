"""Block diffusion (SDAR) offline: the official loop one request at a time against the engine.

    python benchmarks/sdar_offline.py                                  # the fixture's tiny SDAR
    python benchmarks/sdar_offline.py --model dfastllm_ray/assets/tiny-sdar --batch 32 --gen-len 64
    python benchmarks/sdar_offline.py --random-weights sdar-4b --device cuda --batch 64 \
        --prompt-len 512 --gen-len 256 --skip-reference                # a GPU, no download

Paths, over the same prompts (random ids of `--prompt-len`, or the task suite's prompts when the
model is the shipped tiny-sdar): "reference" = `sampling.sdar_generate.block_diffusion_generate`
(the official loop, batch 1, requests one after another), then the engine with
`block_store="separate"` (the official forward order) and `"fused"` (each block's K/V stored by
the next block's first forward), all requests submitted at once. Decoding is SDAR's greedy form
(`top_k=1`), so every path must return the same tokens: the script checks it and says so. The
engine stops a request after the block holding EOS; the reference gets the same stop ids
(`stopping_criteria_idx`), so both stop at the same block.
Printed per path: tokens/s, NFE per request, tokens per forward (TPF, measured), engine steps,
and the ratio to the reference. Times are wall clock of one run on this machine: compare the
ratios of one run, not absolute numbers across machines.
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


def prompts(spec, n: int, length: int, seed: int) -> list[list[int]]:
    """Random prompt ids below the special tokens (never the mask)."""
    g = torch.Generator().manual_seed(seed)
    top = min(t for t in (spec.mask_token_id, spec.eos_token_id, spec.vocab_size) if t is not None)
    return [torch.randint(0, top, (length,), generator=g).tolist() for _ in range(n)]


def run_reference(loaded, batch: list[list[int]], args) -> tuple[list[list[int]], int, float]:
    stops = tuple(loaded.spec.stop_token_ids)        # the engine's early exit, as official stop ids
    p = BlockDiffusionParams(gen_length=args.gen_len, block_length=args.block_len,
                             denoising_steps=args.steps, top_k=1, remasking_strategy=args.strategy,
                             stopping_criteria_idx=stops or None, overwrite_committed=False)
    outs, nfe, t0 = [], 0, time.perf_counter()
    for ids in tqdm(batch, desc="reference", unit="req", disable=args.no_progress):
        out = block_diffusion_generate(loaded.model, torch.tensor([ids]), p, loaded.spec)
        outs.append(until_stop(out.x[0, len(ids):len(ids) + args.gen_len].tolist(), stops))
        nfe += out.nfe
    return outs, nfe, time.perf_counter() - t0


def until_stop(tokens: list[int], stops) -> list[int]:
    """The tokens before the first stop id (what the engine returns)."""
    cut = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokens[:cut]


def run_engine(loaded, batch: list[list[int]], args, store: str):
    eng = Engine(loaded, EngineConfig(max_num_seqs=len(batch), block_store=store,
                                      exact_ties=True, max_model_len=args.max_len))
    t0 = time.perf_counter()
    for i, ids in enumerate(batch):
        blocks = -(-(len(ids) + args.gen_len) // args.block_len) - len(ids) // args.block_len
        eng.add_request(str(i), ids, SamplingParams(
            max_tokens=args.gen_len, block_length=args.block_len, steps=args.steps * blocks,
            top_k=1, temperature=1.0, remasking_strategy=args.strategy))
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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=str(FIXTURE))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--prompt-len", type=int, default=13)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--block-len", type=int, default=4)
    ap.add_argument("--steps", type=int, default=4, help="denoising steps per block")
    ap.add_argument("--strategy", default="low_confidence_dynamic")
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-weights", default=None, help="a published shape (models/shapes.py, "
                    "e.g. sdar-4b) with random weights instead of --model")
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
    batch = prompts(loaded.spec, args.batch, args.prompt_len, args.seed)
    ref = None if args.skip_reference else run_reference(loaded, batch, args)
    print(f"sdar offline: {loaded.name}, batch {args.batch}, prompt {args.prompt_len}, "
          f"gen {args.gen_len}, block {args.block_len}, {args.steps} steps/block, "
          f"{args.strategy}, top_k=1, {args.threads} torch thread(s), {loaded.device}, "
          f"{loaded.dtype}")
    print(f"{'path':>10} | tok/s | NFE/req | TPF  | steps | x reference | same tokens")
    if ref is not None:
        tokens = sum(len(t) for t in ref[0])    # returned tokens (an early stop returns fewer)
        print(f"{'reference':>10} | {tokens / ref[2]:5.0f} | {ref[1] / args.batch:7.1f} | "
              f"{tokens / ref[1]:4.2f} | {ref[1]:5d} |        1.00 | -")
    for store in ("separate", "fused"):
        outs, nfe, wall, steps = run_engine(loaded, batch, args, store)
        tokens = sum(len(t) for t in outs)
        same = "-" if ref is None else "yes" if outs == ref[0] else "NO"
        ratio = f"{ref[2] / wall:11.2f}" if ref is not None else f"{'-':>11}"
        print(f"{store:>10} | {tokens / wall:5.0f} | {nfe / args.batch:7.1f} | "
              f"{tokens / nfe:4.2f} | {steps:5d} | {ratio} | {same}")


if __name__ == "__main__":
    main()
