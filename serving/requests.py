"""What a client asks for, from either surface (gRPC proto or OpenAI JSON), as one plain dict.

The Router turns each surface's request into a `GenerateCall`; the ModelServer turns that into
engine submissions (one per prompt and choice). Values are checked once, in the engine; the
OpenAI bodies here only check shapes, and refuse any field the server does not implement.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Any, Literal, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from loraplex.serving.engine.sampling import MAX_LOGPROBS
from loraplex.serving.errors import InvalidRequest

BASE_MODEL_ID = "base"  # the OpenAI `model` value (besides "") that means: no adapter
MAX_CHOICES = 64  # prompts x n per request: each is its own engine request
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")
# Fields outside OpenAI's and vLLM's sampling that clients send and that cannot change an output;
# accepted and dropped, by name. Anything else unknown is a 400 naming the field.
IGNORED_FIELDS = {"user": "an end-user ID for abuse monitoring (OpenAI's own output does not depend on it)"}


class GenerateCall(TypedDict):
    request_id: str
    prompt: str | None
    messages: list[dict] | None
    params: dict[str, Any]  # SamplingParams fields
    prompts: NotRequired[list[str | list[int]] | None]  # several prompts, or token-ID prompts (completions)
    n: NotRequired[int]  # choices per prompt
    echo: NotRequired[bool]  # the prompt comes back before the completion (completions)
    limits: NotRequired[dict | None]  # the tenant's TenantLimits fields, set by the Router
    timeout: NotRequired[float | None]  # seconds left before the client's deadline


def checked_request_id(request_id: str | None) -> str:
    """A client's request ID (echoed in every response and log), or a new one."""
    if not request_id:
        return new_request_id()
    if not _REQUEST_ID.fullmatch(request_id):
        raise InvalidRequest("request_id must be 1-128 characters of letters, digits, '.', '_', ':' or '-'")
    return request_id


def adapter_from_model(model: str | None) -> str:
    """OpenAI `model` field -> adapter ID ('' for the base)."""
    return "" if model in (None, "", BASE_MODEL_ID) else model


def new_request_id() -> str:
    return uuid.uuid4().hex


def check_choices(prompts: int, n: int) -> None:
    if not isinstance(n, int) or n < 1:
        raise InvalidRequest(f"n must be a positive integer, got {n}")
    if prompts * n > MAX_CHOICES:
        raise InvalidRequest(f"prompts x n is {prompts * n}: at most {MAX_CHOICES} choices per request")


def call_from_proto(request) -> GenerateCall:
    """A loraplex.v1.GenerateRequest as a GenerateCall."""
    params: dict[str, Any] = {
        "max_tokens": request.max_tokens,
        "stop": tuple(request.stop),
        "ignore_eos": request.ignore_eos,
        "stop_token_ids": tuple(request.stop_token_ids),
        "logit_bias": tuple(sorted(request.logit_bias.items())),
        "min_tokens": request.min_tokens,
    }
    for name in (
        "temperature",
        "top_p",
        "top_k",
        "seed",
        "presence_penalty",
        "frequency_penalty",
        "repetition_penalty",
        "logprobs",
    ):
        if request.HasField(name):
            params[name] = getattr(request, name)
    if request.response_format:
        from loraplex.serving.engine.grammar import parse_response_format

        parse_response_format(request.response_format)  # a 400 at the door, not in the replica
        params["response_format"] = request.response_format
    messages = [{"role": m.role, "content": m.content} for m in request.messages] or None
    if messages and request.prompt:
        raise InvalidRequest("send either prompt or messages, not both")
    if request.echo:
        if messages:
            raise InvalidRequest("echo applies to a prompt, not to messages")
        params["prompt_logprobs"] = params.get("logprobs", 0)
    n = request.n or 1
    check_choices(1, n)
    return GenerateCall(
        request_id=checked_request_id(request.request_id),
        prompt=request.prompt or None,
        messages=messages,
        params=params,
        n=n,
        echo=request.echo,
    )


