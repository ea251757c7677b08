"""The request and response shapes of the OpenAI-compatible API, plus flexmoe's additions.

Requests take `experts: {include, exclude}`, `use`, `token_experts` and `return_routed_experts`
next to the OpenAI fields (the official client sends them via `extra_body`). Errors use OpenAI's
shape, `{"error": {"message", "type", "param", "code"}}`, so the official clients show all of them.
No HTTP or model code here: the server and the app share it.

Requests are validated strictly (pydantic strict mode), so nothing is guessed:

- types are not coerced: `max_tokens: true`, `max_tokens: "5"`, `seed: 1.5`, `stream: "yes"` are
  refused; a float field takes an int (`temperature: 0`) but never a bool, and never a non-finite
  number (the `NaN`/`Infinity` tokens Python's JSON parser accepts);
- all text (prompt, messages, stop strings, expert names, ids) must be encodable Unicode: a lone
  surrogate (`"\\ud800"`) is refused naming the field;
- a field nobody knows is refused (`unknown_parameter`); an OpenAI parameter flexmoe does not
  implement (`logprobs`, `echo`, `best_of`, `suffix`, `logit_bias`, penalties, `tools`,
  `response_format`, …: see `UNSUPPORTED`) is refused naming it (`unsupported_parameter`) unless
  it holds the value that means "off" (null, `false`, `0`, `{}`, `[]`, `best_of: 1`, …), which
  changes nothing and is accepted;
- `user`, `safety_identifier` and `prompt_cache_key` (end-user ids and a caching hint) are
  accepted and ignored: they do not change what is generated. `stream_options` is accepted with
  `stream: true` only (usage is always in the final chunk); chat's `max_completion_tokens` is
  `max_tokens`. A null OpenAI parameter means its default, as in OpenAI's API;
- `n` must be 1 and `prompt` one string (or a list of one); chat roles are `system`, `user` and
  `assistant`, and content is a string or a list of `{"type": "text", "text"}` parts;
- one expert cannot be both included and excluded;
- `return_routed_experts` (a boolean, as vLLM's field) is refused with `stream: true`
  (`unsupported_parameter`): the ids come whole with a non-streaming answer.

`model` is checked against the served model by the app (404 `model_not_found`, as OpenAI does).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    StrictStr,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


def _encodable(s: str) -> str:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError as e:
        raise PydanticCustomError(
            "invalid_text",
            "text is not valid Unicode: a lone surrogate (U+{cp}) at character {at}",
            {"cp": f"{ord(s[e.start]):04X}", "at": e.start},
        ) from None
    return s


Text = Annotated[StrictStr, AfterValidator(_encodable)]
Float = Annotated[float, Field(strict=True, allow_inf_nan=False)]  # an int is fine, a bool not

# OpenAI parameters flexmoe does not implement → the values that mean "off" (accepted, ignored).
UNSUPPORTED: dict[str, tuple] = {
    "logprobs": (False,),
    "top_logprobs": (0,),
    "echo": (False,),
    "best_of": (1,),
    "suffix": ("",),
    "logit_bias": ({},),
    "presence_penalty": (0, 0.0),
    "frequency_penalty": (0, 0.0),
    "tools": ([],),
    "tool_choice": ("none",),
    "parallel_tool_calls": (False, True),  # without tools it means nothing
    "functions": ([],),
    "function_call": ("none",),
    "response_format": ({"type": "text"},),
    "modalities": (["text"],),
    "audio": (),
    "prediction": (),
    "reasoning_effort": (),
    "verbosity": (),
    "web_search_options": (),
    "store": (False,),
    "metadata": ({},),
    "service_tier": ("auto", "default"),
    "moderation": (),
    "prompt_cache_options": (),
    "prompt_cache_retention": (),
}


def _neutral(value: Any, offs: tuple) -> bool:
    """Whether `value` is null or one of the "off" values, with its exact JSON type (so that
    `best_of: true` is not taken for 1)."""
    return value is None or any(type(value) is type(o) and value == o for o in offs)


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class ExpertChoice(_Strict):
    include: list[Text] | None = Field(None, max_length=256)
    exclude: list[Text] | None = Field(None, max_length=256)

    @model_validator(mode="after")
    def _disjoint(self):
        both = sorted(set(self.include or []) & set(self.exclude or []))
        if both:
            raise PydanticCustomError(
                "invalid_value",
                "expert(s) both included and excluded: {names}",
                {"names": ", ".join(both)},
            )
        return self


class StreamOptions(_Strict):
    include_usage: StrictBool | None = None  # usage is always in the final chunk


class _Request(_Strict):
    """The fields /v1/completions and /v1/chat/completions share."""

    model: Text | None = None  # absent: the served model
    max_tokens: StrictInt = Field(16, ge=1)
    temperature: Float = Field(1.0, ge=0, le=4)
    top_p: Float = Field(1.0, gt=0, le=1)
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    stop: Text | list[Text] | None = None
    n: StrictInt = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # accepted and ignored, as the next two
    safety_identifier: Text | None = None
    prompt_cache_key: Text | None = None
    experts: ExpertChoice | None = None
    use: Literal["research", "commercial"] | None = None
    token_experts: StrictBool = False  # per generated token: the expert with most routing weight
    return_routed_experts: StrictBool = False  # vLLM's layout: expert ids per token and layer

    @model_validator(mode="before")
    @classmethod
    def _openai_parameters(cls, data: Any) -> Any:
        """Refuse the OpenAI parameters flexmoe does not implement (naming them), drop those
        that say "off", and read null as the default."""
        if not isinstance(data, dict):
            return data  # the field checks answer "must be an object"
        data = dict(data)
        for key in list(data):
            if key in UNSUPPORTED and key not in cls.model_fields:
                if not _neutral(data[key], UNSUPPORTED[key]):
                    raise PydanticCustomError(
                        "unsupported_parameter",
                        "{param} is not supported by flexmoe",
                        {"param": key},
                    )
                del data[key]
            elif data[key] is None and key in cls.model_fields:
                if cls.model_fields[key].default is not None:
                    del data[key]
        return data

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise PydanticCustomError(
                "unsupported_value", "n must be 1: flexmoe makes one choice per request"
            )
        return n

    @field_validator("stop")
    @classmethod
    def _stops(cls, stop):
        many = [stop] if isinstance(stop, str) else stop or []
        if len(many) > 4 or any(len(s) > 64 or not s for s in many):
            raise PydanticCustomError(
                "invalid_value", "stop: at most 4 non-empty strings of ≤ 64 characters"
            )
        return stop

    @model_validator(mode="after")
    def _stream_options(self):
        if self.stream_options is not None and not self.stream:
            raise PydanticCustomError(
                "invalid_value",
                "stream_options is only allowed when stream is true",
                {"param": "stream_options"},
            )
        return self

    @model_validator(mode="after")
    def _routed_experts_whole(self):
        """A stream's chunks are text pieces, not tokens, and a token's row is only known once
        the model has been fed it: the ids are answered whole, never streamed."""
        if self.return_routed_experts and self.stream:
            raise PydanticCustomError(
                "unsupported_parameter",
                "return_routed_experts is not supported with stream: true; "
                "send the request without streaming",
                {"param": "return_routed_experts"},
            )
        return self


class CompletionRequest(_Request):
    prompt: Text | list[Text] = ""

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and len(prompt) > 1:
            raise PydanticCustomError(
                "unsupported_value", "prompt: flexmoe takes one prompt per request"
            )
        return prompt

    @property
    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else "".join(self.prompt)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise PydanticCustomError(
                "unsupported_value", "content: flexmoe takes only parts of type 'text'"
            )
        return data


class ChatMessage(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(p.text for p in self.content)


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1, max_length=512)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)  # OpenAI's newer max_tokens

    @model_validator(mode="after")
    def _max_completion_tokens(self):
        if self.max_completion_tokens is not None:
            if "max_tokens" in self.model_fields_set:
                if self.max_tokens != self.max_completion_tokens:
                    raise PydanticCustomError(
                        "invalid_value",
                        "give max_tokens or max_completion_tokens, not both",
                        {"param": "max_completion_tokens"},
                    )
            self.max_tokens = self.max_completion_tokens
        return self


def field_names() -> set[str]:
    """Every field of every request shape (to tell them from pydantic's union tags in an
    error's location)."""
    out = set()
    for m in (ExpertChoice, StreamOptions, CompletionRequest, TextPart, ChatMessage, ChatRequest):
        out |= set(m.model_fields)
    return out


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers


def _safe(s: str | None) -> str | None:
    """`s` as encodable text (a lone surrogate echoed from a request becomes `\\udXXX`)."""
    return None if s is None else s.encode("utf-8", "backslashreplace").decode("utf-8")


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None):
    """OpenAI's error shape, so the official clients show all of it."""
    return {"error": {"message": _safe(message), "type": kind, "param": _safe(param), "code": code}}


def usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
