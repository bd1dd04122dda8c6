"""Command line: generate with the engine and print text, token ids, finish reason and NFE.

    python -m dfastllm_ray.generate --prompt "The capital of France is" --max-tokens 32
    python -m dfastllm_ray.generate --model GSAI-ML/LLaDA-8B-Instruct --chat --threshold 0.9 \\
        --prompt "Write a haiku about GPUs"
    python -m dfastllm_ray.generate --model Dream-org/Dream-v0-Instruct-7B --chat \\
        --verifier Qwen/Qwen2.5-0.5B --decoding apd --apd-mixture-weight 0.7 --prompt "2+2?"

The default model is the tiny LLaDA shipped in the package (`dfastllm_ray/assets/tiny-llada`).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).parent / "assets" / "tiny-llada"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m dfastllm_ray.generate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder or hub id")
    ap.add_argument("--prompt", action="append", default=[], help="repeat for several prompts")
    ap.add_argument("--prompt-ids", action="append", default=[],
                    help="comma-separated token ids instead of text (repeatable)")
    ap.add_argument("--chat", action="store_true", help="wrap each prompt in the chat template")
    ap.add_argument("--max-tokens", type=int, default=32, help="gen_length")
    ap.add_argument("--steps", type=int, default=None, help="forwards for the generation (default: max-tokens)")
    ap.add_argument("--block-length", type=int, default=None)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--remasking", default="low_confidence", choices=["low_confidence", "random"])
    ap.add_argument("--threshold", type=float, default=None, help="Fast-dLLM confidence threshold")
    ap.add_argument("--factor", type=float, default=None, help="Fast-dLLM factor rule")
    ap.add_argument("--entropy-bound", type=float, default=None, help="EB-sampler bound (nats)")
    ap.add_argument("--alg", default=None, help="Dream: origin | maskgit_plus | topk_margin | entropy")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    ap.add_argument("--verifier", default=None,
                    help="causal LM (Qwen2 layout, same tokenizer) for --decoding apd|speculative")
    ap.add_argument("--decoding", default="diffusion", choices=["diffusion", "apd", "speculative"])
    ap.add_argument("--apd-mixture-weight", type=float, default=None, help="APD R")
    ap.add_argument("--kv-window", type=int, default=None, help="APD W (drafter cache window)")
    ap.add_argument("--max-lookahead", type=int, default=None, help="APD M")
    ap.add_argument("--draft-tokens", type=int, default=None, help="speculative: drafted per step")
    ap.add_argument("--kv-cache-mode", default="dual", choices=["none", "prefix", "dual"])
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", action="store_true", help="one JSON object per prompt")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if bool(args.prompt) == bool(args.prompt_ids):
        print("pass --prompt (text) or --prompt-ids (token ids), not both", file=sys.stderr)
        return 2
    if args.decoding != "diffusion" and not args.verifier:
        print(f"--decoding {args.decoding} needs --verifier DIR (a causal LM over the model's "
              "tokenizer)", file=sys.stderr)
        return 2
    if args.model == str(DEFAULT_MODEL) and not DEFAULT_MODEL.is_dir():
        print(f"the bundled tiny model is missing ({DEFAULT_MODEL}); pass --model", file=sys.stderr)
        return 2
    from . import LLM, SamplingParams     # heavy imports after argument errors
    params = SamplingParams(max_tokens=args.max_tokens, steps=args.steps,
                            block_length=args.block_length, temperature=args.temperature,
                            remasking=args.remasking, threshold=args.threshold, factor=args.factor,
                            entropy_bound=args.entropy_bound, alg=args.alg, seed=args.seed,
                            stop=tuple(args.stop), decoding=args.decoding,
                            apd_mixture_weight=args.apd_mixture_weight, kv_window=args.kv_window,
                            max_lookahead=args.max_lookahead, draft_tokens=args.draft_tokens)
    llm = LLM(args.model, dtype=args.dtype, device=args.device, verifier=args.verifier,
              kv_cache_mode=args.kv_cache_mode)
    start = time.perf_counter()
    if args.prompt_ids:
        ids = [[int(t) for t in p.split(",")] for p in args.prompt_ids]
        outs = llm.generate(prompt_token_ids=ids, sampling_params=params, use_tqdm=False)
    elif args.chat:
        outs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params, use_tqdm=False)
    else:
        outs = llm.generate(args.prompt, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    for prompt, out in zip(args.prompt or args.prompt_ids, outs):
        record = {"prompt": prompt, "text": out.text, "token_ids": out.token_ids,
                  "finish_reason": out.finish_reason, "nfe": out.nfe, "nfe_saved": out.nfe_saved,
                  "num_prompt_tokens": out.num_prompt_tokens,
                  "verifier_forwards": out.verifier_forwards}
        if args.json:
            print(json.dumps(record))
        else:
            print(f"prompt:        {prompt!r}\ntext:          {out.text!r}\n"
                  f"token_ids:     {out.token_ids}\nfinish_reason: {out.finish_reason}\n"
                  f"nfe:           {out.nfe} (saved by early exit: {out.nfe_saved})\n"
                  + (f"verifier_fwd:  {out.verifier_forwards}\n" if args.verifier else ""))
    if not args.json:
        print(f"{sum(len(o.token_ids) for o in outs)} tokens in {seconds:.2f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
