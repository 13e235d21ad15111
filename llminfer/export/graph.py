"""The network as one exportable step: dense key/value tensors in and out instead of the engine's paged pool.

    logits [B, 1, V] (or [B, S, V]), present_key_i / present_value_i [B, Hkv, P+S, D]
        = step(input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], past_key_i / past_value_i [B, Hkv, P, D])

Prefill is a step with P = 0, decode one with S = 1: one graph serves both. attention_mask marks real tokens (1)
and left padding (0), so prompts of different lengths can share a batch. The step runs the model's own
`forward` — every architecture's blocks, norms and rotary as the engine runs them — with an attention backend
that concatenates each layer's past and new keys/values instead of using paged blocks, and the reference (plain
PyTorch) implementation of every op. Quantized layers lower themselves (A16W8: int8 weights dequantized in the
graph) or refuse in one line.
"""

from __future__ import annotations

import torch
from torch import nn

from llminfer.layers.attention import Attention, AttentionBackend, AttentionMetadata, ForwardContext
from llminfer.model.base import CausalLM
from llminfer.quantization.layers import QuantizedLinear
from llminfer.schemes import QUANTIZATION_SCHEMES

EXPORTABLE_SCHEMES = tuple(s.name for s in QUANTIZATION_SCHEMES.values() if s.exportable)


class DenseCacheBackend(AttentionBackend):
    """Attention over [past keys/values of the layer] + [this step's]: the graph's inputs and outputs.

    Key j is visible to new token i (absolute index P + i) iff j <= P + i, j is not padding, and (a sliding-window
    layer) P + i - j < window. Softmax in float32 whatever the dtype; a fully masked (padding) row stays finite.
    """

    def __init__(self, past: tuple[torch.Tensor, ...], attention_mask: torch.Tensor, batch: int, new: int) -> None:
        self.past, self.batch, self.new = past, batch, new
        self.presents: list[torch.Tensor] = []
        past_len = attention_mask.shape[1] - new
        keys = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        queries = torch.arange(new, device=attention_mask.device) + past_len
        self.offset = queries[:, None] - keys[None, :]  # [S, P+S]: how far back key j lies from query i
        self.not_padding = attention_mask.bool()[:, None, None, :]  # [B, 1, 1, P+S]

    def forward(self, layer: Attention, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                metadata: AttentionMetadata | None) -> torch.Tensor:
        b, s = self.batch, self.new
        q = q.view(b, s, layer.num_heads, layer.head_dim).transpose(1, 2)  # [B, Hq, S, D]
        k = torch.cat([self.past[2 * layer.layer_idx], k.view(b, s, layer.num_kv_heads, -1).transpose(1, 2)], dim=2)
        v = torch.cat([self.past[2 * layer.layer_idx + 1], v.view(b, s, layer.num_kv_heads, -1).transpose(1, 2)],
                      dim=2)  # [B, Hkv, P+S, D]
        self.presents += [k, v]
        group = layer.num_heads // layer.num_kv_heads
        if group > 1:  # grouped-query attention: each KV head serves `group` query heads
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        visible = self.offset >= 0
        if layer.sliding_window is not None:
            visible = visible & (self.offset < layer.sliding_window)
        scores = (q.float() @ k.float().transpose(-1, -2)) * layer.scale
        scores = scores.masked_fill(~(visible[None, None] & self.not_padding), torch.finfo(torch.float32).min)
        out = (scores.softmax(dim=-1) @ v.float()).to(q.dtype)  # [B, Hq, S, D]
        return out.transpose(1, 2).reshape(b * s, layer.num_heads, layer.head_dim)


class DecoderStep(nn.Module):
    def __init__(self, model: CausalLM, all_logits: bool = False) -> None:
        """all_logits: logits at every new position (scoring) instead of the last one only (generation; a
        2048-token prompt would otherwise produce 2048 x vocabulary floats and their LM-head matmul).

        `model` should be built with the reference ops (llminfer.ops.reference_ops): what it runs is traced."""
        super().__init__()
        self.all_logits = all_logits
        for name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLinear):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module.for_export())
        self.model = model
        self.config = model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        batch, new = input_ids.shape
        backend = DenseCacheBackend(past, attention_mask, batch, new)
        hidden = self.model(input_ids.reshape(-1), position_ids.reshape(-1), ForwardContext(backend, None))
        hidden = hidden.view(batch, new, -1)  # [B, S, H]
        if not self.all_logits:
            hidden = hidden[:, -1:]  # with left padding, every row's last position is a real token
        return (self.model.compute_logits(hidden), *backend.presents)
