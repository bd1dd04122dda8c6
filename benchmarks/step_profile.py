"""Per-step cost of the engine outside the model forward: host time, aten ops, syncs.

    python benchmarks/step_profile.py                       # this tree
    python benchmarks/step_profile.py --baseline 583994a    # ... and a commit, side by side
                                                            # (alternating rounds, --repeats)

For each batch size, B requests run in one engine (threshold 0.9, dual cache by default) and
every step is measured: its wall time minus the model forwards' (the *host* work a GPU cannot
overlap: schedule, input build, sampling, commit, bookkeeping), the aten ops dispatched outside
the forward and inside the sampler (views excluded: they launch nothing on a GPU), and the
data-dependent (syncing) ops. With `--baseline REF`
the same measurement runs on a `git worktree` of REF in a subprocess, so both engines are
measured by the same code in one run. Times are this process's CPU time
(`time.process_time`), not wall time: on a shared, loaded machine the wall clock also counts
the time other processes hold the cores, the process clock only the work done. Only ratios
mean something on a shared CPU.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = REPO / "tests" / "fixtures" / "reference" / "llada-tiny"


class Count(TorchDispatchMode):
    """Kernels (views excluded: they launch nothing on a GPU) and data-dependent ops; pausable
    around the forward. Self-contained, so the same counter measures a baseline tree."""

    def __init__(self):
        super().__init__()
        self.n = self.syncs = 0
        self.paused = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and not func.is_view:
            self.n += 1
            name = func.overloadpacket.__name__
            index = args[1] if len(args) > 1 and isinstance(args[1], (list, tuple)) else []
            bool_idx = name in ("index", "index_put_", "index_put") and any(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool for t in index)
            self.syncs += name in ("_local_scalar_dense", "nonzero", "masked_select") or bool_idx
        return func(*args, **(kwargs or {}))


def loaded_engine(model: str, batch: int, mode: str, params: dict):
    """An engine over `model` holding `batch` requests of 16 random prompt tokens."""
    from dfastllm_ray.engine.config import EngineConfig
    from dfastllm_ray.engine.engine import Engine
    from dfastllm_ray.models.loader import load_model
    from dfastllm_ray.sampling.params import SamplingParams
    loaded = load_model(model, dtype="float32", device="cpu")
    canvas = 16 + params["max_tokens"]
    eng = Engine(loaded, EngineConfig(kv_cache_mode=mode, max_num_seqs=batch, page_size=16,
                                      num_pages=batch * (canvas // 16 + 2),
                                      max_num_batched_tokens=batch * canvas))
    rng = random.Random(0)
    for i in range(batch):
        eng.add_request(str(i), [rng.randrange(1, loaded.spec.vocab_size - 8) for _ in range(16)],
                        SamplingParams(**params))
    return eng


def profile(model: str, batch: int, mode: str, steps: int, params: dict) -> dict:
    """Run `batch` requests; measure `steps` steps after 2 warm-up steps."""
    from dfastllm_ray.engine import sampler
    eng = loaded_engine(model, batch, mode, params)
    state = {"fwd": 0.0, "sample_ops": 0, "counter": None}
    model_fn, sample_fn = eng.runner.model, sampler.sample

    def timed_model(*a, **k):
        c = state["counter"]
        if c is not None:
            c.paused = True
        t0 = time.process_time()
        out = model_fn(*a, **k)
        state["fwd"] += time.process_time() - t0
        if c is not None:
            c.paused = False
        return out

    def counted_sample(*a, **k):
        c = state["counter"]
        before = c.n if c is not None else 0
        out = sample_fn(*a, **k)
        if c is not None:
            state["sample_ops"] += c.n - before
        return out

    eng.runner.model = timed_model
    sampler.sample = counted_sample
    for _ in range(2):
        eng.step()
    host, ops, sample_ops, syncs = [], [], [], []
    for _ in range(steps):
        if not eng.has_unfinished():
            break
        state.update(fwd=0.0, sample_ops=0, counter=Count())
        t0 = time.process_time()
        with state["counter"]:
            eng.step()
        host.append((time.process_time() - t0 - state["fwd"]) * 1e3)
        ops.append(state["counter"].n)
        sample_ops.append(state["sample_ops"])
        syncs.append(state["counter"].syncs)
        state["counter"] = None
    # timing without the dispatch mode (its own overhead would inflate host time)
    eng2_host = _host_ms_plain(model, batch, mode, steps, params)
    return {"batch": batch, "steps": len(host), "host_ms": statistics.median(eng2_host),
            "ops_outside_forward": statistics.median(ops),
            "sampling_ops": statistics.median(sample_ops), "syncs_per_step": max(syncs)}


def _host_ms_plain(model: str, batch: int, mode: str, steps: int, params: dict) -> list[float]:
    """Non-forward ms per step, measured with no op counting."""
    eng = loaded_engine(model, batch, mode, params)
    fwd = [0.0]
    model_fn = eng.runner.model

    def timed(*a, **k):
        t0 = time.process_time()
        out = model_fn(*a, **k)
        fwd[0] += time.process_time() - t0
        return out
    eng.runner.model = timed
    for _ in range(2):
        eng.step()
    out = []
    for _ in range(steps):
        if not eng.has_unfinished():
            break
        fwd[0] = 0.0
        t0 = time.process_time()
        eng.step()
        out.append((time.process_time() - t0 - fwd[0]) * 1e3)
    return out


def run_all(args) -> list[dict]:
    torch.set_num_threads(1)
    params = {"max_tokens": args.max_tokens, "block_length": args.block_length,
              "threshold": args.threshold}
    return [profile(args.model, b, args.mode, args.steps, params) for b in args.batch]


def run_baseline(args, ref: str) -> list[dict]:
    """The same measurement on a worktree of `ref`, in a subprocess importing that tree."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "baseline"
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), ref],
                       check=True, capture_output=True)
        try:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--model", args.model,
                   "--mode", args.mode, "--steps", str(args.steps), "--batch",
                   ",".join(map(str, args.batch)), "--max-tokens", str(args.max_tokens),
                   "--block-length", str(args.block_length), "--threshold", str(args.threshold)]
            env = {**os.environ, "PYTHONPATH": str(tree)}
            out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=tree)
            return json.loads(out.stdout.strip().splitlines()[-1])
        finally:
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)],
                           capture_output=True)