class _Strict(BaseModel):
    """Unknown fields are a 400 naming them (see IGNORED_FIELDS for the few accepted and dropped)."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _drop_ignored(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(name in data for name in IGNORED_FIELDS):
            return {k: v for k, v in data.items() if k not in IGNORED_FIELDS}
        return data


class StreamOptions(_Strict):
    include_usage: bool = False


class _OpenAIBase(_Strict):
    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    top_k: int | None = 0  # extension, as in vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = 1
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    repetition_penalty: float | None = 1.0  # extension, as in vLLM
    logit_bias: dict[str, float] | None = None
    min_tokens: int = 0  # extension, as in vLLM
    stop_token_ids: list[int] | None = None  # extension, as in vLLM
    ignore_eos: bool = False  # extension, as in vLLM
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _usage_needs_a_stream(self):
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed when stream is true")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling(self, default_max_tokens: int | None) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        try:
            bias = tuple(sorted((int(token), value) for token, value in (self.logit_bias or {}).items()))
        except ValueError:
            raise InvalidRequest("logit_bias keys must be token IDs (integers as strings)") from None
        params = {
            "max_tokens": self.max_tokens if self.max_tokens is not None else default_max_tokens,
            "temperature": _or(self.temperature, 1.0),
            "top_p": _or(self.top_p, 1.0),
            "top_k": _or(self.top_k, 0),
            "seed": self.seed,
            "stop": tuple(stop),
            "ignore_eos": self.ignore_eos,
            "presence_penalty": _or(self.presence_penalty, 0.0),
            "frequency_penalty": _or(self.frequency_penalty, 0.0),
            "repetition_penalty": _or(self.repetition_penalty, 1.0),
            "logit_bias": bias,
            "min_tokens": self.min_tokens,
            "stop_token_ids": tuple(self.stop_token_ids or ()),
        }
        if self.response_format is not None:
            from loraplex.serving.engine.grammar import parse_response_format

            text = json.dumps(self.response_format)
            if parse_response_format(text) is not None:
                params["response_format"] = text
        return params


def _or(value, default):
    return default if value is None else value


class CompletionBody(_OpenAIBase):
    prompt: str | list[str] | list[int] | list[list[int]] = Field(...)
    echo: bool = False
    logprobs: int | None = None  # 0-20: the chosen token's logprob and this many alternatives

    def call(self, request_id: str | None = None) -> GenerateCall:
        prompts = self.prompt if isinstance(self.prompt, list) and self.prompt else [self.prompt]
        if prompts and isinstance(prompts[0], int):
            prompts = [prompts]  # one prompt given as token IDs
        if any(isinstance(p, list) and not p for p in prompts):
            raise InvalidRequest("prompt token lists must not be empty")
        n = _or(self.n, 1)
        check_choices(len(prompts), n)
        params = self.sampling(16)
        params["logprobs"] = self.logprobs
        if self.echo:  # prompt logprobs let max_tokens be 0 (scoring the prompt alone)
            params["prompt_logprobs"] = self.logprobs if self.logprobs is not None else 0
        single = len(prompts) == 1 and isinstance(prompts[0], str)
        return GenerateCall(
            request_id=checked_request_id(request_id),
            prompt=prompts[0] if single else None,
            messages=None,
            params=params,
            prompts=None if single else prompts,
            n=n,
            echo=self.echo,
        )


class ChatMessageBody(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _text_parts_only(cls, content):
        if isinstance(content, list):
            for part in content:
                kind = part.get("type")
                if kind != "text":
                    raise ValueError(f"content part type {kind!r} is not supported (only 'text' parts)")
                if not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                    raise ValueError('a text part is {"type": "text", "text": <string>}')
        return content

    def for_template(self) -> dict[str, str]:
        """The message as chat templates take it: parts joined (with newlines, as vLLM does)."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part["text"] for part in content)
        message = {"role": self.role, "content": content or ""}
        for extra in ("name", "tool_call_id"):
            if getattr(self, extra) is not None:
                message[extra] = getattr(self, extra)
        return message


class ChatCompletionBody(_OpenAIBase):
    messages: list[ChatMessageBody] = Field(...)
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None  # 0-20, with logprobs=true

    def call(self, request_id: str | None = None) -> GenerateCall:
        if not self.messages:
            raise InvalidRequest("messages is empty")
        n = _or(self.n, 1)
        check_choices(1, n)
        params = self.sampling(None)  # None: as many as the context allows
        if self.max_completion_tokens is not None:
            params["max_tokens"] = self.max_completion_tokens
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs: true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be in [0, {MAX_LOGPROBS}], got {self.top_logprobs}")
        params["logprobs"] = (self.top_logprobs or 0) if self.logprobs else None
        return GenerateCall(
            request_id=checked_request_id(request_id),
            prompt=None,
            messages=[m.for_template() for m in self.messages],
            params=params,
            n=n,
            echo=False,
        )


class LoraAdapterBody(_Strict):
    """vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter body."""

    lora_name: str
    lora_path: str | None = None  # load: the adapter's folder in the store
    lora_int_id: int | None = None  # vLLM's numeric ID: accepted, not needed here (IDs are names)
