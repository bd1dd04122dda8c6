"""Load generator for any OpenAI-compatible server (ours, vLLM, dfastllm, dlmserve, ...).

A closed loop: `--concurrency` workers each send one request at a time until `--num-requests`
have been sent. Prints requests/s, output tokens/s, time to first chunk and latency percentiles,
and writes the same numbers plus every request's record as JSON (`--out`).

    python benchmarks/serving.py --base-url http://127.0.0.1:8000/v1 --model llada-8b-instruct \
        --num-requests 64 --concurrency 16 --prompt-len 128 --output-len 128 --stream \
        --extra-body '{"steps": 128, "block_length": 32, "threshold": 0.9}' --out results/serving.json

Definitions (the units in the JSON are seconds, the printed lines are milliseconds):
* latency: from sending the request to the last byte of the response.
* time to first chunk (TTFC): from sending to the first streamed chunk that carries text
  (for a diffusion LM, the first committed block). Only measured with `--stream`.
* output tokens: the server's `usage.completion_tokens` (streaming asks for it with
  `stream_options.include_usage`); when a server returns no usage, the whitespace-separated
  words of the text are counted instead, and `output_tokens_source` in the JSON says so.
* requests/s and output tokens/s divide by the wall time from the first send to the last answer.
* an error is any non-2xx status, a transport failure or timeout, or an `error` event in a stream.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field

import httpx
from tqdm import tqdm

# Common English words, roughly one token each in the usual BPE vocabularies, so that
# `--prompt-len N` gives a prompt of about N tokens without needing the server's tokenizer.
WORDS = (
    "the of and to in is was for on that with as by at from his her they this which are "
    "be had not one have an but were all there when been their who more would will if its "
    "about time people year two first may new over some only into after many most made world "
    "city water river house school music game team story light field power state market"
).split()
PERCENTILES = (50, 95, 99)


@dataclass
class BenchConfig:
    base_url: str                     # OpenAI base, e.g. http://host:8000/v1
    model: str | None = None          # None: the first id listed by GET /models
    num_requests: int = 32
    concurrency: int = 8
    prompt_len: int = 64              # prompt words (~tokens)
    output_len: int = 64              # max_tokens
    stream: bool = True
    stream_usage: bool = True         # ask for usage in the stream (stream_options.include_usage)
    chat: bool = False
    api_key: str | None = None
    extra_body: dict = field(default_factory=dict)  # merged into every request body
    temperature: float = 0.0
    timeout_s: float = 600.0          # per request
    seed: int = 0                     # for the synthetic prompts
    warmup: int = 0                   # untimed requests sent one by one before the run
    progress: bool = True


@dataclass
class RequestResult:
    ok: bool
    latency_s: float                  # send -> last byte
    ttfc_s: float | None = None       # send -> first chunk with text; None when not streaming
    prompt_tokens: int | None = None  # from usage, when the server reports it
    output_tokens: int = 0
    output_tokens_from_usage: bool = False
    chunks: int = 0                   # streamed chunks that carried text
    status: int | None = None         # HTTP status (None: transport failure)
    error: str | None = None


def make_prompts(num: int, length: int, seed: int) -> list[str]:
    """`num` distinct prompts of `length` words (distinct so no prefix cache makes them free)."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(length)) for _ in range(num)]


def build_request(cfg: BenchConfig, prompt: str) -> tuple[str, dict]:
    """(path, JSON body) of one request; `extra_body` carries the diffusion knobs."""
    body: dict = {"model": cfg.model, "max_tokens": cfg.output_len,
                  "temperature": cfg.temperature, "stream": cfg.stream}
    if cfg.stream and cfg.stream_usage:
        body["stream_options"] = {"include_usage": True}
    if cfg.chat:
        path, body["messages"] = "/chat/completions", [{"role": "user", "content": prompt}]
    else:
        path, body["prompt"] = "/completions", prompt
    body.update(cfg.extra_body)
    return path, body


def choice_text(payload: dict, chat: bool) -> str:
    """The text of the first choice of a completion, chat completion or stream chunk."""
    choices = payload.get("choices") or []
    if not choices:
        return ""
    c = choices[0]
    if chat:
        return (c.get("delta") or c.get("message") or {}).get("content") or ""
    return c.get("text") or ""


def apply_usage(result: RequestResult, payload: dict, text: str) -> None:
    usage = payload.get("usage") if payload else None
    if usage and usage.get("completion_tokens") is not None:
        result.output_tokens = int(usage["completion_tokens"])
        result.output_tokens_from_usage = True
        result.prompt_tokens = usage.get("prompt_tokens")
    else:
        result.output_tokens = len(text.split())


