"""`LLM`: the offline API (vLLM's `LLM` shape) over the same `Engine` the server uses.

    from dfastllm_ray import LLM, SamplingParams
    llm = LLM(model="dfastllm_ray/assets/tiny-llada", kv_cache_mode="dual")
    outs = llm.generate(["Hello"], SamplingParams(max_tokens=32, threshold=0.9))
    print(outs[0].text, outs[0].nfe)

Hybrid diffusion-AR decoding (docs/hybrid.md) needs a causal verifier sharing the tokenizer:

    llm = LLM("Dream-org/Dream-v0-Instruct-7B", verifier="Qwen/Qwen2.5-0.5B")
    llm.generate(["Hi"], SamplingParams(max_tokens=64, decoding="apd", apd_mixture_weight=0.7))

All prompts are submitted at once and decoded with step-level continuous batching; the results
come back in prompt order.
"""
from __future__ import annotations

import itertools
import os
from typing import Sequence

from tqdm.auto import tqdm

from .engine.config import EngineConfig
from .engine.engine import Engine
from .engine.outputs import RequestOutput
from .models.loader import LoadedModel, load_model
from .output_limit import OutputCut
from .sampling.defaults import generation_defaults
from .sampling.params import SamplingParams

ParamsArg = SamplingParams | Sequence[SamplingParams] | None


class LLM:
    def __init__(self, model: str | LoadedModel, dtype: str = "auto", device: str = "auto",
                 verifier: str | LoadedModel | None = None, **engine_kwargs):
        """model: a checkpoint folder, hub id, or an already loaded model. verifier: a causal LM
        (Qwen2 layout) over the same tokenizer, for `decoding="apd" | "speculative"` requests;
        loaded with the same dtype and on the same device. engine_kwargs: `EngineConfig` fields
        (kv_cache_mode, max_num_seqs, page_size, enable_prefix_caching, ...)."""
        loaded = model if isinstance(model, LoadedModel) else load_model(model, dtype, device)
        if isinstance(verifier, (str, os.PathLike)):
            verifier = load_model(verifier, loaded.dtype, str(loaded.device))
        self.engine = Engine(loaded, EngineConfig(dtype=dtype, device=device, **engine_kwargs),
                             verifier=verifier)
        self.tokenizer = loaded.tokenizer
        # what a call without sampling_params decodes with: the checkpoint's generation_config
        # (the same defaults the Serve replica applies to a request that leaves settings out)
        self.default_params = SamplingParams(**generation_defaults(loaded.generation_defaults, {}))
        self._ids = itertools.count()

    def generate(self, prompts: str | Sequence[str] | None = None, sampling_params: ParamsArg = None,
                 prompt_token_ids: Sequence[Sequence[int]] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Texts (tokenized with the model's tokenizer) or token-id lists -> finished outputs."""
        if (prompts is None) == (prompt_token_ids is None):
            raise ValueError("pass exactly one of prompts= (text) or prompt_token_ids= (ids)")
        if prompts is not None:
            texts = [prompts] if isinstance(prompts, str) else list(prompts)
            prompt_token_ids = [self.engine.encode(t) for t in texts]
        return self._run([list(ids) for ids in prompt_token_ids], sampling_params, use_tqdm)

    def chat(self, messages: list[dict] | list[list[dict]], sampling_params: ParamsArg = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """One conversation (a list of {"role", "content"}) or several, through the checkpoint's
        chat template with the assistant turn opened."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model's tokenizer has no chat template: use generate()")
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        texts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True, tokenize=False)
                 for c in convs]
        return self.generate(texts, sampling_params, use_tqdm=use_tqdm)

    def _run(self, prompts: list[list[int]], sampling_params: ParamsArg,
             use_tqdm: bool) -> list[RequestOutput]:
        params = _per_prompt(sampling_params or self.default_params, len(prompts))
        order, cuts = [], {}
        try:
            for ids, p in zip(prompts, params):
                order.append(f"llm-{next(self._ids)}")
                # resolved here too, so a max_tokens off the block grid is cut where asked
                p = self.engine.resolve_params(p, len(ids))
                cuts[order[-1]] = OutputCut(p.output_limit, self.engine.detokenizer.decode)
                self.engine.add_request(order[-1], ids, p)
        except Exception:                 # a bad prompt: withdraw the ones already queued
            for rid in order:
                self.engine.abort(rid)
            raise
        finals: dict[str, RequestOutput] = {}
        with tqdm(total=len(order), desc="generating", unit="req", disable=not use_tqdm) as bar:
            while self.engine.has_unfinished():
                for raw in self.engine.step():
                    out = cuts[raw.request_id](raw)
                    if out.finished and raw.request_id not in finals:
                        finals[raw.request_id] = out
                        bar.update(1)
                        if not raw.finished:
                            self.engine.abort(raw.request_id)
        return [finals[rid] for rid in order]


def _per_prompt(sampling_params: ParamsArg, n: int) -> list[SamplingParams]:
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * n
    params = list(sampling_params)
    if len(params) != n:
        raise ValueError(f"sampling_params has {len(params)} entries for {n} prompts: pass one, "
                         "or one per prompt")
    return params
