"""Batched mixed-adapter LoRA: every row of a batch applies its own adapter, base matmul shared.

The idea behind Punica's SGMV and S-LoRA, in plain torch. Adapters live in numbered slots
(slot 0: no adapter). Each running request holds a batch *position*; every projection group
keeps a copy of its position's adapter weights, so one bmm pair applies all the rows' adapters.

Three things keep the per-step cost low on a CPU, where small ops cost more in dispatch than in
arithmetic:
- positions change one at a time: the engine removes a finished request by moving the last
  one into its place, so a join or a leave copies one adapter, not the whole batch's;
- linears that read the same input (q/k/v, gate/up) form one group: one bmm computes all of
  their `x @ A`;
- the per-position copies are stored in the layout bmm reads (a transposed view would be
  copied again on every call).
"""

from __future__ import annotations

import torch
from torch import nn

from loraplex.training.lora_format import LoraModule

# Linears of one decoder layer that read the same input, by their PEFT module-path suffix.
GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class BatchLayout:
    """Which slot each batch position holds, shared by all groups; groups sync from it lazily."""

    def __init__(self, n_slots: int) -> None:
        self.positions: list[tuple[int, int]] = []  # (slot, slot generation) per position
        self.slot_generation = [0] * n_slots
        self.slot_rank = [0] * n_slots
        self.rank = 0  # largest rank in the batch: the bmms span only that much
        self.version = 0  # bumps whenever positions or rank change

    def set(self, slots: list[int]) -> None:
        positions = [(s, self.slot_generation[s]) for s in slots]
        rank = max((self.slot_rank[s] for s in slots), default=0)
        if positions != self.positions or rank != self.rank:
            self.positions, self.rank = positions, rank
            self.version += 1


def _run_base(linear: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] * x.shape[1] == 1:
        # bitsandbytes takes a different 4-bit kernel (gemv) for a single row, whose rounding
        # differs from the batched one; two rows keep a request's output batch-invariant.
        return linear(x.expand(2, -1, -1))[:1]
    return linear(x)


