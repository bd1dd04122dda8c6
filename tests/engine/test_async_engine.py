"""AsyncEngine: streams per committed block, concurrency == alone, abort, errors, health, and a
step loop that never blocks the event loop. Also the offline LLM API and the CLI."""
from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

import dfastllm_ray
from dfastllm_ray.engine.async_engine import AsyncEngine, EngineDeadError
from dfastllm_ray.generate import main as cli_main
from dfastllm_ray.llm import LLM
from dfastllm_ray.sampling.params import SamplingParams
from engine_models import REFERENCE, engine, run_all, tiny

PARAMS = SamplingParams(max_tokens=24, block_length=8, steps=24)
PROMPTS = {f"p{i}": list(range(3 + i, 9 + 3 * i)) for i in range(5)}


@pytest.fixture
def async_engine():
    eng = AsyncEngine(engine("llada-tiny", "dual"))
    yield eng
    eng.shutdown()


async def collect(eng: AsyncEngine, prompt, params=PARAMS, rid=None):
    return [out async for out in eng.generate(prompt, params, rid)]


def test_streams_one_output_per_block_and_matches_the_engine(async_engine):
    alone = run_all(engine("llada-tiny", "dual"), {"x": (PROMPTS["p0"], PARAMS)})["x"]
    outs = asyncio.run(collect(async_engine, PROMPTS["p0"]))
    assert len(outs) == 3 and [o.finished for o in outs] == [False, False, True]
    assert sum((o.delta_token_ids for o in outs), []) == outs[-1].token_ids == alone.token_ids
    assert outs[-1].nfe == alone.nfe and outs[-1].finish_reason == "length"


def test_concurrent_streams_equal_each_request_alone(async_engine):
    alone = run_all(engine("llada-tiny", "dual"), {k: (v, PARAMS) for k, v in PROMPTS.items()})

    async def main():
        results = await asyncio.gather(*(collect(async_engine, v, rid=k) for k, v in PROMPTS.items()))
        return {k: r[-1] for k, r in zip(PROMPTS, results)}

    finals = asyncio.run(main())
    assert {k: o.token_ids for k, o in finals.items()} == {k: o.token_ids for k, o in alone.items()}


def test_event_loop_keeps_running_while_the_engine_steps(async_engine):
    async def main():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await collect(async_engine, PROMPTS["p4"], SamplingParams(max_tokens=32, steps=32))
        task.cancel()
        return ticks

    assert asyncio.run(main()) > 100


def test_abort_ends_the_stream_and_frees_pages(async_engine):
    async def main():
        outs = []
        long = SamplingParams(max_tokens=256, block_length=8, steps=256)   # far from done at block 1
        async for out in async_engine.generate(PROMPTS["p1"], long, "victim"):
            outs.append(out)
            if len(outs) == 1:
                await async_engine.abort("victim")
        return outs

    outs = asyncio.run(main())
    assert outs[-1].finished and outs[-1].finish_reason == "abort"
    asyncio.run(collect(async_engine, PROMPTS["p2"]))        # the loop goes on
    pool = async_engine.engine.pool
    assert async_engine.engine.scheduler.allocator.num_free_pages == pool.num_pages


def test_leaving_the_iteration_early_aborts(async_engine):
    async def main():
        agen = async_engine.generate(PROMPTS["p3"], PARAMS, "quitter")
        await agen.__anext__()
        await agen.aclose()
        await collect(async_engine, PROMPTS["p0"])           # a step after the abort command

    asyncio.run(main())
    assert not async_engine.engine.has_unfinished()
    assert async_engine.stats()["free_pages"] == async_engine.engine.pool.num_pages


def test_bad_request_fails_its_caller_not_the_loop(async_engine):
    with pytest.raises(ValueError, match="max_tokens"):
        asyncio.run(collect(async_engine, [1, 2], SamplingParams(max_tokens=5000)))
    async_engine.check_health()
    assert asyncio.run(collect(async_engine, [1, 2]))[-1].finished


def test_shutdown_marks_the_engine_dead():
    eng = AsyncEngine(engine("llada-tiny", "none"))
    eng.shutdown()
    with pytest.raises(EngineDeadError):
        eng.check_health()


def test_llm_generate_keeps_prompt_order_and_per_prompt_params():
    llm = LLM(tiny("llada-tiny"), kv_cache_mode="prefix", page_size=4)
    ids = list(PROMPTS.values())
    params = [SamplingParams(max_tokens=8 * (i + 1), steps=8 * (i + 1)) for i in range(len(ids))]
    outs = llm.generate(prompt_token_ids=ids, sampling_params=params, use_tqdm=False)
    assert [len(o.token_ids) <= 8 * (i + 1) for i, o in enumerate(outs)] == [True] * len(ids)
    assert [o.num_prompt_tokens for o in outs] == [len(p) for p in ids]
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate(use_tqdm=False)
    with pytest.raises(ValueError, match="one per prompt"):
        llm.generate(prompt_token_ids=ids, sampling_params=params[:2], use_tqdm=False)


def test_cli_prints_ids_finish_reason_and_nfe(capsys):
    rc = cli_main(["--model", str(REFERENCE / "llada-tiny"), "--prompt-ids", "5,6,7",
                   "--max-tokens", "16", "--threshold", "0.7", "--json", "--device", "cpu"])
    record = json.loads(capsys.readouterr().out.strip())
    assert rc == 0 and record["finish_reason"] in ("length", "stop") and record["nfe"] >= 1
    assert len(record["token_ids"]) <= 16


ASSET = Path(dfastllm_ray.__file__).parent / "assets" / "tiny-llada"


@pytest.mark.skipif(not ASSET.is_dir(), reason="the shipped tiny model is not built yet")
def test_llm_chat_and_text_prompts_on_the_shipped_tiny_model():
    llm = LLM(str(ASSET), device="cpu")
    params = SamplingParams(max_tokens=32, block_length=16, steps=32, stop=("\n\n",))
    chat = llm.chat([{"role": "user", "content": "What is 2 + 3?"}], params, use_tqdm=False)[0]
    text = llm.generate("2 + 3 =", params, use_tqdm=False)[0]
    for out in (chat, text):
        assert out.finished and isinstance(out.text, str) and "\n\n" not in out.text
        assert out.text == llm.tokenizer.decode(out.token_ids, skip_special_tokens=True)[:len(out.text)]
