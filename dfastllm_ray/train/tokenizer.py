"""A character-level tokenizer with LLaDA-Instruct's special tokens and chat template.

One token per printable ASCII character (plus newline and tab), so every task answer is spelled
character by character (reversing and counting stay exact). As in LLaDA's BPE vocabulary, the
chat roles and the blank line after a header are single tokens (`WORDS`): the template costs 10
tokens instead of 33, which keeps answers close to the prompt text they are computed from. The
files load with `transformers.AutoTokenizer.from_pretrained(folder)`, like LLaDA-8B-Instruct's.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

BOS, EOS, MASK = "<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>"
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
UNK = "<|unk|>"
SPECIALS = (BOS, EOS, START_HEADER, END_HEADER, EOT, UNK, MASK)   # ids follow the characters
CHARS = sorted(set(string.printable) - set("\r\x0b\x0c"))          # 95 printable + "\n" + "\t"
WORDS = ("user", "assistant", "system", "\n\n")  # whole-word tokens, matched before characters

# LLaDA-8B-Instruct's layout: bos, then per message "<|start_header_id|>role<|end_header_id|>\n\n"
# + content.strip() + "<|eot_id|>"; the generation prompt opens the assistant header.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)


def build_tokenizer() -> Tokenizer:
    """Word-level model over single characters: the pre-tokenizer isolates every character."""
    vocab = {c: i for i, c in enumerate(CHARS)}
    for s in WORDS + SPECIALS:
        vocab[s] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tok.decoder = decoders.Fuse()                  # join characters with no separator
    tok.add_tokens([AddedToken(w, normalized=False) for w in WORDS])
    tok.add_special_tokens(list(SPECIALS))
    return tok


def tokenizer_config(model_max_length: int) -> dict:
    """The `tokenizer_config.json` fields `AutoTokenizer` reads (class, specials, chat template)."""
    tok = build_tokenizer()
    decoder = {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
               for s in SPECIALS}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": UNK,
        "mask_token": MASK,
        "additional_special_tokens": [START_HEADER, END_HEADER, EOT],
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def save_tokenizer(folder: str | Path, model_max_length: int) -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json; return the special ids the config needs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    cfg = tokenizer_config(model_max_length)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return special_ids(tok)


def special_ids(tok: Tokenizer | None = None) -> dict[str, int]:
    tok = tok or build_tokenizer()
    names = {"bos": BOS, "eos": EOS, "mask": MASK, "eot": EOT,
             "start_header": START_HEADER, "end_header": END_HEADER}
    out = {k: tok.token_to_id(v) for k, v in names.items()}
    out["vocab_size"] = tok.get_vocab_size()
    return out