def interleaved(args) -> dict[str, list[dict]]:
    """`--repeats` rounds, this tree and the baseline alternating (the load of a shared machine
    drifts: alternating exposes both to it alike); per engine and batch the median host time."""
    runs: dict[str, list[list[dict]]] = {"this tree": []}
    for _ in range(args.repeats):
        runs["this tree"].append(run_all(args))
        if args.baseline:
            runs.setdefault(args.baseline, []).append(run_baseline(args, args.baseline))
    out = {}
    for name, rounds in runs.items():
        merged = []
        for i, first in enumerate(rounds[0]):
            merged.append({**first, "host_ms": statistics.median(r[i]["host_ms"] for r in rounds)})
        out[name] = merged
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--mode", default="dual", choices=("none", "prefix", "dual"))
    ap.add_argument("--batch", default="1,16,64", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--baseline", default=None, help="a git ref to measure side by side")
    ap.add_argument("--repeats", type=int, default=3, help="alternating rounds (median)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(run_all(args)))
        return
    rows = interleaved(args)
    print(f"mode={args.mode} threshold={args.threshold} max_tokens={args.max_tokens} "
          f"block={args.block_length} model={Path(args.model).name} (1 torch thread, CPU, "
          f"median of {args.repeats} alternating rounds)")
    print(f"{'engine':>12} {'batch':>5} | {'host ms/step':>12} | {'ops outside fwd':>15} | "
          f"{'sampling ops':>12} | {'syncs/step':>10}")
    for name, results in rows.items():
        for r in results:
            print(f"{name:>12} {r['batch']:>5} | {r['host_ms']:>12.3f} | "
                  f"{r['ops_outside_forward']:>15.0f} | {r['sampling_ops']:>12.0f} | "
                  f"{r['syncs_per_step']:>10}")
    if args.baseline:
        for new, old in zip(rows["this tree"], rows[args.baseline]):
            print(f"batch {new['batch']:>3}: host time {old['host_ms'] / new['host_ms']:.1f}x lower, "
                  f"ops outside the forward {old['ops_outside_forward'] / max(new['ops_outside_forward'], 1):.1f}x fewer")


if __name__ == "__main__":
    main()
