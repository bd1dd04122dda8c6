"""Offline throughput of the reference loop and of each engine mode, on one machine.

    python benchmarks/offline.py --model tests/fixtures/reference/llada-tiny --batch 16
    python benchmarks/offline.py --random-weights llada-8b --prompt-len 512 --gen-len 256 \
        --block-len 32 --batch 64 --scripted-tpf 4 --modes dual --skip-reference --json out.json

Per path (the reference loop, then each `--modes` cache mode) one table line: tokens/s, NFE per
request, TPF, ms per step, time to first block and request latency (p50 / p90 / p99 over the
requests, all submitted at once), peak memory; then per kind of step (refresh, cached, full, and
mixed steps as "refresh+cached"; from the step's `SchedulerOutput`): steps, ms per step split
into phases (benchmarks/step_probe.py: schedule | inputs | forward | sample | commit | copy |
update | other) and kernels / syncs per step (engine/op_count.py, views excluded, counted in the
warm-up, which runs the timed shapes: the same requests for one block and more, then aborted).

Definitions: tokens = generated positions returned (batch x gen_len, or fewer after an early
exit); tokens/s = tokens / wall time of the whole run; NFE = model forwards per request; TPF =
tokens / NFE, *measured*; ms/step = wall time / engine steps (the reference: / its forwards);
time to first block = submission to the request's first output (its first block closed);
peak = `torch.cuda.max_memory_allocated` during the mode (weights + KV pool + activations; reset
between modes); on CPU "n/a". On CUDA the phases are host times (kernels queue asynchronously:
the device's time lands in "copy", where the host waits) unless `--phase-sync`.
How many tokens a step commits:
- `--tokens-per-step N`: the fixed schedule, steps = gen_len / N (a quota, not a measurement);
- `--threshold T`: the confidence-threshold policy (random weights: about one token per step);
- `--scripted-tpf K`: the threshold policy (T = 0.9 unless given, steps = gen_len / K) over
  `ScriptedTPF` (benchmarks/scripted_model.py), a wrapper whose logits put a confident peak on
  the first K masked positions of each window, so the real threshold path commits K tokens per
  forward (Dream's cached modes: 1 at a block's refresh, Fast-dLLM's rule, then K).
`--random-weights llada-8b | dream-7b` builds the published shape with random weights (no
download).
Hybrid diffusion-AR decoding (docs/hybrid.md): `--decoding diffusion apd speculative` runs each
listed decoding per cache mode (rows "dual", "dual/apd", "dual/speculative") with a verifier
from `--verifier DIR` or `--verifier-random-weights qwen2.5-0.5b`; hybrid rows add the verifier's
forwards per request and per token (NFE and TPF there count the drafter's forwards). Random
weights accept about one draft token per step, so hybrid tokens/s there is a step-cost floor.

    python benchmarks/offline.py --random-weights dream-7b --verifier-random-weights qwen2.5-0.5b \
        --decoding diffusion apd speculative --modes dual --batch 32 --skip-reference "reference" is `sampling.llada_generate` variant "llada" (ML-GSAI `generate`: no
cache, the whole batch in one call), one token per step; LLaDA models only.
"""
from __future__ import annotations

import argparse
import itertools
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.scripted_model import ScriptedTPF  # noqa: E402
from benchmarks.offline_report import (header_lines, kind_lines, main_line,  # noqa: E402
                                       merge_kinds, peak_gb, percentiles, reset_peak, sync,
                                       weighted)
from benchmarks.step_probe import StepProbe  # noqa: E402
from dfastllm_ray.engine.config import EngineConfig  # noqa: E402
from dfastllm_ray.engine.engine import Engine  # noqa: E402
from dfastllm_ray.models.loader import LoadedModel, load_model  # noqa: E402
from dfastllm_ray.models.random_weights import random_model  # noqa: E402
from dfastllm_ray.models.shapes import KNOWN_SHAPES  # noqa: E402
from dfastllm_ray.sampling.params import DECODINGS  # noqa: E402
from dfastllm_ray.sampling.llada_generate import llada_generate as reference_generate  # noqa: E402
from dfastllm_ray.sampling.params import SamplingParams  # noqa: E402

