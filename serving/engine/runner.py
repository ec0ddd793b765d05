"""The forward pass for serving: HF Llama-family weights, our own attention over a row-slot KV cache.

Llama, Mistral and Qwen2 only (training/architectures.py): the runner refuses anything else
rather than run attention laid out differently and return wrong logits.

A running request owns one cache row for its whole life, so requests join and leave a batch
between decode steps without moving anyone else's cache. Projections, MLPs, norms and rotary
embeddings are the HF model's own modules (so NF4 layers and batched LoRA wrappers just work);
only attention and the cache are ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from loraplex.serving.engine.lora_batch import LoraSlots
from loraplex.training.architectures import require_torch_engine_architecture


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def layer_windows(config) -> list[int | None]:
    """Each layer's sliding window (None: full attention), as HF's Mistral and Qwen2 decide it."""
    n_layers, window = config.num_hidden_layers, getattr(config, "sliding_window", None)
    if not window:
        return [None] * n_layers
    types = getattr(config, "layer_types", None)  # Qwen2: only layers past max_window_layers slide
    if types:
        return [window if kind == "sliding_attention" else None for kind in types]
    return [window] * n_layers


class KVCacheRunner(nn.Module):
    """forward(ids, positions, rows) -> next-token logits, reading and writing cache rows."""

    def __init__(self, hf_model: nn.Module, lora: LoraSlots, max_rows: int, max_seq: int) -> None:
        super().__init__()
        require_torch_engine_architecture(hf_model)
        config = hf_model.config
        self.lora = lora
        self.decoder = hf_model.model
        self.lm_head = hf_model.lm_head
        self.n_heads = config.num_attention_heads
        self.n_kv_heads = getattr(config, "num_key_value_heads", None) or self.n_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.n_heads
        self.max_seq = max_seq
        self.windows = layer_windows(config)
        dtype = self.decoder.embed_tokens.weight.dtype
        device = self.decoder.embed_tokens.weight.device
        shape = (len(self.decoder.layers), max_rows, max_seq, self.n_kv_heads, self.head_dim)
        # cache[layer]: [rows, seq, kv_heads, head_dim]; a request's row is fixed while it runs.
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    @torch.no_grad()
    def forward(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rows: torch.Tensor,
        last: torch.Tensor,
        start: int = 0,
        span: int | None = None,
    ) -> torch.Tensor:
        """ids, positions: [b, t]; rows: [b] cache rows; last: [b] index of each row's last real token.

        The b rows are batch positions start..start+b of the LoRA layout (see lora_batch). `span`
        fixes how many cache positions attention reads (default: just enough for these rows).

        Right-padded rows are fine: pad tokens sit after the real ones, no real query attends to
        them, and the next decode step overwrites their cache entries.
        """
        hidden = self.decoder.embed_tokens(ids)  # [b, t, d]
        cos, sin = self.decoder.rotary_emb(hidden, positions)  # [b, t, head_dim]
        span = span or int(positions.max()) + 1
        key_pos = torch.arange(span, device=ids.device)
        query_pos = positions.view(ids.shape[0], 1, ids.shape[1], 1)
        causal = key_pos.view(1, 1, 1, span) <= query_pos  # [b,1,t,span]
        masks = {None: causal}  # per window size: sliding layers also drop keys `window` or more behind
        for window in set(self.windows) - {None}:
            masks[window] = causal & (key_pos.view(1, 1, 1, span) > query_pos - window)
        for index, layer in enumerate(self.decoder.layers):
            groups = self.lora.groups[index]
            attn_in = layer.input_layernorm(hidden)
            mask = masks[self.windows[index]]
            hidden = hidden + self._attention(index, groups, attn_in, cos, sin, positions, rows, mask, span, start)
            gate, up = groups["mlp.gate_proj"](layer.post_attention_layernorm(hidden), start)
            (down,) = groups["mlp.down_proj"](layer.mlp.act_fn(gate) * up, start)
            hidden = hidden + down
        final = self.decoder.norm(hidden[torch.arange(ids.shape[0]), last])  # [b, d]
        return self.lm_head(final).float()  # [b, vocab]

    def _attention(self, index, groups, x, cos, sin, positions, rows, mask, span, start) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = groups["self_attn.q_proj"](x, start)
        q = q.view(b, t, self.n_heads, self.head_dim)
        k = k.view(b, t, self.n_kv_heads, self.head_dim)
        v = v.view(b, t, self.n_kv_heads, self.head_dim)
        cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        row_index = rows.view(b, 1)
        self.k_cache[index][row_index, positions] = k.to(self.k_cache.dtype)
        self.v_cache[index][row_index, positions] = v.to(self.v_cache.dtype)
        keys = self.k_cache[index][rows, :span].transpose(1, 2)  # [b, kv_heads, span, hd]
        values = self.v_cache[index][rows, :span].transpose(1, 2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2).to(keys.dtype),
            keys,
            values,
            attn_mask=mask,
            enable_gqa=self.n_kv_heads != self.n_heads,
        )  # [b, heads, t, hd]
        (o,) = groups["self_attn.o_proj"](out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim), start)
        return o
