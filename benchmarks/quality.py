"""Quality of each decoding policy on the task suite's held-out split, through the real engine.

For every diffusion model (default: the tiny LLaDA and its Dream twin) and every setting (policy
x KV-cache mode x early exit) the held-out prompts go through the offline `LLM` API; the printed
table gives exact-match accuracy per task, mean NFE per request and TPF, and the same numbers go
to JSON, with a PNG plot of accuracy against TPF per model. The AR model (default: tiny-ar, on the
same tokenizer) is scored by greedy next-token decoding, its own row.

    python benchmarks/quality.py --per-task 100 --out benchmarks/results/quality

Definitions:
* accuracy: the reply text (cut at EOT/EOS by the engine) equals the expected answer exactly.
* NFE: model forwards a request took part in (`RequestOutput.nfe`), averaged over requests.
* TPF: generation positions committed per forward, sum over requests of committed positions /
  sum of NFE. Committed positions are all `max_tokens` without early exit, and the blocks decoded
  up to the one holding EOT/EOS with it (EOS padding counts: the engine had to decide it).
* `reference`: LLaDA's schedule, one token per step (`steps = max_tokens`), greedy,
  `low_confidence` remasking -- the accuracy every faster setting is compared with.
* `trainer-loop`: the trainer's own engine-free decode of the same schedule (a cross-check).
* `ar-greedy`: the AR model, one forward per generated token (NFE = max_tokens, no KV cache).
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                       # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

from dfastllm_ray import LLM, SamplingParams                     # noqa: E402
from dfastllm_ray.models.loader import load_model                # noqa: E402
from dfastllm_ray.train import tasks                              # noqa: E402
from dfastllm_ray.train.evaluate import evaluate, prompt_ids      # noqa: E402
from benchmarks.policy_settings import settings                  # noqa: E402

ASSETS = ROOT / "dfastllm_ray" / "assets"
DEFAULT_MODELS = [str(ASSETS / "tiny-llada"), str(ASSETS / "tiny-dream")]
DEFAULT_AR = str(ASSETS / "tiny-ar")
EXTRA = {"factor=1.0": {"factor": 1.0}, "entropy_bound=0.5": {"entropy_bound": 0.5}}


def policies(max_tokens: int) -> dict[str, dict]:
    """name -> SamplingParams knobs: every setting of policy_settings.py, and Fast-dLLM's factor
    and the EB-sampler (steps = forwards of the fixed schedules, from max_tokens)."""
    return {**settings(max_tokens), **EXTRA}


POLICIES = list(policies(32))
CACHE_MODES = ("none", "prefix", "dual")


@dataclass
class Setting:
    policy: str
    cache: str
    early_exit: bool
    accuracy: dict[str, float] = field(default_factory=dict)   # task -> fraction, plus "mean"
    nfe: float = 0.0                # mean forwards per request
    tpf: float = 0.0                # committed positions per forward
    seconds: float = 0.0            # wall time of the whole setting

    @property
    def name(self) -> str:
        return f"{self.policy} | cache={self.cache} | early_exit={'on' if self.early_exit else 'off'}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS, help="diffusion checkpoint folders")
    p.add_argument("--ar-model", default=DEFAULT_AR, help="AR checkpoint folder ('' to skip)")
    p.add_argument("--per-task", type=int, default=100, help="held-out examples per task")
    p.add_argument("--seed", type=int, default=0, help="held-out sampling seed")
    p.add_argument("--max-tokens", type=int, default=32,
                   help="generation length (gen_length; 32: configs/tiny.yaml's default, and the "
                        "greeting's 31 characters + EOT fit)")
    p.add_argument("--block-length", type=int, default=8,
                   help="block length; divides max-tokens (8: a task answer and its EOT fit the "
                        "first block, so early exit can skip the other three)")
    p.add_argument("--policies", nargs="+", default=POLICIES, choices=POLICIES,
                   help="settings to run (default: all of benchmarks/policy_settings.py + EXTRA)")
    p.add_argument("--cache-modes", nargs="+", default=list(CACHE_MODES), choices=CACHE_MODES)
    p.add_argument("--early-exit", nargs="+", default=["on"], choices=["on", "off"],
                   help="'on off' adds every setting without early exit as well")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine batch size")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--out", default="results/quality", help="writes OUT.json and OUT.png")
    p.add_argument("--hybrid", action="store_true",
                   help="also APD / speculative rows (benchmarks/hybrid_quality.py): the first "
                        "--models checkpoint drafting, --ar-model verifying")
    return p.parse_args(argv)


def run_setting(llm: LLM, prompts: list[list[int]], examples: list[tasks.Example],
                setting: Setting, args: argparse.Namespace) -> Setting:
    params = SamplingParams(max_tokens=args.max_tokens, block_length=args.block_length,
                            **{"steps": args.max_tokens, "temperature": 0.0,
                               "early_exit": setting.early_exit,
                               **policies(args.max_tokens)[setting.policy]})
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    setting.seconds = time.perf_counter() - start
    setting.accuracy = accuracy(examples, [o.text for o in outs])
    steps_per_block = max(params.steps // (args.max_tokens // args.block_length), 1)
    skipped = sum(o.nfe_saved // steps_per_block * args.block_length for o in outs)
    setting.nfe = sum(o.nfe for o in outs) / len(outs)
    setting.tpf = (len(outs) * args.max_tokens - skipped) / sum(o.nfe for o in outs)
    return setting


def accuracy(examples: list[tasks.Example], texts: list[str]) -> dict[str, float]:
    right: dict[str, list[bool]] = {t: [] for t in tasks.TASKS}
    for ex, text in zip(examples, texts):
        right[ex.task].append(text == ex.answer)
    acc = {t: sum(v) / len(v) for t, v in right.items() if v}
    acc["mean"] = sum(acc.values()) / len(acc)
    return acc


def trainer_loop(loaded, examples: list[tasks.Example], args: argparse.Namespace) -> Setting:
    """The engine-free reference decode (dfastllm_ray.train.evaluate), for a cross-check."""
    s = Setting("trainer-loop", "none", False)
    start = time.perf_counter()
    s.accuracy = evaluate(loaded.model, loaded.tokenizer, examples, args.max_tokens,
                          args.block_length, loaded.spec.mask_token_id,
                          set(loaded.spec.stop_token_ids), logits_shift=loaded.spec.logits_shift)
    s.seconds = time.perf_counter() - start
    s.nfe, s.tpf = float(args.max_tokens), 1.0
    return s


def ar_greedy(folder: str, examples: list[tasks.Example], args: argparse.Namespace) -> Setting:
    """The AR model's own accuracy: greedy next-token decoding, max_tokens forwards."""
    loaded = load_model(folder, dtype="float32", device="cpu")
    s = Setting("ar-greedy", "none", False)
    start = time.perf_counter()
    s.accuracy = evaluate(loaded.model, loaded.tokenizer, examples, args.max_tokens,
                          args.max_tokens, None, set(loaded.spec.stop_token_ids), causal=True)
    s.seconds = time.perf_counter() - start
    s.nfe, s.tpf = float(args.max_tokens), 1.0
    return s


