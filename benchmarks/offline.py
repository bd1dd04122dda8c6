"""Offline throughput of the reference loop and of each engine mode, on one machine.

For each path it prints tokens/s, NFE per request, tokens per forward (TPF), ms per engine step
and peak memory, one line each, plus the hardware / model / command header that goes with them
in the README:

    python benchmarks/offline.py                                   # the shipped tiny LLaDA, CPU
    python benchmarks/offline.py --random-weights llada-8b --prompt-len 512 --gen-len 256 \
        --block-len 32 --batch 1 --tokens-per-step 1               # an H100, batch 1
    python benchmarks/offline.py --random-weights llada-8b --prompt-len 512 --gen-len 256 \
        --block-len 32 --batch 64 --tokens-per-step 4 --modes dual --skip-reference

Definitions: tokens = generated positions (batch x gen_len, or fewer after an early exit);
tokens/s divides by the wall time of the whole run (all requests submitted at once); NFE = model
forwards per request; TPF = tokens / NFE; ms/step = wall time / engine steps (the reference loop:
/ its forwards); peak memory = `torch.cuda.max_memory_allocated` on CUDA, the process's peak RSS
on CPU. "reference" is `sampling.llada_generate` variant "llada" (ML-GSAI `generate`: no cache,
the whole batch in one call) with one token per step.
`--random-weights llada-8b` builds the LLaDA-8B-Instruct shape with random bfloat16 weights (no
download); random weights make a threshold policy commit one token per step.
"""
from __future__ import annotations

import argparse
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dfastllm_ray.engine.config import EngineConfig  # noqa: E402
from dfastllm_ray.engine.engine import Engine  # noqa: E402
from dfastllm_ray.models.llada import LLaDAModel  # noqa: E402
from dfastllm_ray.models.loader import LoadedModel, load_model, resolve_device, resolve_dtype  # noqa: E402
from dfastllm_ray.models.shapes import LLADA_8B  # noqa: E402
from dfastllm_ray.models.spec import ModelSpec  # noqa: E402
from dfastllm_ray.sampling.llada_generate import llada_generate as reference_generate  # noqa: E402
from dfastllm_ray.sampling.params import SamplingParams  # noqa: E402

DEFAULT_MODEL = ROOT / "dfastllm_ray" / "assets" / "tiny-llada"
@dataclass
class Result:
    path: str
    tokens: int
    seconds: float
    nfe: float              # forwards per request
    steps: int              # engine steps (reference: forwards)
    peak_gb: float

    def line(self, batch: int) -> str:
        tps = self.tokens / self.seconds
        tpf = self.tokens / batch / max(self.nfe, 1e-9)
        return (f"{self.path:<10} batch {batch:>3} | {tps:9.1f} tokens/s | NFE {self.nfe:7.1f} | "
                f"TPF {tpf:5.2f} | {1e3 * self.seconds / max(self.steps, 1):8.1f} ms/step | "
                f"peak {self.peak_gb:6.2f} GB")


def random_llada_8b(device: str, dtype: str) -> LoadedModel:
    """LLaDA-8B-Instruct's shape, random weights (std 0.02, norms 1), built on the device."""
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    with torch.device("meta"):
        net = LLaDAModel(LLADA_8B)
    net = net.to(dt).to_empty(device=dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("norm.weight") or ".ln_f." in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 0.02, generator=gen)
    return LoadedModel(net.eval(), LLADA_8B, None, {}, None, "random-llada-8b")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss      # Linux: KiB
    return kib / 2 ** 20


def prompts_for(args, spec: ModelSpec) -> list[list[int]]:
    rng = torch.Generator().manual_seed(args.seed)
    high = min(spec.vocab_size, spec.mask_token_id)
    return torch.randint(0, high, (args.batch, args.prompt_len), generator=rng).tolist()


