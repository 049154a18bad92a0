"""A multi-turn conversation over an engine: applies the tokenizer's chat template, keeps the KV cache
between turns (reusing the longest common token prefix), makes room in the context by dropping the
oldest turns, and keeps a transcript with each answer's statistics. Knows nothing of terminals; the chat
command renders what `send` yields."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from adapmoe_cli.errors import StoreError, UsageError
from adapmoe_cli.runtime.engine import Engine
from adapmoe_cli.runtime.generate import PrefixKV, Response, eos_ids, stream_generate
from adapmoe_cli.settings import GenerationSettings
from adapmoe_cli.store import Store

#: the side files a tokenizer is built from (generation_config.json is read by `generate.eos_ids`)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json")


def load_tokenizer(store: Store) -> Any:
    """The store's tokenizer, built from the files its manifest lists, checked, copied into a private
    folder: nothing else beside them (an unlisted chat template, a `.py` file) is seen, and no code from the
    store ever runs (`trust_remote_code=False`: a tokenizer that needs its own code is refused)."""
    import tempfile

    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="adapmoe-tokenizer-") as tmp:
        for name in TOKENIZER_FILES:
            data = store.side_file(name)
            if data is not None:
                (Path(tmp) / name).write_bytes(data)
        try:
            tokenizer = AutoTokenizer.from_pretrained(tmp, trust_remote_code=False, local_files_only=True)
        except ValueError as e:
            if "trust_remote_code" in str(e) or "custom code" in str(e):
                raise StoreError(f"the tokenizer of {store.path} needs code of its own (auto_map in "
                                 "tokenizer_config.json); adapmoe never runs code from a store") from None
            raise UsageError(f"the store has no usable tokenizer ({_first_line(e)}); re-shard from a checkpoint "
                             "with one") from None
        except (OSError, KeyError, TypeError, AttributeError, ImportError) as e:
            raise UsageError(f"the store has no usable tokenizer ({_first_line(e)}); re-shard from a checkpoint "
                             "with one") from None
    # the context is adapmoe's to enforce (one line, naming what fills it): without this, encoding a text longer
    # than the tokenizer's model_max_length prints transformers' warning above that line
    tokenizer.model_max_length = 1 << 62
    return tokenizer


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def clean_text(text: str) -> str:
    """User text as the tokenizer can take it: bytes that were not UTF-8 (Python keeps them as lone
    surrogates, e.g. a Latin-1 `é` on stdin) become U+FFFD; NUL and other text pass as they are."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")  # the bytes that came in
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")  # other lone surrogates: each becomes U+FFFD
    return raw.decode("utf-8", "replace")