def frontier(results: list[Setting]) -> set[str]:
    """Names of the engine settings no other beats on both mean accuracy and TPF."""
    runs = [s for s in results if s.policy not in ("trainer-loop", "ar-greedy")]

    def beats(a: Setting, b: Setting) -> bool:
        ka, kb = (a.accuracy["mean"], a.tpf), (b.accuracy["mean"], b.tpf)
        return ka[0] >= kb[0] and ka[1] >= kb[1] and ka != kb
    return {s.name for s in runs if not any(beats(o, s) for o in runs)}


def format_table(results: list[Setting]) -> str:
    """Rows by TPF; `*` marks the Pareto frontier (accuracy vs TPF)."""
    names = list(tasks.TASKS) + ["mean"]
    front = frontier(results)
    head = "| | policy | cache | early exit | " + " | ".join(names) + " | NFE | TPF | s |"
    lines = [head, "|" + "---|" * (len(names) + 7)]
    for s in sorted(results, key=lambda r: r.tpf):
        cells = " | ".join(f"{100 * s.accuracy[n]:.1f}" for n in names)
        lines.append(f"| {'*' if s.name in front else ''} | {s.policy} | {s.cache} | "
                     f"{'on' if s.early_exit else 'off'} | {cells} | "
                     f"{s.nfe:.2f} | {s.tpf:.2f} | {s.seconds:.1f} |")
    return "\n".join(lines)