DEFAULT_MODEL = ROOT / "dfastllm_ray" / "assets" / "tiny-llada"
DRAFTER_SHAPES = sorted(k for k, v in KNOWN_SHAPES.items() if not v.causal)
VERIFIER_SHAPES = sorted(k for k, v in KNOWN_SHAPES.items() if v.causal)
SCRIPTED_THRESHOLD = 0.9


# ---- measurements -------------------------------------------------------------------------------
def result_row(path: str, args, tokens: int, seconds: float, nfe: float, steps: int,
               peak: float | None, **extra) -> dict:
    """Every field of a result (JSON); engine-only ones None on the reference line."""
    row = {"path": path, "batch": args.batch, "prompt_len": args.prompt_len,
           "gen_len": args.gen_len, "block_len": args.block_len, "tpf_source": tpf_source(args),
           "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
           "nfe": nfe, "tpf": tokens / args.batch / max(nfe, 1e-9), "steps": steps,
           "ms_per_step": 1e3 * seconds / max(steps, 1), "peak_gb": peak,
           "ttfb_ms": None, "latency_ms": None, "phases_ms_per_step": None,
           "ops_per_step": None, "by_kind": None}
    row.update(extra)
    return row


def tpf_source(args) -> str:
    if args.scripted_tpf:
        return f"scripted k={args.scripted_tpf}, threshold {threshold_of(args)}"
    if args.threshold is not None:
        return f"threshold {args.threshold}"
    return f"fixed quota {args.tokens_per_step}/step"


def threshold_of(args) -> float | None:
    if args.scripted_tpf and args.threshold is None:
        return SCRIPTED_THRESHOLD
    return args.threshold


# ---- the runs -----------------------------------------------------------------------------------
def prompts_for(args, loaded: LoadedModel) -> list[list[int]]:
    rng = torch.Generator().manual_seed(args.seed)
    high = min(loaded.spec.vocab_size, loaded.spec.mask_token_id)
    ids = torch.randint(0, high, (args.batch, args.prompt_len), generator=rng)
    if any(d != "diffusion" for d in args.decoding):   # APD stops at an EOS anywhere in the canvas
        stops = torch.tensor(loaded.spec.stop_token_ids or [-1])
        ids = torch.where(torch.isin(ids, stops), 0, ids)
    return ids.tolist()


