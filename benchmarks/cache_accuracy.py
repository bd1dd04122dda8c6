"""Where the KV cache costs accuracy, and what a mid-block refresh buys back, at what speed.

Every held-out prompt of the task suite goes through the engine (offline `LLM`, greedy, the
reference schedule: one token per step) once per cache setting: no cache, Fast-dLLM's prefix and
dual caches (one refresh per block), the dual cache with `refresh_every` N (the block's K/V
recomputed every N steps as well), and both caches with `refresh_on: "content"` (a refresh after
each step that committed a token other than EOS). Two canvases locate the loss: one block of 16 (only the
prompt's keys, computed while the block was all masks, can be stale) and 32 positions in blocks
of 8 (the configs' default: stale across blocks and in the cached suffix too).

Cost: the tokens each request's forwards carried (the engine's `batched_tokens`; a model's
FLOPs grow with them on any hardware), and dual's tokens / these. Speed: the same requests' engine time in this process's CPU seconds (`time.process_time`: on a
shared machine the wall clock also counts other jobs), median of alternating rounds, as dual's
time / this setting's time (1.00x = as fast as the dual cache); only ratios mean something on a
shared CPU.

    python benchmarks/cache_accuracy.py --per-task 80 --refresh 8 --out benchmarks/results/cache_accuracy
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch                                                          # noqa: E402

from dfastllm_ray import LLM, SamplingParams                          # noqa: E402
from dfastllm_ray.models.loader import load_model                    # noqa: E402
from dfastllm_ray.sampling.params import MAX_REFRESH_EVERY            # noqa: E402
from dfastllm_ray.train import tasks                                  # noqa: E402
from dfastllm_ray.train.evaluate import prompt_ids                    # noqa: E402

CANVASES = {"16/16": (16, 16), "32/8": (32, 8)}      # name -> (max_tokens, block_length)


def settings(refresh: list[int], budgets: list[int]) -> dict[str, dict]:
    """name -> SamplingParams cache fields."""
    out = {"none": {"kv_cache_mode": "none"}, "prefix": {"kv_cache_mode": "prefix"},
           "dual": {"kv_cache_mode": "dual"}}
    for n in refresh:
        out[f"dual refresh/{n}"] = {"kv_cache_mode": "dual", "refresh_every": n}
    for mode in ("prefix", "dual"):
        out[f"{mode} content"] = {"kv_cache_mode": mode, "refresh_on": "content"}
        for b in budgets:                      # the engine's default budget is 2
            name = "no budget" if b >= MAX_REFRESH_EVERY else f"budget {b}"
            out[f"{mode} content, {name}"] = {"kv_cache_mode": mode, "refresh_on": "content",
                                              "refresh_budget": b}
    return out


def run(llm: LLM, prompts: list[list[int]], examples, max_tokens: int, block: int,
        knobs: dict) -> dict:
    params = SamplingParams(max_tokens=max_tokens, block_length=block, steps=max_tokens, **knobs)
    start, tokens0 = time.process_time(), llm.engine.metrics.batched_tokens
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    cpu = time.process_time() - start
    forwarded = (llm.engine.metrics.batched_tokens - tokens0) / len(outs)
    right: dict[str, list[bool]] = defaultdict(list)
    for ex, o in zip(examples, outs):
        right[ex.task].append(o.text == ex.answer)
    acc = {t: sum(v) / len(v) for t, v in right.items()}
    acc["mean"] = sum(acc.values()) / len(acc)
    return {"accuracy": acc, "nfe": sum(o.nfe for o in outs) / len(outs), "cpu_s": cpu,
            "tokens_forwarded": forwarded}


def measure(args) -> dict:
    loaded = load_model(args.model, dtype="float32", device="cpu")
    llm = LLM(loaded, dtype="float32", device="cpu", kv_cache_mode="dual",
              max_num_seqs=args.batch)
    examples = [e for e in tasks.heldout_set(args.per_task, args.seed)
                if e.task in args.tasks]
    prompts = [prompt_ids(loaded.tokenizer, e.prompt) for e in examples]
    table: dict[str, dict[str, dict]] = {}
    for canvas in args.canvases:
        gen, block = CANVASES[canvas]
        rows: dict[str, dict] = {}
        cpu: dict[str, list[float]] = defaultdict(list)
        for _ in range(args.rounds):                 # alternating rounds: same load for all
            for name, knobs in settings(args.refresh, args.budgets).items():
                r = run(llm, prompts, examples, gen, block, knobs)
                rows.setdefault(name, r)
                cpu[name].append(r["cpu_s"])
        for name, r in rows.items():
            r["cpu_s"] = statistics.median(cpu[name])
            r["speed_vs_dual"] = statistics.median(cpu["dual"]) / r["cpu_s"]
            r["tokens_vs_dual"] = rows["dual"]["tokens_forwarded"] / r["tokens_forwarded"]
        table[canvas] = rows
        print_canvas(canvas, rows)
    return table


def print_canvas(canvas: str, rows: dict[str, dict]) -> None:
    names = [t for t in tasks.TASKS if t in next(iter(rows.values()))["accuracy"]] + ["mean"]
    none = rows["none"]["accuracy"]["mean"]
    print(f"\n{canvas} (max_tokens/block_length), reference schedule, greedy")
    print("| cache | " + " | ".join(names) + " | vs none | NFE | tokens forwarded | "
          "dual's tokens / these | speed vs dual |")
    print("|---|" + "---|" * (len(names) + 5))
    for name, r in rows.items():
        cells = " | ".join(f"{100 * r['accuracy'][t]:.1f}" for t in names)
        print(f"| {name} | {cells} | {100 * (r['accuracy']['mean'] - none):+.1f} | "
              f"{r['nfe']:.1f} | {r['tokens_forwarded']:.0f} | {r['tokens_vs_dual']:.2f}x | "
              f"{r['speed_vs_dual']:.2f}x |", flush=True)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "dfastllm_ray" / "assets" / "tiny-llada"))
    p.add_argument("--per-task", type=int, default=80)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="*", default=list(tasks.TASKS))
    p.add_argument("--canvases", nargs="*", default=list(CANVASES), choices=list(CANVASES))
    p.add_argument("--refresh", type=int, nargs="*", default=[2, 4, 8])
    p.add_argument("--budgets", type=int, nargs="*", default=[MAX_REFRESH_EVERY],
                   help=f"refresh_budget values of more content rows ({MAX_REFRESH_EVERY}: "
                        "no budget)")
    p.add_argument("--rounds", type=int, default=2, help="alternating timing rounds")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default="")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    table = measure(args)
    if args.out:
        out = Path(args.out).with_suffix(".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {k: v for k, v in vars(args).items() if k not in ("out",)}
        model = Path(args.model).resolve()
        meta["model"] = str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else args.model
        out.write_text(json.dumps({"args": meta, "results": table}, indent=2) + "\n")
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
