"""Hybrid diffusion-AR decoding on the tiny pair: accuracy, TPF and verifier forwards per token of
APD (a few R / M) and speculative drafting (a few draft_tokens), beside the drafter alone at one
token per step and the AR verifier alone, on the task suite's held-out split (CPU).

    python benchmarks/hybrid_quality.py --per-task 40 --out benchmarks/results/hybrid_quality

The pair: a diffusion drafter and a causal verifier over the same tokenizer (defaults: the
shipped tiny LLaDA and tiny AR model). Every engine row sends all prompts at once through the
offline `LLM` (step-level batching, `--max-num-seqs`); the AR row decodes one request at a time
with its exact KV cache (`sampling.ar_generate`), the baseline speculative decoding must equal at
temperature 0 (the script checks it and prints the verdict).

Definitions (every row, greedy):
* accuracy: the reply text equals the expected answer exactly (quality.py's `accuracy`).
* tokens: reply tokens returned (cut at EOS / EOT); tokens/s = tokens / wall seconds (CPU, this
  machine, shared: compare rows of one run, not across runs).
* TPF: tokens / drafter forwards (the AR row: tokens / its own forwards, prefill included).
* verifier fwd/token: verifier forwards / tokens (0 for the drafter alone, about 1 for the AR).
* APD's W (kv_window) acts only when the drafter's config.json has `use_cache: true` (the official
  code's rule); the tiny LLaDA's does not, so the rows leave it out.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                       # run as a script from a source checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.quality import _portable, accuracy              # noqa: E402
from dfastllm_ray import LLM, SamplingParams                     # noqa: E402
from dfastllm_ray.models.loader import LoadedModel, load_model   # noqa: E402
from dfastllm_ray.sampling.ar_generate import ar_generate        # noqa: E402
from dfastllm_ray.train import tasks                             # noqa: E402
from dfastllm_ray.train.evaluate import prompt_ids               # noqa: E402

ASSETS = ROOT / "dfastllm_ray" / "assets"
DEFAULT_APD = ["0.5:4", "0.7:4", "0.7:16", "0.9:16"]   # R:M (R:M:W with a drafter cache)
DEFAULT_DRAFT = [2, 4, 8]


@dataclass
class Row:
    name: str
    accuracy: dict[str, float] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0
    drafter_forwards: int = 0
    verifier_forwards: int = 0
    texts: list[str] = field(default_factory=list, repr=False)

    @property
    def tpf(self) -> float:
        return self.tokens / max(self.drafter_forwards or self.verifier_forwards, 1)

    @property
    def verifier_per_token(self) -> float:
        return self.verifier_forwards / max(self.tokens, 1)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--drafter", default=str(ASSETS / "tiny-llada"), help="diffusion checkpoint")
    p.add_argument("--verifier", default=str(ASSETS / "tiny-ar"), help="causal checkpoint")
    p.add_argument("--fit-vocabulary", action="store_true",
                   help="cut a verifier's extra ids (tokens the drafter's tokenizer lacks)")
    p.add_argument("--per-task", type=int, default=40, help="held-out examples per task")
    p.add_argument("--seed", type=int, default=0, help="held-out sampling seed")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--block-length", type=int, default=8, help="the drafter-alone row's blocks")
    p.add_argument("--apd", nargs="*", default=DEFAULT_APD, help="APD settings R:M or R:M:W")
    p.add_argument("--draft-tokens", nargs="*", type=int, default=DEFAULT_DRAFT)
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine batch size")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", default=None, help="write OUT.json")
    return p.parse_args(argv)


def apd_knobs(text: str) -> dict:
    parts = text.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--apd {text!r} is invalid: use R:M or R:M:W, e.g. 0.7:16")
    knobs = {"decoding": "apd", "apd_mixture_weight": float(parts[0]),
             "max_lookahead": int(parts[1])}
    if len(parts) == 3:
        knobs["kv_window"] = int(parts[2])
    return knobs


def fit_vocabulary(verifier: LoadedModel, drafter: LoadedModel) -> LoadedModel:
    """A verifier whose vocabulary extends the drafter's with tokens the drafter's tokenizer does
    not have (the trainer grows the tiny vocabulary with Dream's specials, ids 108-111) -> the
    same model with its embeddings and LM head cut to the drafter's ids, which the engine needs.
    Refused unless both tokenizers give every shared id the same token."""
    d = drafter.spec.vocab_size
    if verifier.spec.vocab_size <= d:
        return verifier
    shared = {t: i for t, i in verifier.tokenizer.get_vocab().items() if i < d}
    if shared != {t: i for t, i in drafter.tokenizer.get_vocab().items() if i < d}:
        raise SystemExit(f"--fit-vocabulary: the verifier's tokenizer differs from the drafter's "
                         f"on ids below {d}; the pair does not share a tokenizer")
    net, spec = verifier.model, dataclasses.replace(verifier.spec, vocab_size=d)
    emb = net.model.embed_tokens
    emb.weight = torch.nn.Parameter(emb.weight.data[:d].clone(), requires_grad=False)
    emb.num_embeddings = d
    if not net.tie:
        net.lm_head.weight = torch.nn.Parameter(net.lm_head.weight.data[:d].clone(),
                                                requires_grad=False)
        net.lm_head.out_features = d
    net.spec = spec
    return dataclasses.replace(verifier, spec=spec, name=f"{verifier.name} (ids < {d})")


def engine_row(llm: LLM, name: str, prompts, examples, params: SamplingParams) -> Row:
    start = time.perf_counter()
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
    row = Row(name, seconds=time.perf_counter() - start, texts=[o.text for o in outs])
    row.accuracy = accuracy(examples, row.texts)
    row.tokens = sum(len(o.token_ids) for o in outs)
    row.drafter_forwards = sum(o.nfe for o in outs)
    row.verifier_forwards = sum(o.verifier_forwards for o in outs)
    return row


def ar_row(verifier, prompts, examples, max_tokens: int) -> Row:
    """The verifier alone: greedy, one request at a time, exact KV cache."""
    row, stops = Row("ar-greedy (verifier alone)"), set(verifier.spec.stop_token_ids)
    start = time.perf_counter()
    for ids in prompts:
        out = ar_generate(verifier.model, verifier.spec, torch.tensor([ids]), max_tokens)
        reply = [t for t in out.tokens if t not in stops]
        row.texts.append(verifier.tokenizer.decode(reply, skip_special_tokens=True))
        row.tokens += len(reply)
        row.verifier_forwards += out.forwards         # prefill included: TPF just under 1
    row.seconds = time.perf_counter() - start
    row.accuracy = accuracy(examples, row.texts)
    return row


def run(args: argparse.Namespace) -> list[Row]:
    return hybrid_rows(args.drafter, args.verifier, tasks.heldout_set(args.per_task, args.seed),
                       args.max_tokens, args.block_length, args.apd, args.draft_tokens,
                       args.max_num_seqs, args.fit_vocabulary)


def hybrid_rows(drafter_dir: str, verifier_dir: str, examples: list[tasks.Example], gen: int,
                block_length: int, apd: list[str] = DEFAULT_APD,
                draft_tokens: list[int] = DEFAULT_DRAFT, max_num_seqs: int = 64,
                fit: bool = False) -> list[Row]:
    """Every row, printed as it finishes (also `benchmarks/quality.py --hybrid`)."""
    drafter = load_model(drafter_dir, dtype="float32", device="cpu")
    verifier = load_model(verifier_dir, dtype="float32", device="cpu")
    if fit:
        verifier = fit_vocabulary(verifier, drafter)
    prompts = [prompt_ids(drafter.tokenizer, ex.prompt) for ex in examples]
    llm = LLM(drafter, dtype="float32", device="cpu", verifier=verifier, kv_cache_mode="dual",
              max_num_seqs=max_num_seqs)
    settings = [("drafter 1 token/step", SamplingParams(max_tokens=gen, steps=gen,
                                                        block_length=block_length))]
    for text in apd:
        k = apd_knobs(text)
        label = f"apd R={k['apd_mixture_weight']} M={k['max_lookahead']}" + (
            f" W={k['kv_window']}" if "kv_window" in k else "")
        settings.append((label, SamplingParams(max_tokens=gen, **k)))
    for n in draft_tokens:
        settings.append((f"speculative k={n}", SamplingParams(max_tokens=gen,
                                                              decoding="speculative",
                                                              draft_tokens=n)))
    rows = []
    for name, params in settings:
        rows.append(engine_row(llm, name, prompts, examples, params))
        print(line(rows[-1]), flush=True)
    rows.append(ar_row(verifier, prompts, examples, gen))
    print(line(rows[-1]), flush=True)
    return rows


def line(r: Row) -> str:
    return (f"{r.name:<26} acc {100 * r.accuracy['mean']:5.1f}% | {r.tokens_per_s:7.1f} tok/s | "
            f"TPF {r.tpf:5.2f} | verifier fwd/token {r.verifier_per_token:5.2f} | "
            f"{r.seconds:6.1f} s")


def table(rows: list[Row]) -> str:
    names = list(tasks.TASKS) + ["mean"]
    out = ["| setting | " + " | ".join(names) + " | tok/s | TPF | verifier fwd/token |",
           "|" + "---|" * (len(names) + 4)]
    for r in rows:
        cells = " | ".join(f"{100 * r.accuracy.get(n, 0.0):.1f}" for n in names)
        out.append(f"| {r.name} | {cells} | {r.tokens_per_s:.1f} | {r.tpf:.2f} | "
                   f"{r.verifier_per_token:.2f} |")
    return "\n".join(out)


def lossless(rows: list[Row]) -> bool:
    """Every speculative row returned the AR row's (the last) texts."""
    return all(r.texts == rows[-1].texts for r in rows if r.name.startswith("speculative"))


def rows_json(rows: list[Row]) -> list[dict]:
    return [{**{k: v for k, v in asdict(r).items() if k != "texts"}, "tpf": r.tpf,
             "verifier_forwards_per_token": r.verifier_per_token, "tokens_per_s": r.tokens_per_s}
            for r in rows]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = run(args)
    same = lossless(rows)
    print(f"\n{table(rows)}\n\nspeculative == AR greedy on every prompt: {same}")
    if args.out:
        out = Path(args.out).with_suffix(".json")
        out.parent.mkdir(parents=True, exist_ok=True)
        meta = {**{k: v for k, v in vars(args).items() if k != "out"},   # no machine paths
                "drafter": _portable(args.drafter), "verifier": _portable(args.verifier)}
        out.write_text(json.dumps({"args": meta, "speculative_equals_ar": same,
                                   "rows": rows_json(rows)}, indent=2) + "\n")
        print(f"wrote {out}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
