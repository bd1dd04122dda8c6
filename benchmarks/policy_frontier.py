"""Accuracy against tokens per forward for every decoding policy, with the Pareto frontier marked.

Each setting decodes the held-out prompts of the task suite with the plain reference loop of its
policy (`dfastllm_ray.sampling.policy_generate`: full-canvas forwards, no KV cache, greedy),
the same batched policy functions the engine runs. Prints a markdown table (frontier rows marked
`*`), writes JSON, and names the settings that satisfy the `speed` dial's rules:
`balanced` = a setting with 4 <= TPF < 8 within 1 point of the reference, `fast` = one with
TPF >= 8 within 2 points; schedule-fixed TPF first, then the best worst-case margin over the
measured models (`--also`), then the faster (`dial`).

    python benchmarks/policy_frontier.py --per-task 80 --also OLD_CHECKPOINT \
        --out benchmarks/results/policy_frontier
    python benchmarks/policy_frontier.py --engine-cache dual --only ... --out ...   # the engine

Definitions (as benchmarks/quality.py): accuracy = the reply cut at EOT/EOS equals the answer;
NFE = forwards per request (WINO's forward also carries the block's shadow copy); TPF = decoded
generation positions / NFE (early exit: blocks after the one holding EOT/EOS are not decoded).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch                                                          # noqa: E402

from dfastllm_ray.models.loader import load_model                    # noqa: E402
from dfastllm_ray.sampling.params import SamplingParams               # noqa: E402
from dfastllm_ray.sampling.policy_generate import policy_generate     # noqa: E402
from dfastllm_ray.train import tasks                                  # noqa: E402
from dfastllm_ray.train.evaluate import prompt_ids, reply_text        # noqa: E402
from benchmarks.policy_settings import settings                      # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "dfastllm_ray" / "assets" / "tiny-llada"))
    p.add_argument("--per-task", type=int, default=80, help="held-out examples per task")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=16,
                   help="16: the checkpoint's max_new_tokens, so one block of 16 is a request "
                        "with no knob")
    p.add_argument("--block-length", type=int, default=16)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--only", nargs="*", help="setting names to run (default: all)")
    p.add_argument("--engine-cache", choices=["none", "prefix", "dual"],
                   help="run through the engine (offline LLM API) with this KV-cache mode "
                        "instead of the reference loop; settings the engine refuses are skipped")
    p.add_argument("--also", nargs="*", default=[],
                   help="more checkpoints measured with the same settings: the dial's picks "
                        "must then meet their rule on every model (the best worst-case margin)")
    p.add_argument("--out", default="benchmarks/results/policy_frontier")
    return p.parse_args(argv)


def run(loaded, examples, knobs: dict, args) -> dict:
    params = SamplingParams(max_tokens=args.max_tokens, block_length=args.block_length,
                            **{"steps": args.max_tokens, **knobs})
    groups: dict[int, list] = defaultdict(list)
    for ex in examples:
        ids = prompt_ids(loaded.tokenizer, ex.prompt)
        groups[len(ids)].append((ex, ids))
    right: dict[str, list[bool]] = defaultdict(list)
    nfe = decoded = 0
    stop = set(loaded.spec.stop_token_ids)
    start = time.perf_counter()
    for group in groups.values():
        for i in range(0, len(group), args.batch):
            chunk = group[i:i + args.batch]
            prompt = torch.tensor([ids for _, ids in chunk])
            r = policy_generate(loaded.model, prompt, params, spec=loaded.spec)
            nfe, decoded = nfe + sum(r.nfe), decoded + sum(r.decoded)
            for (ex, _), row in zip(chunk, r.x[:, prompt.shape[1]:].tolist()):
                right[ex.task].append(reply_text(loaded.tokenizer, row, stop) == ex.answer)
    acc = {t: sum(v) / len(v) for t, v in right.items()}
    acc["mean"] = sum(acc.values()) / len(acc)
    return {"knobs": knobs, "accuracy": acc, "nfe": nfe / len(examples), "tpf": decoded / nfe,
            "seconds": time.perf_counter() - start}


def run_engine(llm, loaded, examples, knobs: dict, args) -> dict:
    """The same setting through the engine: accuracy of the returned text, TPF as quality.py
    (blocks skipped by early exit are not decoded)."""
    params = SamplingParams(max_tokens=args.max_tokens, block_length=args.block_length,
                            **{"steps": args.max_tokens, **knobs})
    prompts = [prompt_ids(loaded.tokenizer, ex.prompt) for ex in examples]
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    right: dict[str, list[bool]] = defaultdict(list)
    for ex, o in zip(examples, outs):
        right[ex.task].append(o.text == ex.answer)
    acc = {t: sum(v) / len(v) for t, v in right.items()}
    acc["mean"] = sum(acc.values()) / len(acc)
    spb = params.steps // (args.max_tokens // args.block_length)
    nfe = sum(o.nfe for o in outs)
    decoded = sum(args.max_tokens - o.nfe_saved // spb * args.block_length for o in outs)
    return {"knobs": knobs, "accuracy": acc, "nfe": nfe / len(outs), "tpf": decoded / nfe,
            "seconds": time.perf_counter() - start}


def frontier(results: dict[str, dict]) -> set[str]:
    """Names of the settings no other setting beats on both accuracy and TPF."""
    def beats(a, b):
        return (a["accuracy"]["mean"] >= b["accuracy"]["mean"] and a["tpf"] >= b["tpf"]
                and (a["accuracy"]["mean"] > b["accuracy"]["mean"] or a["tpf"] > b["tpf"]))
    return {n for n, r in results.items() if not any(beats(o, r) for o in results.values())}


SCHEDULED_KNOBS = {"steps", "pc_lambda", "dilated"}   # settings whose TPF the schedule fixes


def dial(results: dict[str, dict], others: list[dict[str, dict]] = ()) -> dict[str, str | None]:
    """The speed dial's picks: among the settings that meet the rule (TPF bar, accuracy within
    the points of the reference) on every measured model, first those whose TPF the schedule
    fixes (fixed top-k, PC-Sampler, DUS: tokens per step = max_tokens / steps on any model, where
    a confidence rule's TPF and accuracy move with the model's calibration: issue 12's unseen
    model loses 9 points with threshold 0.9 and none with 4 tokens/step), then the best
    worst-case margin over the models, then the best mean margin, then the faster; None when
    none meets the rule."""
    models = [results, *others]

    def margins(name: str) -> list[float]:   # accuracy - reference on each model
        return [m[name]["accuracy"]["mean"] - m["reference"]["accuracy"]["mean"]
                for m in models if name in m]

    def pick(min_tpf, max_tpf, points):
        best = None                          # ties: the first in `settings` order (the simplest)
        for n, r in results.items():
            tpf = min(m[n]["tpf"] for m in models if n in m)
            got = margins(n)
            key = (set(r["knobs"]) <= SCHEDULED_KNOBS, round(min(got), 9),
                   round(sum(got) / len(got), 9), tpf)
            if min_tpf <= tpf < max_tpf and key[1] >= -points / 100 - 1e-9 and \
                    (best is None or key > best[0]):
                best = (key, n)
        return best[1] if best else None
    # balanced stays below fast's bar: fewer tokens per step is the safer side on a model the
    # dial was not measured on (more rounds for tokens that depend on each other)
    return {"exact": "reference", "balanced": pick(4, 8, 1), "fast": pick(8, float("inf"), 2)}


def table(results: dict[str, dict]) -> str:
    names = [t for t in tasks.TASKS if t in next(iter(results.values()))["accuracy"]] + ["mean"]
    front = frontier(results)
    lines = ["| | setting | " + " | ".join(names) + " | NFE | TPF |",
             "|---|---|" + "---|" * (len(names) + 2)]
    for n, r in sorted(results.items(), key=lambda kv: kv[1]["tpf"]):
        cells = " | ".join(f"{100 * r['accuracy'][t]:.1f}" for t in names)
        lines.append(f"| {'*' if n in front else ''} | {n} | {cells} | {r['nfe']:.2f} | "
                     f"{r['tpf']:.2f} |")
    return "\n".join(lines)


def measure(model_path: str, args) -> dict[str, dict]:
    """Every setting on one checkpoint -> {setting: result}."""
    loaded = load_model(model_path, dtype="float32", device="cpu")
    examples = tasks.heldout_set(args.per_task, args.seed)
    llm = None
    if args.engine_cache:
        from dfastllm_ray import LLM
        llm = LLM(loaded, dtype="float32", device="cpu", kv_cache_mode=args.engine_cache,
                  max_num_seqs=args.batch)
    results = {}
    for name, knobs in settings(args.max_tokens).items():
        if args.only and name not in args.only and name != "reference":
            continue
        try:
            results[name] = (run_engine(llm, loaded, examples, knobs, args) if llm else
                             run(loaded, examples, knobs, args))
        except ValueError as exc:                  # the engine refuses the setting
            print(f"{name}: skipped ({exc})", flush=True)
            continue
        r = results[name]
        print(f"{name}: mean {100 * r['accuracy']['mean']:.1f}%  NFE {r['nfe']:.2f}  "
              f"TPF {r['tpf']:.2f}  ({r['seconds']:.1f} s)", flush=True)
    return results


def rel(path: str) -> str:
    model = Path(path).resolve()
    return str(model.relative_to(ROOT)) if model.is_relative_to(ROOT) else path


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    results = measure(args.model, args)
    print("\n" + table(results) + "\n\n* = on the Pareto frontier (accuracy vs TPF)")
    also = {}
    for path in args.also:
        print(f"\n== {rel(path)}")
        also[rel(path)] = measure(path, args)
        print("\n" + table(also[rel(path)]))
    picks = dial(results, list(also.values()))
    print("speed dial picks:", picks)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v for k, v in vars(args).items() if k not in ("out", "model", "also")}
    meta["model"], meta["also"] = rel(args.model), [rel(a) for a in args.also]
    meta["examples"] = len(tasks.heldout_set(args.per_task, args.seed))
    out.with_suffix(".json").write_text(json.dumps(
        {"args": meta, "results": results, "frontier": sorted(frontier(results)),
         "dial": picks, "also": also}, indent=2) + "\n")
    print(f"wrote {out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