async def send_unary(client: httpx.AsyncClient, path: str, body: dict, chat: bool,
                     t0: float) -> RequestResult:
    resp = await client.post(path, json=body)
    latency = time.perf_counter() - t0
    if resp.status_code >= 300:
        return RequestResult(False, latency, status=resp.status_code, error=resp.text[:300])
    payload = resp.json()
    result = RequestResult(True, latency, status=resp.status_code)
    apply_usage(result, payload, choice_text(payload, chat))
    return result


async def send_stream(client: httpx.AsyncClient, path: str, body: dict, chat: bool,
                      t0: float) -> RequestResult:
    result = RequestResult(True, 0.0)
    text, last_usage = [], {}
    async with client.stream("POST", path, json=body) as resp:
        result.status = resp.status_code
        if resp.status_code >= 300:
            await resp.aread()
            result.ok, result.error = False, resp.text[:300]
        else:
            async for line in resp.aiter_lines():
                data = line[5:].strip() if line.startswith("data:") else None
                if not data or data == "[DONE]":
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    result.ok, result.error = False, json.dumps(chunk["error"])[:300]
                    continue
                delta = choice_text(chunk, chat)
                if delta:
                    result.chunks += 1
                    if result.ttfc_s is None:
                        result.ttfc_s = time.perf_counter() - t0
                    text.append(delta)
                if chunk.get("usage"):
                    last_usage = chunk
    result.latency_s = time.perf_counter() - t0
    apply_usage(result, last_usage, "".join(text))
    return result


async def send_one(client: httpx.AsyncClient, cfg: BenchConfig, prompt: str) -> RequestResult:
    path, body = build_request(cfg, prompt)
    send = send_stream if cfg.stream else send_unary
    t0 = time.perf_counter()
    try:
        return await send(client, path, body, cfg.chat, t0)
    except (httpx.HTTPError, json.JSONDecodeError, ValueError) as e:
        return RequestResult(False, time.perf_counter() - t0, error=f"{type(e).__name__}: {e}")


async def first_model(client: httpx.AsyncClient) -> str:
    resp = await client.get("/models")
    resp.raise_for_status()
    return resp.json()["data"][0]["id"]


def make_client(cfg: BenchConfig) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    limits = httpx.Limits(max_connections=cfg.concurrency, max_keepalive_connections=cfg.concurrency)
    return httpx.AsyncClient(base_url=cfg.base_url.rstrip("/"), headers=headers, limits=limits,
                             timeout=httpx.Timeout(cfg.timeout_s))


async def run_benchmark(cfg: BenchConfig) -> tuple[list[RequestResult], float]:
    """Send every request through `concurrency` workers; returns (results, wall seconds)."""
    prompts = make_prompts(cfg.num_requests, cfg.prompt_len, cfg.seed)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for p in prompts:
        queue.put_nowait(p)
    results: list[RequestResult] = []
    async with make_client(cfg) as client:
        if cfg.model is None:
            cfg.model = await first_model(client)
        for prompt in make_prompts(cfg.warmup, cfg.prompt_len, cfg.seed + 1):
            await send_one(client, cfg, prompt)
        bar = tqdm(total=cfg.num_requests, disable=not cfg.progress, file=sys.stderr,
                   desc="requests", unit="req")

        async def worker() -> None:
            while not queue.empty():
                results.append(await send_one(client, cfg, queue.get_nowait()))
                bar.update(1)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(min(cfg.concurrency, cfg.num_requests))))
        wall = time.perf_counter() - t0
        bar.close()
    return results, wall


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile with linear interpolation between order statistics (NumPy's default)."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def distribution(values: list[float]) -> dict:
    """mean and p50/p95/p99 in seconds (None for an empty list)."""
    out = {f"p{q}": percentile(values, q) for q in PERCENTILES}
    out["mean"] = sum(values) / len(values) if values else None
    return out


def summarize(results: list[RequestResult], wall_s: float) -> dict:
    """Aggregate numbers over the successful requests; errors are counted, not timed."""
    ok = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in ok)
    errors: dict[str, int] = {}
    for r in results:
        if not r.ok:
            key = ("transport" if r.status is None
                   else "stream_error" if r.status < 300 else str(r.status))
            errors[key] = errors.get(key, 0) + 1
    return {
        "num_requests": len(results),
        "completed": len(ok),
        "errors": len(results) - len(ok),
        "errors_by_status": errors,
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else None,
        "output_tokens": out_tokens,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else None,
        "output_tokens_source": "usage" if all(r.output_tokens_from_usage for r in ok) else "estimated",
        "mean_chunks_per_request": sum(r.chunks for r in ok) / len(ok) if ok else None,
        "latency_s": distribution([r.latency_s for r in ok]),
        "ttfc_s": distribution([r.ttfc_s for r in ok if r.ttfc_s is not None]),
    }