def plot(results: list[Setting], path: Path, title: str) -> None:
    """Mean accuracy against TPF: one colour per policy, one marker per cache mode; hollow
    markers are runs without early exit."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(dict.fromkeys(s.policy.split(" ")[0].split("=")[0] for s in results))
    cmap = plt.get_cmap("tab20")
    colours = {n: cmap(i % 20) for i, n in enumerate(names)}     # one colour per policy family
    markers = {"none": "o", "prefix": "s", "dual": "^"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in results:
        c = colours[s.policy.split(" ")[0].split("=")[0]]
        ax.scatter(s.tpf, 100 * s.accuracy["mean"], marker=markers[s.cache], s=50,
                   facecolors=c if s.early_exit else "none", edgecolors=c)
    front = sorted((s for s in results if s.name in frontier(results)), key=lambda r: r.tpf)
    ax.step([s.tpf for s in front], [100 * s.accuracy["mean"] for s in front], where="post",
            color="black", lw=0.8, alpha=0.6, label="Pareto frontier")
    for policy in names:
        ax.scatter([], [], color=colours[policy], label=policy)
    for cache, m in markers.items():
        ax.scatter([], [], marker=m, facecolors="none", edgecolors="gray", label=f"cache={cache}")
    ax.set_xlabel("tokens per forward (TPF)")
    ax.set_ylabel("held-out accuracy, mean over tasks (%)")
    ax.set_title(f"{title}: accuracy vs parallelism (hollow: no early exit)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def diffusion_settings(folder: str, examples: list[tasks.Example],
                       args: argparse.Namespace) -> list[Setting]:
    loaded = load_model(folder, dtype=args.dtype, device=args.device)
    prompts = [prompt_ids(loaded.tokenizer, ex.prompt) for ex in examples]
    results = [trainer_loop(loaded, examples, args)]
    for cache in args.cache_modes:
        llm = LLM(loaded, dtype=args.dtype, device=args.device, kv_cache_mode=cache,
                  max_num_seqs=args.max_num_seqs)
        for policy, ee in itertools.product(args.policies, args.early_exit):
            try:
                s = run_setting(llm, prompts, examples, Setting(policy, cache, ee == "on"), args)
            except ValueError as exc:             # the engine refuses it for this model / cache
                print(f"{Path(folder).name} {policy} cache={cache}: skipped ({exc})", flush=True)
                continue
            print(f"{Path(folder).name} {s.name}: mean {100 * s.accuracy['mean']:.1f}%  "
                  f"NFE {s.nfe:.2f}  TPF {s.tpf:.2f}  ({s.seconds:.1f} s)", flush=True)
            results.append(s)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    examples = tasks.heldout_set(args.per_task, args.seed)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tables: dict[str, list[Setting]] = {}
    for folder in args.models:
        tables[_portable(folder)] = diffusion_settings(folder, examples, args)
        plot(tables[_portable(folder)], out.with_name(f"{out.name}-{Path(folder).name}.png"),
             Path(folder).name)
    if args.ar_model:
        tables[_portable(args.ar_model)] = [ar_greedy(args.ar_model, examples, args)]
    for name, results in tables.items():
        print(f"\n{name}\n{format_table(results)}")
    hybrid = hybrid_section(args, examples) if args.hybrid and args.ar_model else None
    meta = {k: v for k, v in vars(args).items() if k not in ("out", "models", "ar_model")}
    meta["models"] = [_portable(m) for m in args.models]   # no machine paths in committed results
    meta["ar_model"] = _portable(args.ar_model) if args.ar_model else ""
    out.with_suffix(".json").write_text(json.dumps(
        {"args": meta, "results": {name: [dict(vars(s), name=s.name) for s in results]
                                   for name, results in tables.items()},
         **({"hybrid": hybrid} if hybrid else {})}, indent=2) + "\n")
    print(f"wrote {out.with_suffix('.json')} and {out.name}-<model>.png")
    return 0


def hybrid_section(args: argparse.Namespace, examples: list[tasks.Example]) -> dict:
    """APD and speculative rows (accuracy, TPF, verifier forwards per token) beside the drafter
    at one token per step and the AR model alone, printed; their JSON."""
    from benchmarks import hybrid_quality as hq
    rows = hq.hybrid_rows(args.models[0], args.ar_model, examples, args.max_tokens,
                          args.block_length, max_num_seqs=args.max_num_seqs)
    pair = f"{_portable(args.models[0])} + {_portable(args.ar_model)}"
    print(f"\nhybrid: {pair}\n{hq.table(rows)}\nspeculative == AR greedy: {hq.lossless(rows)}")
    return {"pair": pair, "speculative_equals_ar": hq.lossless(rows), "rows": hq.rows_json(rows)}


def _portable(path: str) -> str:
    """A checkpoint path relative to the repository when it lies inside it."""
    p = Path(path).resolve()
    return str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else path


if __name__ == "__main__":
    sys.exit(main())
