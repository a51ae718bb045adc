"""Request bodies of the OpenAI-compatible API, validated strictly.

Wrong types, out-of-range values and unknown fields are rejected (HTTP 400 with the field
named). Parameters that are part of the OpenAI API but that this server does not implement
are accepted by the schema only so that :func:`unsupported` can reject them with a clear
message instead of ignoring them silently.

Every string, including the keys and values inside free-form objects, must be valid
Unicode: JSON can spell a lone surrogate (``"\\ud800"``), which no tokenizer and no UTF-8
encoder accepts, so it is refused here with the field named.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

MAX_N = 16
MAX_LOGPROBS = 20
_SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(text: str) -> int:
    """Index of the first lone surrogate in ``text``, or -1."""
    if text.isascii():  # the common case, and much faster than the search on a long prompt
        return -1
    found = _SURROGATE.search(text)
    return -1 if found is None else found.start()


def _unicode(text: str) -> str:
    at = lone_surrogate(text)
    if at >= 0:
        raise ValueError(f"invalid Unicode: lone surrogate U+{ord(text[at]):04X} at character {at}")
    return text


def _unicode_deep(value: Any) -> Any:
    """Check every string inside a free-form JSON value, object keys included (iteratively: any depth)."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            _unicode(item)
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


Text = Annotated[str, AfterValidator(_unicode)]
JSONObject = Annotated[dict[str, Any], AfterValidator(_unicode_deep)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """Fields shared by completions and chat completions."""

    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    n: Annotated[int, Field(ge=1, le=MAX_N)] | None = None
    stop: Text | Annotated[list[Text], Field(max_length=4)] | None = None
    seed: Annotated[int, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: Text | None = None  # an end-user identifier; it does not change the output
    # vendor extensions that benchmark clients send (vLLM names)
    top_k: Annotated[int, Field(ge=-1)] | None = None
    ignore_eos: bool | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    # OpenAI parameters this server does not implement: rejected unless they are no-ops
    presence_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[float, Field(ge=-2.0, le=2.0)] | None = None
    repetition_penalty: Annotated[float, Field(gt=0.0)] | None = None
    logit_bias: dict[Text, float] | None = None


class CompletionRequest(_Common):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    echo: bool | None = None
    suffix: Text | None = None
    best_of: Annotated[int, Field(ge=1)] | None = None


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart] | None = None
    name: Text | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(_Common):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[JSONObject] | None = None
    tool_choice: Text | JSONObject | None = None
    response_format: JSONObject | None = None
    parallel_tool_calls: bool | None = None


def unsupported(req: CompletionRequest | ChatCompletionRequest) -> str | None:
    """Name of the first parameter set to something this server cannot honour, or None."""
    checks: dict[str, bool] = {
        "presence_penalty": bool(req.presence_penalty),
        "frequency_penalty": bool(req.frequency_penalty),
        "repetition_penalty": req.repetition_penalty not in (None, 1.0),
        "logit_bias": bool(req.logit_bias),
    }
    if isinstance(req, CompletionRequest):
        checks.update(echo=bool(req.echo), suffix=req.suffix is not None,
                      best_of=req.best_of is not None and req.best_of != (req.n or 1))
    else:
        checks.update(tools=bool(req.tools), tool_choice=req.tool_choice not in (None, "none"),
                      parallel_tool_calls=bool(req.parallel_tool_calls),
                      response_format=req.response_format is not None and req.response_format.get("type") != "text")
    return next((name for name, bad in checks.items() if bad), None)