def params_for(args, decoding: str = "diffusion") -> SamplingParams:
    if decoding != "diffusion":
        return hybrid_params(args, decoding)
    gen, thr = args.gen_len, threshold_of(args)
    if args.scripted_tpf:       # a schedule of K per step, which the scripted model fills exactly
        steps = max(gen // args.scripted_tpf, gen // args.block_len)  # (Dream no-cache: its cap)
    elif thr is not None:       # one step per position at most: the block ends when its masks do
        steps = gen
    else:
        steps = max(gen // args.tokens_per_step, gen // args.block_len)
    return SamplingParams(max_tokens=gen, block_length=args.block_len, steps=steps,
                          threshold=thr, early_exit=not args.no_early_exit)


def hybrid_params(args, decoding: str) -> SamplingParams:
    """APD (R, W, M) or speculative (draft_tokens) at temperature 0 over the whole generation."""
    apd = decoding == "apd"
    return SamplingParams(max_tokens=args.gen_len, decoding=decoding,
                          apd_mixture_weight=args.apd_mixture_weight if apd else None,
                          kv_window=args.kv_window if apd else None,
                          max_lookahead=args.max_lookahead if apd else None,
                          draft_tokens=None if apd else args.draft_tokens)


def hybrid_source(args, decoding: str) -> str:
    if decoding == "apd":
        return (f"apd R={args.apd_mixture_weight} W={args.kv_window} M={args.max_lookahead}")
    return f"speculative draft_tokens={args.draft_tokens}"


def run_reference(loaded: LoadedModel, prompts, args) -> dict:
    """ML-GSAI `generate` semantics, one token per step, the whole batch in one call."""
    params = SamplingParams(max_tokens=args.gen_len, block_length=args.block_len,
                            steps=args.gen_len)
    x = torch.tensor(prompts, device=loaded.device)
    reset_peak(loaded.device)
    sync(loaded.device)
    t0 = time.perf_counter()
    _, nfe = reference_generate(loaded.model, x, params, spec=loaded.spec, variant="llada")
    sync(loaded.device)
    seconds = time.perf_counter() - t0
    return result_row("reference", args, len(prompts) * args.gen_len, seconds, nfe, nfe,
                      peak_gb(loaded.device), tpf_source="fixed quota 1/step")


def build_engine(loaded: LoadedModel, mode: str, args, verifier: LoadedModel | None = None
                 ) -> Engine:
    canvas = args.prompt_len + args.gen_len
    pages = None if args.kv_cache_gb else args.batch * -(-canvas // args.page_size)  # just enough
    cfg = EngineConfig(kv_cache_mode=mode, max_num_seqs=max(args.batch, 1),
                       max_num_batched_tokens=max(args.batch, 1) * canvas,
                       page_size=args.page_size, compile=args.compile,
                       kv_cache_memory_gb=args.kv_cache_gb, num_pages=pages,
                       cuda_graphs=args.cuda_graphs, attention_backend=args.attention_backend,
                       refresh=args.refresh, default_speed=None)
    return Engine(loaded, cfg, verifier=verifier)


def warm_up(eng: Engine, prompts, args, decoding: str = "diffusion") -> dict:
    """The timed requests for `--warmup-steps` steps (default: one block and one more step;
    hybrid: 3 steps, a first one with the verifier's prefill and two drafts), op-counted, then
    aborted: every shape the timed run uses is seen once."""
    params = params_for(args, decoding)
    per_block = params.steps * args.block_len // args.gen_len if params.steps else 2
    n = args.warmup_steps if args.warmup_steps is not None else per_block + 1
    probe = StepProbe(eng, count_ops=not (args.no_count_ops or args.compile))  # no mode in graphs
    for i, ids in enumerate(prompts):
        eng.add_request(f"warm{i}", ids, params)
    for _ in range(n):
        if not eng.has_unfinished():
            break
        probe.step()
    for i in range(len(prompts)):
        eng.abort(f"warm{i}")
    probe.close()
    sync(eng.device)
    return probe.summary()


def run_engine(loaded: LoadedModel, mode: str, prompts, args, decoding: str = "diffusion",
               verifier: LoadedModel | None = None) -> dict:
    reset_peak(loaded.device)
    eng = build_engine(loaded, mode, args, verifier)
    warm = warm_up(eng, prompts, args, decoding)
    probe = StepProbe(eng, sync=args.phase_sync)
    params, first, done, finals = params_for(args, decoding), {}, {}, []
    sync(loaded.device)
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        eng.add_request(f"b{i}", ids, params)
    label = mode if decoding == "diffusion" else f"{mode}/{decoding}"
    with tqdm(total=len(prompts), desc=label, unit="req", disable=args.no_progress,
              leave=False) as bar:
        while eng.has_unfinished():
            outs = probe.step()
            now = (time.perf_counter() - t0) * 1e3
            for out in outs:
                first.setdefault(out.request_id, now)
                if out.finished:
                    done[out.request_id] = now
                    finals.append(out)
                    bar.update(1)
    sync(loaded.device)
    seconds = time.perf_counter() - t0
    probe.close()
    by_kind = merge_kinds(probe.summary(), warm)
    tokens = sum(len(o.token_ids) for o in finals)
    row = result_row(label, args, tokens, seconds,
                     sum(o.nfe for o in finals) / len(finals), sum(probe.steps.values()),
                     peak_gb(loaded.device), ttfb_ms=percentiles(list(first.values())),
                     latency_ms=percentiles(list(done.values())), by_kind=by_kind,
                     phases_ms_per_step=weighted(by_kind, "phases_ms"),
                     ops_per_step=weighted(warm, "ops_per_step"),
                     **hybrid_counts(finals, tokens, args, decoding))
    del eng, probe
    return row


def hybrid_counts(finals, tokens: int, args, decoding: str) -> dict:
    """Hybrid rows' extra fields: the verifier's forwards per request and per returned token
    (diffusion rows keep the plain row's fields)."""
    if decoding == "diffusion":
        return {}
    vf = sum(o.verifier_forwards for o in finals)
    return {"decoding": decoding, "verifier_forwards": vf / len(finals),
            "verifier_forwards_per_token": vf / max(tokens, 1),
            "tpf_source": hybrid_source(args, decoding)}


def header(loaded: LoadedModel, args) -> dict:
    dev = loaded.device
    hw = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    try:
        commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=ROOT, text=True,
                                capture_output=True).stdout.strip()
    except OSError:
        commit = "?"
    return {"model": loaded.name, "dtype": str(loaded.dtype).replace("torch.", ""),
            "device": dev.type, "hardware": hw, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "commit": commit,
            "command": "python benchmarks/offline.py " + " ".join(sys.argv[1:]),
            "prompt_len": args.prompt_len, "gen_len": args.gen_len, "block_len": args.block_len,
            "batch": args.batch, "tpf_source": tpf_source(args), "phase_sync": args.phase_sync}


# ---- command line -------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--random-weights", choices=DRAFTER_SHAPES, default=None,
                    help="a published shape with random weights instead of --model")
    ap.add_argument("--decoding", nargs="+", default=["diffusion"], choices=DECODINGS,
                    help="decodings to run per cache mode (apd / speculative need a verifier)")
    ap.add_argument("--verifier", default=None, help="causal verifier folder (same tokenizer)")
    ap.add_argument("--verifier-random-weights", choices=VERIFIER_SHAPES, default=None,
                    help="a published causal shape with random weights as the verifier")
    ap.add_argument("--apd-mixture-weight", type=float, default=0.7, help="APD R")
    ap.add_argument("--kv-window", type=int, default=None, help="APD W (drafter cache only)")
    ap.add_argument("--max-lookahead", type=int, default=None, help="APD M (default: the canvas)")
    ap.add_argument("--draft-tokens", type=int, default=4, help="speculative k (adaptive)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--block-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="concurrent requests")
    ap.add_argument("--tokens-per-step", type=int, default=1,
                    help="fixed schedule: steps = gen / this (a quota)")
    ap.add_argument("--threshold", type=float, default=None, help="use the threshold policy")
    ap.add_argument("--scripted-tpf", type=int, default=None, metavar="K",
                    help="ScriptedTPF model: threshold commits K tokens per forward (measured)")
    ap.add_argument("--modes", nargs="+", default=["none", "prefix", "dual"],
                    choices=["none", "prefix", "dual"])
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--no-early-exit", action="store_true",
                    help="decode every block even after EOS")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--kv-cache-gb", type=float, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward (CUDA)")
    ap.add_argument("--cuda-graphs", action="store_true",
                    help="cached windows on static buffers, replayed as CUDA graphs")
    ap.add_argument("--attention-backend", default="sdpa", choices=("sdpa", "flex"),
                    help="flex: FlexAttention over the pages in place (no gather)")
    ap.add_argument("--refresh", default="full", choices=("full", "incremental"),
                    help="what a block's refresh recomputes")
    ap.add_argument("--warmup-steps", type=int, default=None,
                    help="warm-up steps per mode (default: one block's steps + 1)")
    ap.add_argument("--no-count-ops", action="store_true",
                    help="skip the op counts (warm-up; always skipped with --compile)")
    ap.add_argument("--phase-sync", action="store_true",
                    help="CUDA: synchronise at every phase boundary (device time per phase)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    ap.add_argument("--json", default=None, metavar="PATH", help="write header + results here")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's)")
    return check_args(ap, ap.parse_args(argv))


