"""The task suite: answers are right, the stream is seeded, train and held-out never overlap;
the character tokenizer round-trips and renders LLaDA's chat layout."""
from __future__ import annotations

import itertools

import pytest

from dfastllm_ray.train import tasks
from dfastllm_ray.train.tokenizer import BOS, EOT, IM_END, save_tokenizer

N = 2000


def take(split: str, seed: int, n: int = N) -> list[tasks.Example]:
    return list(itertools.islice(tasks.stream(split, seed), n))


def check_answer(ex: tasks.Example) -> str:
    """An independent solver for every task, from the prompt text alone."""
    words = ex.prompt.split()
    if ex.task == "add":
        a, b = map(int, words[1].split("+"))
        return f"{a + b:03d}"                                # fixed-width answers
    if ex.task == "sort":
        return "".join(sorted(words[1]))
    if ex.task == "reverse":
        return words[1][::-1]
    if ex.task == "copy":
        return words[1]
    if ex.task == "greet":
        assert not words or words[0].lower() not in tasks.TASKS   # never a task's format
        return tasks.GREETING
    raise AssertionError(ex.task)


def test_answers_are_correct():
    for ex in take("train", 0) + take("heldout", 0):
        assert check_answer(ex) == ex.answer, ex


def test_each_task_has_one_prompt_and_answer_width():
    """Fixed widths keep answer position j at a constant offset from its source (see tasks.py)."""
    for name in set(tasks.TASKS) - {"greet"}:
        exs = [e for e in take("train", 0, 700) if e.task == name]
        assert len({len(e.prompt) for e in exs}) == 1 and len({len(e.answer) for e in exs}) == 1, name


def test_splits_never_overlap_for_any_seed():
    train = {e.prompt for seed in (0, 1, 2) for e in take("train", seed)}
    heldout = {e.prompt for seed in (0, 1) for e in take("heldout", seed)}
    assert train and heldout and not train & heldout
    assert all(tasks.is_heldout(p) for p in heldout)
    assert not any(tasks.is_heldout(p) for p in train)


def test_stream_is_seeded_and_round_robin():
    assert take("train", 3, 50) == take("train", 3, 50)
    assert take("train", 3, 50) != take("train", 4, 50)
    names = [e.task for e in take("train", 0, 3 * len(tasks.TASKS))]
    assert names == list(tasks.TASKS) * 3


def test_weighted_stream_follows_weights_and_resumes():
    s = tasks.stream("train", 0, weights=tasks.WEIGHTS)
    first = [next(s) for _ in range(5000)]
    total = sum(tasks.WEIGHTS.values())
    for name, w in tasks.WEIGHTS.items():
        share = sum(e.task == name for e in first) / len(first)
        assert abs(share - w / total) < 0.03, (name, share)
    state = s.state()
    ahead = [next(s) for _ in range(20)]
    again = tasks.stream("train", 0, weights=tasks.WEIGHTS)
    again.restore(state)
    assert [next(again) for _ in range(20)] == ahead


def test_greeting_names_prompts_the_suite_answers():
    """The reply a user gets to "Hello" suggests two prompts in the task formats."""
    for prompt in ("add 47+85", "sort 31842"):
        assert prompt in tasks.GREETING
        task = prompt.split()[0]
        ex = tasks.Example(task, prompt, "")
        assert check_answer(ex) in ("132", "12348")


def test_heldout_set_is_distinct_and_balanced():
    ex = tasks.heldout_set(30, seed=0)
    assert len(ex) == 30 * len(tasks.TASKS)       # greet has more than 30 held-out prompts
    assert len({e.prompt for e in ex}) == len(ex)
    assert {t: sum(e.task == t for e in ex) for t in tasks.TASKS} == dict.fromkeys(tasks.TASKS, 30)


def test_bad_split_names_the_field():
    with pytest.raises(ValueError, match="split='test'"):
        next(tasks.stream("test", 0))


def test_tokenizer_loads_with_auto_tokenizer(tmp_path):
    from transformers import AutoTokenizer
    ids = save_tokenizer(tmp_path, 128)
    tok = AutoTokenizer.from_pretrained(str(tmp_path))
    assert tok.mask_token_id == ids["mask"] and tok.eos_token_id == ids["eos"]
    assert tok.bos_token_id == ids["bos"] and tok.convert_tokens_to_ids(EOT) == ids["eot"]
    for ex in take("train", 0, 200):
        enc = tok.encode(ex.prompt, add_special_tokens=False)
        assert len(enc) == len(ex.prompt)                   # one token per character
        assert tok.decode(enc) == ex.prompt
    text = tok.apply_chat_template([{"role": "user", "content": " add 1+2 "}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == (f"{BOS}<|start_header_id|>user<|end_header_id|>\n\nadd 1+2{EOT}"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_dream_flavor_renders_dream_instruct_layout(tmp_path):
    from transformers import AutoTokenizer
    llada = save_tokenizer(tmp_path / "l", 128)
    dream = save_tokenizer(tmp_path / "d", 128, "dream")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "d"))
    assert tok.mask_token == "<|mask|>" and tok.bos_token == "<|beginoftext|>"
    assert tok.convert_tokens_to_ids(IM_END) == dream["eot"]
    assert dream["eos"] == llada["eos"] and dream["vocab_size"] == llada["vocab_size"]
    text = tok.apply_chat_template([{"role": "user", "content": "add 1+2"}],
                                   add_generation_prompt=True, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                    "<|im_start|>user\nadd 1+2<|im_end|>\n<|im_start|>assistant\n")
