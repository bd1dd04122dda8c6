"""A character-level tokenizer with LLaDA-Instruct's and Dream-Instruct's special tokens.

One token per printable ASCII character (plus newline and tab), so every task answer is spelled
character by character (reversing and sorting stay exact). As in LLaDA's BPE vocabulary, the chat
roles and the blank line after a header are single tokens (`WORDS`): LLaDA's template costs 10
tokens instead of 33, which keeps answers close to the prompt text they are computed from.

ONE vocabulary serves every tiny model: it holds both families' special tokens, so a content
character, `<|endoftext|>` and `<|eot_id|>` have the same id in the tiny LLaDA, its Dream twin and
the tiny AR model (the AR model verifies the LLaDA's drafts token by token). Each family gets its
own `tokenizer_config.json` (`FLAVORS`): its BOS, mask token and chat template, as the real
LLaDA-8B-Instruct and Dream-v0-Instruct-7B folders name them. The files load with
`transformers.AutoTokenizer.from_pretrained(folder)`.
"""
from __future__ import annotations

import json
import string
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

EOS, UNK = "<|endoftext|>", "<|unk|>"                      # shared by both families
BOS, MASK = "<|startoftext|>", "<|mdm_mask|>"              # LLaDA
START_HEADER, END_HEADER, EOT = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
DREAM_BOS, DREAM_MASK = "<|beginoftext|>", "<|mask|>"      # Dream (Qwen2 chat markup)
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# ids follow the characters and words; the first seven keep the ids of the first tiny LLaDA
SPECIALS = (BOS, EOS, START_HEADER, END_HEADER, EOT, UNK, MASK,
            DREAM_BOS, IM_START, IM_END, DREAM_MASK)
CHARS = sorted(set(string.printable) - set("\r\x0b\x0c"))          # 95 printable + "\n" + "\t"
WORDS = ("user", "assistant", "system", "\n\n")  # whole-word tokens, matched before characters

# LLaDA-8B-Instruct's layout: bos, then per message "<|start_header_id|>role<|end_header_id|>\n\n"
# + content.strip() + "<|eot_id|>"; the generation prompt opens the assistant header.
LLADA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{{ message['content'] | trim }}{{ '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)
CHAT_TEMPLATE = LLADA_TEMPLATE               # the name the first version exported
# Dream-v0-Instruct-7B's (Qwen2.5's, without tool calls): a default system message, then
# "<|im_start|>role\n" + content + "<|im_end|>\n" per message.
DREAM_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{% else %}{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{% for message in messages %}{% if not (message['role'] == 'system' and loop.first) %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Flavor:
    """What differs between the families' tokenizer folders (the vocabulary does not)."""
    bos: str
    mask: str
    eot: str                 # end of an assistant turn
    template: str
    extra_specials: tuple[str, ...]     # additional_special_tokens in tokenizer_config.json


FLAVORS = {
    "llada": Flavor(BOS, MASK, EOT, LLADA_TEMPLATE, (START_HEADER, END_HEADER, EOT)),
    "dream": Flavor(DREAM_BOS, DREAM_MASK, IM_END, DREAM_TEMPLATE, (IM_START, IM_END)),
}


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


def flavor(name: str) -> Flavor:
    if name not in FLAVORS:
        raise ValueError(f"tokenizer flavor={name!r} is unknown: choose from {list(FLAVORS)}")
    return FLAVORS[name]


def tokenizer_config(model_max_length: int, flavor_name: str = "llada") -> dict:
    """The `tokenizer_config.json` fields `AutoTokenizer` reads (class, specials, chat template)."""
    tok, fl = build_tokenizer(), flavor(flavor_name)
    decoder = {str(tok.token_to_id(s)): {"content": s, "lstrip": False, "normalized": False,
                                          "rstrip": False, "single_word": False, "special": True}
               for s in SPECIALS}
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": decoder,
        "bos_token": fl.bos, "eos_token": EOS, "pad_token": EOS, "unk_token": UNK,
        "mask_token": fl.mask,
        "additional_special_tokens": list(fl.extra_specials),
        "chat_template": fl.template,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "model_input_names": ["input_ids", "attention_mask"],
    }


def save_tokenizer(folder: str | Path, model_max_length: int,
                   flavor_name: str = "llada") -> dict[str, int]:
    """Write tokenizer.json + tokenizer_config.json; return the special ids the config needs."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    cfg = tokenizer_config(model_max_length, flavor_name)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return special_ids(tok, flavor_name)


def special_ids(tok: Tokenizer | None = None, flavor_name: str = "llada") -> dict[str, int]:
    tok, fl = tok or build_tokenizer(), flavor(flavor_name)
    names = {"bos": fl.bos, "eos": EOS, "mask": fl.mask, "eot": fl.eot,
             "start_header": START_HEADER, "end_header": END_HEADER}
    out = {k: tok.token_to_id(v) for k, v in names.items()}
    out["vocab_size"] = tok.get_vocab_size()
    return out