def check_args(ap: argparse.ArgumentParser, a: argparse.Namespace) -> argparse.Namespace:
    for name in ("prompt_len", "gen_len", "block_len", "batch", "tokens_per_step", "page_size"):
        if getattr(a, name) < 1:
            flag = "--" + name.replace("_", "-")
            ap.error(f"{flag} {getattr(a, name)} is invalid: use an integer >= 1")
    if a.gen_len % a.block_len:
        ap.error(f"--block-len {a.block_len} must divide --gen-len {a.gen_len}")
    if a.scripted_tpf is not None and a.scripted_tpf < 1:
        ap.error(f"--scripted-tpf {a.scripted_tpf} is invalid: use an integer >= 1")
    hybrid = [d for d in a.decoding if d != "diffusion"]
    if hybrid and not (a.verifier or a.verifier_random_weights):
        ap.error(f"--decoding {hybrid[0]} needs a verifier: pass --verifier DIR or "
                 "--verifier-random-weights qwen2.5-0.5b")
    if a.verifier and a.verifier_random_weights:
        ap.error("--verifier and --verifier-random-weights exclude each other: pass one")
    if hybrid and a.scripted_tpf:
        ap.error("--scripted-tpf scripts diffusion steps only: leave it out with --decoding "
                 f"{hybrid[0]}")
    if a.scripted_tpf and a.tokens_per_step != 1:
        ap.error("--scripted-tpf and --tokens-per-step exclude each other: the scripted model "
                 "sets the tokens per step through the threshold policy")
    return a


