"""Batched mixed-adapter LoRA: every row of a batch applies its own adapter, base matmul shared.

The idea behind Punica's SGMV and S-LoRA. Adapters live in numbered slots (slot 0: no adapter),
stored once per slot. Each running request holds a batch *position* that names its slot.

On CPU one call of lora_op per group of linears applies every row's adapter, reading each
resident adapter once per step (rows grouped by slot, a fixed summation order per row, so
mixed == solo stays bit-exact). On CUDA, or where the op cannot build, the older path runs: every
group keeps a per-position copy of its adapter and one bmm pair applies them all. Three things
keep that path's per-step cost low:
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

import loraplex.serving.engine.lora_op as lora_op
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
        self.slot_rank_tensor = torch.zeros(n_slots, dtype=torch.long)  # what lora_op reads
        self.rank = 0  # largest rank in the batch: the bmms span only that much
        self.version = 0  # bumps whenever positions or rank change
        self._token_slots: dict[tuple, torch.Tensor] = {}

    def set(self, slots: list[int]) -> None:
        positions = [(s, self.slot_generation[s]) for s in slots]
        rank = max((self.slot_rank[s] for s in slots), default=0)
        if positions != self.positions or rank != self.rank:
            self.positions, self.rank = positions, rank
            self.version += 1
            self._token_slots.clear()

    def set_rank(self, slot: int, rank: int) -> None:
        self.slot_rank[slot] = rank
        self.slot_rank_tensor[slot] = rank
        self.slot_generation[slot] += 1

    def token_slots(self, start: int, rows: int, tokens: int) -> torch.Tensor:
        """The slot of each token row of positions start..start+rows, `tokens` each (one tensor per forward)."""
        key = (start, rows, tokens)
        found = self._token_slots.get(key)
        if found is None:
            slots = torch.tensor([s for s, _ in self.positions[start : start + rows]], dtype=torch.long)
            found = self._token_slots[key] = slots.repeat_interleave(tokens)
        return found


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
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        self.names, self.linears, self.layout = names, nn.ModuleList(linears), layout
        self.max_batch = max_batch
        self.in_features = linears[0].in_features
        self.out_features = [m.out_features for m in linears]
        device = linears[0].weight.device
        # Per slot, already transposed: A.T of every member side by side at the slot's own rank
        # [d_in, members * rank] (one pass over x computes all their x @ A; the width is padded to
        # lora_op's 16-column vectors) and (scaling * B).T [max_rank, d_out] per member.
        n = len(linears)
        width = -(-n * max_rank // 16) * 16
        self.slot_A = torch.zeros(n_slots, self.in_features, width, dtype=dtype, device=device)
        self.slot_B = [torch.zeros(n_slots, max_rank, d, dtype=dtype, device=device) for d in self.out_features]
        self.use_op = device.type == "cpu" and lora_op.available()
        self._synced_version, self._rank = -1, -1
        self._held: list[tuple[int, int] | None] = []
        self._pos_A = self._pos_B = None

    def clear_slot(self, slot: int) -> None:
        self.slot_A[slot].zero_()
        for b in self.slot_B:
            b[slot].zero_()

    def load_member(self, slot: int, member: int, slot_rank: int, a_t: torch.Tensor, b_t: torch.Tensor) -> None:
        """Write one member's A.T [d_in, r] and scaled B.T [r, d_out] into a cleared slot; its A
        columns start at member * slot_rank (r < slot_rank: the rest stay zero)."""
        rank = a_t.shape[1]
        # on CUDA from pinned host memory (see LoraSlots.prepare): the copy does not wait for the GPU
        self.slot_A[slot, :, member * slot_rank : member * slot_rank + rank].copy_(a_t, non_blocking=True)
        self.slot_B[member][slot, :rank].copy_(b_t, non_blocking=True)

    def _sync(self) -> None:
        """Bring the per-position copies in line with the layout, copying only what changed."""
        layout, rank = self.layout, self.layout.rank
        if rank != self._rank:  # new width: reallocate, and every position is copied again
            device, n = self.slot_A.device, len(self.linears)
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
        own = self.layout.slot_rank[slot]  # the slot's members sit side by side at its own rank
        self._pos_A[position].zero_()
        for j in range(len(self.linears)):
            self._pos_A[position, :, j * rank : j * rank + own] = self.slot_A[slot, :, j * own : (j + 1) * own]
            self._pos_B[j][position] = self.slot_B[j][slot, :rank]

    def forward(self, x: torch.Tensor, start: int) -> list[torch.Tensor]:
        """x: [b, t, d_in] for batch positions start..start+b; one output per member linear."""
        outputs = [_run_base(linear, x) for linear in self.linears]
        rank = self.layout.rank
        if rank == 0:
            return outputs
        b, t = x.shape[0], x.shape[1]
        if self.use_op:  # adds each row's LoRA into the base outputs in place
            flat = [y.view(b * t, -1) for y in outputs]
            token_slots = self.layout.token_slots(start, b, t)
            lora_op.lora_add(
                x.reshape(b * t, -1), token_slots, self.layout.slot_rank_tensor, self.slot_A, self.slot_B, flat
            )
            return outputs
        if self._synced_version != self.layout.version:
            self._sync()
        rows = slice(start, start + b)
        h = torch.bmm(x.to(self._pos_A.dtype), self._pos_A[rows])  # [b, t, n*r]: every member's x @ A
        return [
            y + torch.bmm(h[..., j * rank : (j + 1) * rank], b[rows]).to(y.dtype)  # [b, t, d_out]
            for j, (y, b) in enumerate(zip(outputs, self._pos_B))
        ]


class LoraSlots:
    """All LoRA groups of one model, addressed as numbered adapter slots."""

    per_module_scaling = True  # tells the store that rank_pattern/alpha_pattern adapters fit here

    def __init__(
        self, model: nn.Module, n_adapters: int, max_rank: int, max_batch: int, dtype: torch.dtype = torch.float32
    ) -> None:
        """dtype: how adapter weights are stored (float32 like PEFT's, or bfloat16: half the bytes read)."""
        self.n_slots = n_adapters + 1  # slot 0: no adapter
        self.layout = BatchLayout(self.n_slots)
        self.groups: list[dict[str, LoraGroup]] = []  # per decoder layer: group name -> group
        self.module_shapes: dict[str, tuple[int, int]] = {}  # PEFT module path -> (d_in, d_out)
        self._members: dict[str, tuple[LoraGroup, int]] = {}
        for index, layer in enumerate(model.model.layers):
            by_name = {}
            for suffixes in GROUPS:
                linears = [layer.get_submodule(s) for s in suffixes]
                group = LoraGroup(list(suffixes), linears, self.layout, self.n_slots, max_rank, max_batch, dtype)
                by_name[suffixes[0]] = group
                for j, (suffix, linear) in enumerate(zip(suffixes, linears)):
                    path = f"model.layers.{index}.{suffix}"
                    self.module_shapes[path] = (linear.in_features, linear.out_features)
                    self._members[path] = (group, j)
            self.groups.append(by_name)

    def use(self, slots: list[int]) -> None:
        """Batch position i holds slot slots[i] for the next forward passes."""
        self.layout.set(slots)

    def prepare(self, weights: dict[str, LoraModule]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """{module path: (A.T [d_in, r], scaling * B.T [r, d_out])} in the slots' dtype: the host
        tier keeps this form, so a slot placement is a plain copy (non-blocking on CUDA). Any thread may call it."""
        slot_a = self.groups[0][GROUPS[0][0]].slot_A
        prepared = {
            path: (
                module.a.to(torch.float32).T.contiguous().to(slot_a.dtype),
                (module.b.to(torch.float32).T * module.scaling).contiguous().to(slot_a.dtype),  # scaling folded in once
            )
            for path, module in weights.items()
        }
        if slot_a.device.type == "cuda":  # pinned: a slot placement is an asynchronous copy
            prepared = {path: (a.pin_memory(), b.pin_memory()) for path, (a, b) in prepared.items()}
        return prepared

    def load_slot(self, slot: int, weights: dict) -> None:
        """weights: `prepare`'s form, or {module path: LoraModule}, each with its own rank and
        scaling (rank_pattern, alpha_pattern, rsLoRA); smaller ranks are zero-padded to the slot's,
        untargeted modules stay zero."""
        if any(isinstance(m, LoraModule) for m in weights.values()):
            weights = self.prepare(weights)
        rank = max(a.shape[1] for a, _ in weights.values())
        for layer in self.groups:
            for group in layer.values():
                group.clear_slot(slot)
        for path, (a_t, b_t) in weights.items():
            group, member = self._members[path]
            group.load_member(slot, member, rank, a_t, b_t)
        self.layout.set_rank(slot, rank)

    def clear_slot(self, slot: int) -> None:
        for layer in self.groups:
            for group in layer.values():
                group.clear_slot(slot)
        self.layout.set_rank(slot, 0)
