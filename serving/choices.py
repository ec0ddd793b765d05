"""One client request as several engine requests (prompts x n), gathered or streamed as one.

Each choice is its own engine request (its own batch row, sampled independently); the replica
collects their events into the plain dicts both surfaces build their responses from.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from loraplex.serving.engine.logprobs import as_dicts
from loraplex.serving.errors import EngineStopped

OUTPUT_REASONS = ("stop", "length")  # what a choice may end with; anything else is an error


@dataclass
class Choice:
    index: int
    prompt_tokens: int
    echo: str  # the prompt text that comes back first (echo), else ''
    stream: object  # the engine's RequestStream


def _failure(event) -> BaseException | None:
    if event.error is not None:
        return event.error
    if event.finish_reason not in OUTPUT_REASONS:  # cancelled without an error: the server stopped it
        return EngineStopped(f"the request ended early ({event.finish_reason}): the server stopped it")
    return None


def _entries(event, name: str, tokenizer) -> list[dict] | None:
    entries = getattr(event, name, None)
    return as_dicts(entries, tokenizer) if entries else None


async def collect(choice: Choice, tokenizer) -> dict:
    """A choice's whole output: text, finish_reason, logprobs, prompt_logprobs, completion_tokens."""
    text, logprobs, prompt_logprobs = [choice.echo], [], None
    async for event in choice.stream:
        if event.final:
            failure = _failure(event)
            if failure is not None:
                raise failure
            return {
                "index": choice.index,
                "text": "".join(text),
                "finish_reason": event.finish_reason,
                "logprobs": logprobs or None,
                "prompt_logprobs": prompt_logprobs,
                "completion_tokens": event.completion_tokens,
                "adapter_version": event.adapter_version,
            }
        text.append(event.text)
        logprobs += _entries(event, "logprobs", tokenizer) or []
        prompt_logprobs = _entries(event, "prompt_logprobs", tokenizer) or prompt_logprobs


async def gather(choices: list[Choice], tokenizer) -> list[dict]:
    """Every choice's output, in order; the first failure cancels the rest and is raised."""
    tasks = [asyncio.ensure_future(collect(c, tokenizer)) for c in choices]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        cancel(choices, tasks)
        raise


async def merged(choices: list[Choice], tokenizer):
    """Chunks of every choice as they come: {"index", "text", "logprobs", "prompt_logprobs", "done", ...}.

    A choice's last chunk has done=True, its finish_reason and completion_tokens.
    """
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(choice: Choice) -> None:
        first = True
        try:
            async for event in choice.stream:
                chunk = {
                    "index": choice.index,
                    "text": event.text,
                    "done": event.final,
                    "finish_reason": "",
                    "logprobs": _entries(event, "logprobs", tokenizer),
                    "prompt_logprobs": _entries(event, "prompt_logprobs", tokenizer),
                }
                if first and choice.echo:
                    chunk["text"], first = choice.echo + chunk["text"], False
                if event.final:
                    failure = _failure(event)
                    if failure is not None:
                        raise failure
                    chunk.update(
                        finish_reason=event.finish_reason,
                        completion_tokens=event.completion_tokens,
                        adapter_version=event.adapter_version,
                    )
                if chunk["text"] or chunk["done"] or chunk["logprobs"] or chunk["prompt_logprobs"]:
                    first = False
                    await queue.put(chunk)
        except BaseException as exc:
            await queue.put(exc)

    tasks = [asyncio.ensure_future(pump(c)) for c in choices]
    try:
        for _ in range(len(choices)):
            while True:
                item = await queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item["done"]:
                    break
    finally:
        cancel(choices, tasks)


def cancel(choices: list[Choice], tasks: list[asyncio.Future]) -> None:
    """Stop what is still running (a choice that finished ignores it)."""
    for choice, task in zip(choices, tasks):
        if not task.done():
            task.cancel()
            choice.stream.cancel()