def load_verifier(args, loaded: LoadedModel) -> LoadedModel | None:
    """The verifier, on the model's device and in its dtype (as `LLM(verifier=...)` loads it)."""
    if args.verifier_random_weights:
        return random_model(args.verifier_random_weights, str(loaded.device), loaded.dtype,
                            seed=args.seed + 1)
    if args.verifier:
        return load_model(args.verifier, dtype=loaded.dtype, device=str(loaded.device))
    return None


def load(args) -> LoadedModel:
    loaded = (random_model(args.random_weights, args.device, args.dtype) if args.random_weights
              else load_model(args.model, dtype=args.dtype, device=args.device))
    if args.scripted_tpf:
        loaded.model = ScriptedTPF(loaded.model, loaded.spec, args.scripted_tpf).eval()
        loaded.name += f" + ScriptedTPF(k={args.scripted_tpf})"
    return loaded


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load(args)
    prompts = prompts_for(args, loaded)
    head = header(loaded, args)
    print(header_lines(head), flush=True)
    results = []
    if not args.skip_reference and loaded.spec.arch == "llada" and not args.scripted_tpf:
        warm = argparse.Namespace(**{**vars(args), "batch": 1, "gen_len": args.block_len})
        run_reference(loaded, prompts[:1], warm)                              # warm-up
        results.append(run_reference(loaded, prompts, args))
        print(main_line(results[-1]), flush=True)
    elif not args.skip_reference:
        print("# reference: skipped (the ML-GSAI loop is LLaDA's, and runs no scripted model)")
    verifier = load_verifier(args, loaded)
    if verifier is not None:
        head["verifier"] = verifier.name
        print(f"# verifier {verifier.name} ({str(verifier.dtype).replace('torch.', '')})")
    for mode, decoding in itertools.product(args.modes, args.decoding):
        results.append(run_engine(loaded, mode, prompts, args, decoding,
                                  verifier if decoding != "diffusion" else None))
        print(main_line(results[-1]), *kind_lines(results[-1]), sep="\n", flush=True)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"header": head, "results": results}, indent=1))
        print(f"# wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
