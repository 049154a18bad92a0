"""Phase 2, the tokenizer: a byte-level BPE with the chat template's special tokens, saved and reloaded as a
transformers `PreTrainedTokenizerFast`, and `encode` of texts into one token tensor."""

from __future__ import annotations

from pathlib import Path

import torch

from training.corpus import SYSTEM_PROMPT, render_chat

SPECIALS = ["<unk>", "<s>", "</s>", "<pad>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}{% endif %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<pad>", additional_special_tokens=SPECIALS[4:],
                                   model_max_length=512, clean_up_tokenization_spaces=False)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def save_tokenizer(tok, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json, with the chat template inside the config (not a .jinja file)."""
    (out / "chat_template.jinja").unlink(missing_ok=True)
    tok.save_pretrained(str(out), save_jinja_files=False)


def load_tokenizer(folder: Path):
    """A tokenizer saved by `save_tokenizer` (another embedded model's), for a model that shares it."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def check_tokenizer(out: Path) -> dict:
    """Reload the saved tokenizer the way users will and check the chat template round-trips."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": "What is a list?"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == render_chat(messages, generation_prompt=True), text
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    return {t: tok.convert_tokens_to_ids(t) for t in SPECIALS}


def encode(tok, texts: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for start in range(0, len(texts), 2048):
        for row in tok(texts[start:start + 2048], add_special_tokens=False)["input_ids"]:
            ids.extend(row)
    return torch.tensor(ids, dtype=torch.long)