def chat_ids(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """The chat template applied to `messages`, ending with the assistant's turn about to start."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "input_ids"):
        ids = ids["input_ids"]
    return list(ids)


@dataclass(frozen=True)
class Room:
    """What `Conversation.make_room` did: turns dropped to fit the context, and the answer's token limit."""

    dropped_turns: int
    max_new_tokens: int


@dataclass
class Conversation:
    engine: Engine
    tokenizer: Any
    gen: GenerationSettings
    system: str | None = None
    raw: bool = False  # plain continuation, no chat template
    messages: list[dict[str, Any]] = field(default_factory=list)
    _kv: PrefixKV = field(init=False, repr=False)  # the KV cache and the token ids it holds

    def __post_init__(self) -> None:
        self.system = clean_text(self.system) if self.system is not None else None
        if not self.raw and not getattr(self.tokenizer, "chat_template", None):
            raise UsageError("this model's tokenizer has no chat template; use --raw for plain continuation")
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []
        self._kv = PrefixKV(self.engine)

    @property
    def _cached(self) -> list[int]:
        return self._kv.ids

    def _prompt_ids(self, user: str) -> list[int]:
        user = clean_text(user)
        if self.raw:
            return self._cached + self.tokenizer.encode(user, add_special_tokens=not self._cached)
        return chat_ids(self.tokenizer, [*self.template_messages(), {"role": "user", "content": user}])

    @property
    def max_context(self) -> int:
        """Tokens the conversation may hold: the model's context, or less with `--ctx`."""
        model = int(self.engine.store.config.get("max_position_embeddings", 1 << 30))
        return min(model, self.gen.context) if self.gen.context else model

    @property
    def context_used(self) -> int:
        """Tokens the KV cache holds now (the conversation so far)."""
        return len(self._cached)

    def make_room(self, user: str) -> Room:
        """Make `user`'s turn fit the context: drop the oldest turns (never the system message) until the
        prompt and `max_new_tokens` fit, and if the message is still too long for a full answer, shorten
        the answer. Refuses (UsageError, naming what fills the context) a message that alone fills it, before
        anything is dropped: the conversation stays as it was."""
        n = len(self._prompt_ids(user))
        if n + self.gen.max_new_tokens <= self.max_context:
            return Room(0, self.gen.max_new_tokens)
        alone = len(self._alone_ids(user))
        if alone >= self.max_context:
            raise UsageError(self._too_long(alone))
        dropped = 0
        while n + self.gen.max_new_tokens > self.max_context:
            turns = [i for i, m in enumerate(self.messages) if m["role"] != "system"]
            if not turns:
                break
            if self.raw:  # a plain continuation has no turns to drop: start over from this text
                self.reset()
            else:
                del self.messages[turns[0]:turns[0] + 2]  # the oldest user message and its answer
            dropped += 1
            n = len(self._prompt_ids(user))
        return Room(dropped, min(self.gen.max_new_tokens, self.max_context - n))

    def _alone_ids(self, user: str) -> list[int]:
        """The prompt of `user` with every earlier turn dropped (the system message kept)."""
        if self.raw:
            return self.tokenizer.encode(clean_text(user), add_special_tokens=True)
        system = [m for m in self.messages if m["role"] == "system"]
        return chat_ids(self.tokenizer, [*system, {"role": "user", "content": clean_text(user)}])

    def _too_long(self, n: int) -> str:
        """Why a prompt of `n` tokens with no earlier turn does not fit: the system message, the ctx setting or
        the message itself."""
        system = len(self.tokenizer.encode(self.system, add_special_tokens=False)) if self.system else 0
        if system * 2 >= n:
            return (f"the system message is {system} tokens, and with this message it fills the context of "
                    f"{self.max_context}; shorten it (/set system TEXT, or /set system alone to clear it)")
        limit = " (the ctx setting: raise it with /set ctx)" if self.gen.context else ""
        return f"this message is {n} tokens, more than the context of {self.max_context}{limit}; shorten it"

    def send(self, user: str, max_new_tokens: int | None = None) -> Iterator[Response]:
        """Stream the answer to `user` (at most `max_new_tokens`, default the settings'). If the caller
        stops early (Ctrl-C), the KV cache is cut back to what is consistent and the partial answer is kept
        in the transcript."""
        user = clean_text(user)
        gen = self.gen if max_new_tokens is None else replace(self.gen, max_new_tokens=max_new_tokens)
        full = self._prompt_ids(user)
        if len(full) + gen.max_new_tokens > self.max_context:
            raise UsageError(
                f"the conversation ({len(full)} tokens) plus --max-new-tokens ({gen.max_new_tokens}) exceeds the "
                f"context of {self.max_context} tokens; shorten the prompt or lower --max-new-tokens"
            )
        kv = self._kv
        common = kv.start(full)
        new = full[common:]
        last: Response | None = None
        generated: list[int] = []
        stops = eos_ids(self.engine, self.tokenizer)
        try:
            for resp in stream_generate(self.engine, self.tokenizer, new, kv.kv, gen,
                                        history=full[:common], stop_ids=stops):
                kv.fed(new if last is None else generated[-1:])
                generated = resp.token_ids
                last = resp
                yield resp
        finally:
            # the cache holds the prompt and every generated token but the last; a cut-off forward
            # may have appended to some layers only, so trim them all to the consistent length
            kv.settle()
            text = self.tokenizer.decode([t for t in generated if t not in stops], skip_special_tokens=True)
            entry: dict[str, Any] = {"role": "user", "content": user}
            self.messages.append(entry)
            self.messages.append({
                "role": "assistant", "content": text,
                "stats": None if last is None else {
                    "tokens": last.generation_tokens, "tokens_per_s": last.tokens_per_s,
                    "finish_reason": last.finish_reason or "interrupted",
                },
            })

    def set_system(self, text: str | None) -> None:
        """Use another system message from the next turn on (the turns so far stay)."""
        self.system = clean_text(text) if text else None
        rest = [m for m in self.messages if m["role"] != "system"]
        self.messages = ([{"role": "system", "content": self.system}] if self.system else []) + rest

    def transcript(self) -> list[dict[str, Any]]:
        return [dict(m) for m in self.messages]

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": m["role"], "content": m["content"]} for m in self.messages]

