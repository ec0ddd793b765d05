"""How the torch engine groups newly admitted requests into prefill forwards.

A group is a contiguous run of the running batch (the LoRA layout needs contiguous positions).
Requests that repeat the request before them (same adapter, same prompt: the choices of n > 1)
share one prefill: the first is computed, the others copy its cache rows and its last logits.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class PrefillGroup:
    requests: list = field(default_factory=list)
    shared: bool = False  # every request has the first one's adapter and prompt: prefill it once

    @property
    def scoring(self) -> bool:
        """Prompt logprobs need the logits at every position: such a request is prefilled alone."""
        return self.requests[0].params.prompt_logprobs is not None


def _same_prompt(a, b) -> bool:
    return a.adapter_id == b.adapter_id and a.prompt_ids == b.prompt_ids and b.params.prompt_logprobs is None


def prefill_groups(admitted: list, one_by_one: bool) -> list[PrefillGroup]:
    """Runs of repeated prompts shared; others together, or one by one (CUDA's fixed shapes, scoring)."""
    groups: list[PrefillGroup] = []
    for request in admitted:
        last = groups[-1] if groups else None
        if (
            last is not None
            and not last.scoring
            and _same_prompt(last.requests[-1], request)
            and (last.shared or len(last.requests) == 1)
        ):
            last.requests.append(request)
            last.shared = True
        elif last is None or one_by_one or last.shared or last.scoring or request.params.prompt_logprobs is not None:
            groups.append(PrefillGroup([request]))
        else:
            last.requests.append(request)
    return groups
