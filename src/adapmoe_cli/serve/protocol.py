"""The OpenAI API's request bodies as pydantic models (types checked strictly: a string where a number
belongs is a 400, not a guess), the error shape every failure is answered in, and the checks that need the
model (context, vocabulary). Fields other servers accept but that change nothing here (`user`, `store`,
`metadata`, …) are ignored; fields that would change the answer and are not implemented are refused by name."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class ApiError(Exception):
    """An answer in OpenAI's error shape: `{"error": {"message", "type", "code", "param"}}`."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "code": self.code, "param": self.param}}


#: the longest stop sequence taken: each token's check costs the square of its length (a stop of a million
#: characters held the worker, and every request behind it, for 50 s for three tokens)
MAX_STOP_CHARS = 256
#: the most prompts one completions request may hold (1.5 million ran for minutes after the client left)
MAX_PROMPTS = 1024
StopText = Annotated[str, Field(max_length=MAX_STOP_CHARS)]


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str
    max_tokens: Annotated[int, Field(ge=0)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2, allow_inf_nan=False)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1, allow_inf_nan=False)] | None = None
    seed: Annotated[int, Field(ge=0, le=2**63 - 1)] | None = None  # (the runtime's range: a 500 before)
    stop: StopText | Annotated[list[StopText], Field(max_length=4)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] = 1
    frequency_penalty: Annotated[float, Field(allow_inf_nan=False)] = 0.0
    presence_penalty: Annotated[float, Field(allow_inf_nan=False)] = 0.0
    # extensions vLLM and llama-server accept too
    ignore_eos: bool = False  # decode `max_tokens` whatever comes
    top_k: Annotated[int, Field(ge=0)] = 0  # 0: off
    repetition_penalty: Annotated[float, Field(gt=0, le=10, allow_inf_nan=False)] = 1.0  # 1: off

    def unsupported(self) -> None:
        """Refuse, by name, what would change the answer and is not done here."""
        if self.n != 1:
            raise ApiError(400, "n > 1 is not supported: one choice per request", param="n")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise ApiError(400, f"{name} is not supported (give 0 or leave it out)", param=name)
        for name in ("logit_bias", "tools", "functions", "response_format", "suffix", "best_of"):
            value = (self.model_extra or {}).get(name)
            if value not in (None, [], {}, 1) and not (name == "response_format" and value == {"type": "text"}):
                raise ApiError(400, f"{name} is not supported by this server", param=name)

    @property
    def stops(self) -> tuple[str, ...]:
        stops = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not s for s in stops):
            raise ApiError(400, "stop sequences must not be empty", param="stop")
        return stops


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    include_usage: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(_Request):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None

    def template_messages(self) -> list[dict[str, str]]:
        return [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in self.messages]


class CompletionRequest(_Request):
    prompt: (str | list[int] | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[list[int]], Field(min_length=1, max_length=MAX_PROMPTS)])
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and (not p or isinstance(p[0], int))):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


_Request.model_rebuild()
ChatRequest.model_rebuild()
CompletionRequest.model_rebuild()


#: how pydantic names the branch of a union (`str`, `list[str]`, …) in an error's location
_BRANCH = re.compile(r"^(str|int|float|bool|constrained-\w+|list\[.*\]|dict\[.*\])$")


def error_message(errors: list[Any]) -> tuple[str, str | None]:
    """One line from pydantic's validation errors, and the parameter it names: the first one, unless it only
    says a value is not of one branch of a union where another branch says what is wrong with it (five stop
    sequences were "stop.str: Input should be a valid string")."""
    if not errors:
        return "the request body is not valid", None
    e = next((x for x in errors if not str(x.get("type", "")).endswith("_type")), errors[0])
    loc = [str(x) for x in e.get("loc", ()) if x != "body" and not _BRANCH.match(str(x))]
    if e.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if e.get("type") == "missing":
        return f"{'.'.join(loc) or 'a field'} is required", (loc[0] if loc else None)
    where = ".".join(loc) or "the request body"
    return f"{where}: {e.get('msg', 'invalid value')}", (loc[0] if loc else None)
