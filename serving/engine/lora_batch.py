"""Batched mixed-adapter LoRA: every row of a batch applies its own adapter, base matmul shared.

The idea behind Punica's SGMV and S-LoRA, in plain torch: adapters live stacked in slots,
each row gathers its slot's A and B, and one bmm pair applies them all. Slot 0 holds zeros:
rows without an adapter run the bare base.
"""

from __future__ import annotations

import torch
from torch import nn


class SlotContext:
    """Which adapter slot each batch row uses for the forward pass in flight (shared by all layers)."""

    def __init__(self) -> None:
        self.slot_ids: torch.Tensor | None = None  # [batch] int64
        self.any_adapter = False
        self.rank = 0  # largest rank among the batch's adapters: the bmm only spans that much
        self.generation = 0  # bumps when the rows' slots or any slot's weights change
        self.weights_version = 0
        self._key = None

    def set(self, slot_ids: list[int], rank: int, device) -> None:
        key = (tuple(slot_ids), rank, self.weights_version)
        if key != self._key:  # decode steps with the same rows reuse each layer's gathered weights
            self._key = key
            self.generation += 1
            self.slot_ids = torch.tensor(slot_ids, device=device)
        self.rank = rank
        self.any_adapter = rank > 0


class BatchedLoRALinear(nn.Module):
    """y = base(x) + (x @ A[s].T) @ (scaling[s] * B[s]).T, with s the row's adapter slot."""

    def __init__(self, base: nn.Module, context: SlotContext, n_slots: int, max_rank: int, device) -> None:
        super().__init__()
        self.base = base
        self.context = context
        self.in_features, self.out_features = base.in_features, base.out_features
        # A: [slots, r, d_in]  B: [slots, d_out, r] (times scaling); fp32 like PEFT's LoRA weights.
        self.register_buffer("lora_A", torch.zeros(n_slots, max_rank, self.in_features, device=device))
        self.register_buffer("lora_B", torch.zeros(n_slots, self.out_features, max_rank, device=device))
        self._generation = -1
        self._a = self._b = None

    def load_slot(self, slot: int, a: torch.Tensor, b: torch.Tensor, scaling: float) -> None:
        """Write one adapter's matrices into a slot, zero-padding rank up to max_rank."""
        rank = a.shape[0]
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()
        self.lora_A[slot, :rank] = a.to(self.lora_A.dtype)
        self.lora_B[slot, :, :rank] = b.to(self.lora_B.dtype) * scaling  # scaling folded in once

    def clear_slot(self, slot: int) -> None:
        self.lora_A[slot].zero_()
        self.lora_B[slot].zero_()

    def _gathered(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each row's A and B (scaling folded into B), gathered once per batch composition."""
        if self._generation != self.context.generation:
            slots, rank = self.context.slot_ids, self.context.rank
            # index_select: several times faster than advanced indexing on CPU
            self._a = self.lora_A[:, :rank].index_select(0, slots).transpose(1, 2)  # [b, d_in, r]
            self._b = self.lora_B[:, :, :rank].index_select(0, slots).transpose(1, 2)  # [b, r, d_out]
            self._generation = self.context.generation
        return self._a, self._b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] * x.shape[1] == 1:
            # bitsandbytes takes a different 4-bit kernel (gemv) for a single row, whose rounding
            # differs from the batched one; two rows keep a request's output batch-invariant.
            y = self.base(x.expand(2, -1, -1))[:1]
        else:
            y = self.base(x)
        if not self.context.any_adapter:
            return y
        a, b = self._gathered()
        delta = torch.bmm(torch.bmm(x.to(a.dtype), a), b)  # x: [b, t, d_in] -> [b, t, r] -> [b, t, d_out]
        return y + delta.to(y.dtype)

def wrap_linear_layers(model: nn.Module, context: SlotContext, n_slots: int, max_rank: int) -> dict[str, BatchedLoRALinear]:
    """Replace every linear inside the decoder layers (not the head) with a batched-LoRA wrapper.

    Returns them by their PEFT module path (e.g. `model.layers.0.self_attn.q_proj`).
    """
    device = next(model.parameters()).device
    wrapped: dict[str, BatchedLoRALinear] = {}
    for name, module in list(model.named_modules()):
        # bitsandbytes' Linear4bit subclasses nn.Linear, so NF4 layers are wrapped too.
        if ".layers." not in f".{name}" or not isinstance(module, nn.Linear):
            continue
        parent_name, _, child = name.rpartition(".")
        wrapper = BatchedLoRALinear(module, context, n_slots, max_rank, device)
        setattr(model.get_submodule(parent_name), child, wrapper)
        wrapped[name] = wrapper
    return wrapped


class LoraSlots:
    """All batched-LoRA layers of one model, addressed as numbered adapter slots."""

    def __init__(self, model: nn.Module, n_adapters: int, max_rank: int) -> None:
        self.context = SlotContext()
        self.n_slots = n_adapters + 1  # slot 0: no adapter
        self.layers = wrap_linear_layers(model, self.context, self.n_slots, max_rank)
        self.module_shapes = {name: (m.in_features, m.out_features) for name, m in self.layers.items()}
        self.slot_ranks = [0] * self.n_slots

    def use(self, slot_ids: list[int], device) -> None:
        """Point every layer at these per-row slots for the next forward."""
        rank = max(self.slot_ranks[s] for s in slot_ids)
        self.context.set(slot_ids, rank, device)

    def load_slot(self, slot: int, weights: dict[str, tuple[torch.Tensor, torch.Tensor]], scaling: float) -> None:
        """weights: {module path: (A [r, d_in], B [d_out, r])}; modules not targeted stay zero."""
        self.slot_ranks[slot] = max(a.shape[0] for a, _ in weights.values())
        self.context.weights_version += 1
        for name, layer in self.layers.items():
            if name in weights:
                layer.load_slot(slot, *weights[name], scaling)
            else:
                layer.clear_slot(slot)

    def clear_slot(self, slot: int) -> None:
        self.slot_ranks[slot] = 0
        self.context.weights_version += 1
        for layer in self.layers.values():
            layer.clear_slot(slot)