class LoraGroup(nn.Module):
    """Base linears sharing one input, plus every slot's LoRA for each of them."""

    def __init__(
        self,
        names: list[str],
        linears: list[nn.Module],
        layout: BatchLayout,
        n_slots: int,
        max_rank: int,
        max_batch: int,
    ) -> None:
        super().__init__()
        self.names, self.linears, self.layout = names, nn.ModuleList(linears), layout
        self.max_batch = max_batch
        self.in_features = linears[0].in_features
        self.out_features = [m.out_features for m in linears]
        device = linears[0].weight.device
        # Per slot, per member, already transposed for bmm: A.T [d_in, r] and (scaling * B).T
        # [r, d_out], fp32 like PEFT's. Copying a slot into a batch position is then a plain copy.
        self.slot_A = [torch.zeros(n_slots, self.in_features, max_rank, device=device) for _ in linears]
        self.slot_B = [torch.zeros(n_slots, max_rank, d, device=device) for d in self.out_features]
        self._synced_version, self._rank = -1, -1
        self._held: list[tuple[int, int] | None] = []
        self._pos_A = self._pos_B = None

    def load_slot(self, slot: int, member: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Write one member's matrices into a slot (None: not targeted), zero-padding the rank."""
        self.slot_A[member][slot].zero_()
        self.slot_B[member][slot].zero_()
        if a is not None:
            rank = a.shape[0]
            self.slot_A[member][slot, :, :rank] = a.to(torch.float32).T
            self.slot_B[member][slot, :rank] = b.to(torch.float32).T * scaling  # scaling folded in once

    def _sync(self) -> None:
        """Bring the per-position copies in line with the layout, copying only what changed."""
        layout, rank = self.layout, self.layout.rank
        if rank != self._rank:  # new width: reallocate, and every position is copied again
            device, n = self.slot_A[0].device, len(self.linears)
            # bmm-ready, contiguous layouts: a transposed view would be copied on every call
            self._pos_A = torch.zeros(self.max_batch, self.in_features, n * rank, device=device)
            self._pos_B = [torch.zeros(self.max_batch, rank, d, device=device) for d in self.out_features]
            self._held, self._rank = [None] * self.max_batch, rank
        for position, held in enumerate(layout.positions):
            if self._held[position] != held:
                self._copy_in(position, held[0], rank)
                self._held[position] = held
        self._synced_version = layout.version

    def _copy_in(self, position: int, slot: int, rank: int) -> None:
        for j in range(len(self.linears)):
            self._pos_A[position, :, j * rank : (j + 1) * rank] = self.slot_A[j][slot, :, :rank]
            self._pos_B[j][position] = self.slot_B[j][slot, :rank]

    def forward(self, x: torch.Tensor, start: int) -> list[torch.Tensor]:
        """x: [b, t, d_in] for batch positions start..start+b; one output per member linear."""
        outputs = [_run_base(linear, x) for linear in self.linears]
        rank = self.layout.rank
        if rank == 0:
            return outputs
        if self._synced_version != self.layout.version:
            self._sync()
        rows = slice(start, start + x.shape[0])
        h = torch.bmm(x.to(self._pos_A.dtype), self._pos_A[rows])  # [b, t, n*r]: every member's x @ A
        return [
            y + torch.bmm(h[..., j * rank : (j + 1) * rank], b[rows]).to(y.dtype)  # [b, t, d_out]
            for j, (y, b) in enumerate(zip(outputs, self._pos_B))
        ]


class LoraSlots:
    """All LoRA groups of one model, addressed as numbered adapter slots."""

    per_module_scaling = True  # tells the store that rank_pattern/alpha_pattern adapters fit here

    def __init__(self, model: nn.Module, n_adapters: int, max_rank: int, max_batch: int) -> None:
        self.n_slots = n_adapters + 1  # slot 0: no adapter
        self.layout = BatchLayout(self.n_slots)
        self.groups: list[dict[str, LoraGroup]] = []  # per decoder layer: group name -> group
        self.module_shapes: dict[str, tuple[int, int]] = {}  # PEFT module path -> (d_in, d_out)
        self._members: dict[str, tuple[LoraGroup, int]] = {}
        for index, layer in enumerate(model.model.layers):
            by_name = {}
            for suffixes in GROUPS:
                linears = [layer.get_submodule(s) for s in suffixes]
                group = LoraGroup(list(suffixes), linears, self.layout, self.n_slots, max_rank, max_batch)
                by_name[suffixes[0]] = group
                for j, (suffix, linear) in enumerate(zip(suffixes, linears)):
                    path = f"model.layers.{index}.{suffix}"
                    self.module_shapes[path] = (linear.in_features, linear.out_features)
                    self._members[path] = (group, j)
            self.groups.append(by_name)

    def use(self, slots: list[int]) -> None:
        """Batch position i holds slot slots[i] for the next forward passes."""
        self.layout.set(slots)

    def load_slot(self, slot: int, weights: dict[str, LoraModule]) -> None:
        """weights: {module path: LoraModule}, each with its own rank and scaling (rank_pattern,
        alpha_pattern, rsLoRA); smaller ranks are zero-padded to the slot's, untargeted modules stay zero."""
        for path, (group, member) in self._members.items():
            module = weights.get(path)
            if module is None:
                group.load_slot(slot, member, None, None, 0.0)
            else:
                group.load_slot(slot, member, module.a, module.b, module.scaling)
        self.layout.slot_rank[slot] = max(m.rank for m in weights.values())
        self.layout.slot_generation[slot] += 1

    def clear_slot(self, slot: int) -> None:
        for group, member in self._members.values():
            group.load_slot(slot, member, None, None, 0.0)
        self.layout.slot_rank[slot] = 0
        self.layout.slot_generation[slot] += 1