def _ms_line(name: str, dist: dict) -> str:
    cells = [f"p{q} {dist[f'p{q}'] * 1e3:9.1f}" if dist[f"p{q}"] is not None else f"p{q}       n/a"
             for q in PERCENTILES]
    return f"{name:<24}" + "  ".join(cells)


def format_report(summary: dict, cfg: BenchConfig) -> str:
    rps, tps = summary["requests_per_s"] or 0.0, summary["output_tokens_per_s"] or 0.0
    by_status = ", ".join(f"{k}: {v}" for k, v in sorted(summary["errors_by_status"].items()))
    chunks = summary["mean_chunks_per_request"]
    lines = [
        f"model {cfg.model} | {'chat' if cfg.chat else 'completions'} | stream {cfg.stream} | "
        f"concurrency {cfg.concurrency} | prompt ~{cfg.prompt_len} words | max_tokens {cfg.output_len}",
        f"requests {summary['completed']}/{summary['num_requests']} ok, {summary['errors']} errors"
        f"{f' ({by_status})' if by_status else ''} in {summary['wall_s']:.2f} s",
        f"throughput              {rps:.2f} req/s  {tps:.1f} output tok/s "
        f"({summary['output_tokens_source']})"
        + (f"  {chunks:.1f} chunks/request" if cfg.stream and chunks is not None else ""),
        _ms_line("time to first chunk ms", summary["ttfc_s"]),
        _ms_line("latency ms", summary["latency_s"]),
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", default="http://127.0.0.1:8000/v1",
                   help="OpenAI base URL, including /v1")
    p.add_argument("--model", default=None, help="model id (default: the first from GET /models)")
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=64, help="prompt length in words (~tokens)")
    p.add_argument("--output-len", type=int, default=64, help="max_tokens of every request")
    p.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--stream-usage", action=argparse.BooleanOptionalAction, default=True,
                   help="send stream_options.include_usage (turn off for servers that refuse it)")
    p.add_argument("--chat", action="store_true", help="use /chat/completions")
    p.add_argument("--api-key", default=None,
                   help="Bearer key (default: the OPENAI_API_KEY environment variable, if set)")
    p.add_argument("--extra-body", type=json.loads, default={},
                   help='JSON object merged into each body, e.g. \'{"steps": 64, "threshold": 0.9}\'')
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--timeout", type=float, default=600.0, help="per-request timeout, seconds")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic prompts")
    p.add_argument("--warmup", type=int, default=0, help="untimed requests sent first, one by one")
    p.add_argument("--out", default=None, help="write the summary and per-request records here")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if min(args.num_requests, args.concurrency, args.prompt_len, args.output_len) < 1:
        p.error("--num-requests, --concurrency, --prompt-len and --output-len must be >= 1")
    if args.warmup < 0:
        p.error("--warmup must be >= 0")
    if not isinstance(args.extra_body, dict):
        p.error(f"--extra-body must be a JSON object, got {args.extra_body!r}")
    return args


def config_from_args(args: argparse.Namespace) -> BenchConfig:
    return BenchConfig(
        base_url=args.base_url, model=args.model, num_requests=args.num_requests,
        concurrency=args.concurrency, prompt_len=args.prompt_len, output_len=args.output_len,
        stream=args.stream, stream_usage=args.stream_usage, chat=args.chat,
        api_key=args.api_key if args.api_key is not None else os.environ.get("OPENAI_API_KEY"),
        extra_body=args.extra_body, temperature=args.temperature, timeout_s=args.timeout,
        seed=args.seed, warmup=args.warmup, progress=not args.no_progress)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    cfg = config_from_args(args)
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    results, wall = asyncio.run(run_benchmark(cfg))
    summary = summarize(results, wall)
    print(format_report(summary, cfg))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        config = {k: v for k, v in asdict(cfg).items() if k != "api_key"}
        meta = {"command": " ".join(sys.argv), "started_at": started,
                "python": sys.version.split()[0]}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "config": config, "summary": summary,
                       "requests": [asdict(r) for r in results]}, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
