"""What a client asks for, from either surface (gRPC proto or OpenAI JSON), as one plain dict.

The Router turns each surface's request into a `GenerateCall`; the ModelServer turns that into
an engine submission. Validation of the values themselves happens once, in the engine.
"""

from __future__ import annotations

import re
import uuid
from typing import Any, NotRequired, TypedDict

from pydantic import BaseModel, ConfigDict, Field

from loraplex.serving.errors import InvalidRequest

BASE_MODEL_ID = "base"  # the OpenAI `model` value (besides "") that means: no adapter
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")


class GenerateCall(TypedDict):
    request_id: str
    prompt: str | None
    messages: list[dict] | None
    params: dict[str, Any]  # SamplingParams fields
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


def call_from_proto(request) -> GenerateCall:
    """A loraplex.v1.GenerateRequest as a GenerateCall."""
    params: dict[str, Any] = {"max_tokens": request.max_tokens, "stop": tuple(request.stop),
                              "ignore_eos": request.ignore_eos}
    for name in ("temperature", "top_p", "top_k", "seed"):
        if request.HasField(name):
            params[name] = getattr(request, name)
    messages = [{"role": m.role, "content": m.content} for m in request.messages] or None
    if messages and request.prompt:
        raise InvalidRequest("send either prompt or messages, not both")
    return GenerateCall(request_id=checked_request_id(request.request_id), prompt=request.prompt or None,
                        messages=messages, params=params)


class _OpenAIBase(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str = ""
    max_tokens: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # extension, as in vLLM
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    n: int = 1
    ignore_eos: bool = False  # extension, as in vLLM

    def sampling(self, default_max_tokens: int | None) -> dict[str, Any]:
        if self.n != 1:
            raise InvalidRequest("only n=1 is supported")
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return {"max_tokens": self.max_tokens if self.max_tokens is not None else default_max_tokens,
                "temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "seed": self.seed, "stop": tuple(stop), "ignore_eos": self.ignore_eos}


class CompletionBody(_OpenAIBase):
    prompt: str | list[str] = Field(...)

    def call(self, request_id: str | None = None) -> GenerateCall:
        prompt = self.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise InvalidRequest("prompt must be one string (batches of prompts are not supported)")
            prompt = prompt[0]
        return GenerateCall(request_id=checked_request_id(request_id), prompt=prompt, messages=None,
                            params=self.sampling(16))


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str


class ChatCompletionBody(_OpenAIBase):
    messages: list[ChatMessageBody] = Field(...)
    max_completion_tokens: int | None = None

    def call(self, request_id: str | None = None) -> GenerateCall:
        if not self.messages:
            raise InvalidRequest("messages is empty")
        params = self.sampling(None)  # None: as many as the context allows
        if self.max_completion_tokens is not None:
            params["max_tokens"] = self.max_completion_tokens
        return GenerateCall(request_id=checked_request_id(request_id), prompt=None,
                            messages=[m.model_dump() for m in self.messages], params=params)
