"""lm-eval-harness against the served tiny app: `local-completions` and `local-chat-completions`
run a generative task with their default model settings (no `tokenizer_backend` override:
local-completions finds the server's `/tokenizer_info` and sends token ids; the chat model sends
messages). The task is local (a jsonl file of the tiny model's prompts), so no hub is needed.
`lm_eval[api]` comes with the `test` extra, so CI runs this (a missing install fails here).
"""
from __future__ import annotations

import json

import pytest
from serve_testutil import API_KEY

MODEL = "tiny-llada"
PROMPTS = [("add 47+85", "132"), ("sort 79096", "06799"), ("reverse pcanx", "xnacp"),
           ("copy dfast1", "dfast1"), ("add 12+30", "42"), ("sort 31842", "12348")]
# max_gen_toks 20: off the block grid (block_length 8) on purpose, and within the 256-position
# context (lm-eval's default of 256 would not fit beside a prompt)
TASK = """task: tiny_tasks
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 20
  do_sample: false
metric_list:
  - metric: exact_match
"""


def _task_dir(tmp_path) -> str:
    data = tmp_path / "tiny_tasks.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in PROMPTS))
    (tmp_path / "tiny_tasks.yaml").write_text(TASK.format(data=data))
    return str(tmp_path)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize("model_type, route, chat", [
    ("local-completions", "/v1/completions", False),
    ("local-chat-completions", "/v1/chat/completions", True)])
def test_lm_eval_runs_a_generative_task(serve_url, tmp_path, monkeypatch, model_type, route,
                                        chat):
    import tenacity  # noqa: F401                      # lm_eval[api]: its API models need it
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)      # the session app has auth on
    import lm_eval
    from lm_eval.tasks import TaskManager

    # auth_token: the key for lm-eval's /tokenizer_info probe (a server without keys needs none)
    args = f"model={MODEL},base_url={serve_url}{route},auth_token={API_KEY}"
    out = lm_eval.simple_evaluate(model=model_type, model_args=args, tasks=["tiny_tasks"],
                                  task_manager=TaskManager(include_path=_task_dir(tmp_path)),
                                  apply_chat_template=chat, log_samples=True)
    samples = out["samples"]["tiny_tasks"]
    assert len(samples) == len(PROMPTS)                # every request answered (none refused)
    assert all(isinstance(s["resps"][0][0], str) for s in samples)
    score = out["results"]["tiny_tasks"]["exact_match,none"]
    if chat:            # the tiny model is trained on chat turns: most answers are right
        assert score >= 0.5, samples