def params_for(args, gen: int) -> SamplingParams:
    steps = max(gen // args.tokens_per_step, gen // args.block_len)
    return SamplingParams(max_tokens=gen, block_length=args.block_len, steps=steps,
                          threshold=args.threshold, early_exit=not args.no_early_exit)


def run_reference(loaded: LoadedModel, prompts, args) -> Result:
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
    return Result("reference", args.batch * args.gen_len, seconds, nfe, nfe, peak_gb(loaded.device))


def run_engine(loaded: LoadedModel, mode: str, prompts, args, gen: int | None = None,
               progress: bool = True) -> Result:
    canvas = args.prompt_len + args.gen_len
    pages = None if args.kv_cache_gb else len(prompts) * -(-canvas // args.page_size)   # just enough
    cfg = EngineConfig(kv_cache_mode=mode, max_num_seqs=max(args.batch, 1),
                       max_num_batched_tokens=max(args.batch, 1) * canvas,
                       page_size=args.page_size, compile=args.compile,
                       kv_cache_memory_gb=args.kv_cache_gb, num_pages=pages)
    eng = Engine(loaded, cfg)
    params = params_for(args, gen or args.gen_len)
    reset_peak(loaded.device)
    sync(loaded.device)
    t0 = time.perf_counter()
    for i, ids in enumerate(prompts):
        eng.add_request(f"b{i}", ids, params)
    finals = []
    with tqdm(total=len(prompts), desc=mode, unit="req", disable=not progress, leave=False) as bar:
        while eng.has_unfinished():
            for out in eng.step():
                if out.finished:
                    finals.append(out)
                    bar.update(1)
    sync(loaded.device)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in finals)
    nfe = sum(o.nfe for o in finals) / len(finals)
    return Result(mode, tokens, seconds, nfe, eng.stats()["engine_steps"], peak_gb(loaded.device))


def header(loaded: LoadedModel, args) -> str:
    dev = loaded.device
    hw = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                capture_output=True).stdout.strip()
    except OSError:
        commit = "?"
    return (f"# {loaded.name} ({loaded.dtype}) on {hw} ({dev.type}, torch {torch.__version__}, "
            f"{torch.get_num_threads()} threads), commit {commit}\n# prompt {args.prompt_len}, "
            f"gen {args.gen_len}, block {args.block_len}, {args.tokens_per_step} token(s)/step"
            f"{f', threshold {args.threshold}' if args.threshold else ''}\n# python "
            f"benchmarks/offline.py {' '.join(sys.argv[1:])}")


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL))
    ap.add_argument("--random-weights", choices=["llada-8b"], default=None)
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--block-len", type=int, default=32)
    ap.add_argument("--batch", type=int, default=1, help="concurrent requests")
    ap.add_argument("--tokens-per-step", type=int, default=1, help="fixed schedule: steps = gen / this")
    ap.add_argument("--threshold", type=float, default=None, help="use the threshold policy instead")
    ap.add_argument("--modes", nargs="+", default=["none", "prefix", "dual"])
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument("--no-early-exit", action="store_true", help="decode every block even after EOS")
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--kv-cache-gb", type=float, default=None)
    ap.add_argument("--compile", action="store_true", help="torch.compile the forward (CUDA)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.gen_len % args.block_len:
        raise SystemExit(f"--block-len {args.block_len} must divide --gen-len {args.gen_len}")
    loaded = (random_llada_8b(args.device, args.dtype) if args.random_weights
              else load_model(args.model, dtype=args.dtype, device=args.device))
    prompts = prompts_for(args, loaded.spec)
    print(header(loaded, args), flush=True)
    warm = argparse.Namespace(**{**vars(args), "batch": min(args.batch, 2), "gen_len": args.block_len})
    if not args.skip_reference:
        run_reference(loaded, prompts[:1], argparse.Namespace(**{**vars(warm), "batch": 1}))  # warm-up
        print(run_reference(loaded, prompts, args).line(args.batch), flush=True)
    for mode in args.modes:
        run_engine(loaded, mode, prompts[:warm.batch], warm, progress=False)   # warm-up
        print(run_engine(loaded, mode, prompts, args).line(args.batch), flush=True)


if __name__ == "__main__":
    main()
