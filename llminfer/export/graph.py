"""The network as one exportable step: dense key/value tensors in and out instead of the engine's paged pool.

    logits [B, 1, V] (or [B, S, V]), present_key_i / present_value_i [B, Hkv, P+S, D]
        = step(input_ids [B, S], attention_mask [B, P+S], position_ids [B, S], past_key_i / past_value_i [B, Hkv, P, D])

Prefill is a step with P = 0, decode one with S = 1: one graph serves both. attention_mask marks real tokens (1)
and left padding (0), so prompts of different lengths can share a batch. The step reuses the loaded network's
own modules (projections, rotary tables, norms' weights); only what depends on the engine (paged attention,
PyTorch-only int8 kernels, the fused RMSNorm kernel) is written out in plain tensor operations here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llminfer.model.base import CausalLM
from llminfer.quantization.layers import Int8WeightOnlyLinear, QuantizedLinear

# schemes whose layers this graph can express (A16W8: int8 weights dequantized in the graph)
EXPORTABLE_SCHEMES = ("a16w8",)
# the decoder loop below is the Llama block's; other architectures wait for export through the model's forward
EXPORTABLE_ARCHITECTURES = ("llama", "mistral", "qwen2", "phi3")


class DequantizingLinear(nn.Module):
    """An A16W8 layer for export: int8 weights and per-channel scales stay int8 in the file (a quarter of the
    float32 bytes); the graph multiplies them back to float before the matmul."""

    def __init__(self, layer: Int8WeightOnlyLinear) -> None:
        super().__init__()
        self.qweight, self.scales, self.bias = layer.qweight, layer.scales, layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
        return F.linear(x, weight, self.bias)


class DecoderStep(nn.Module):
    def __init__(self, model: CausalLM, all_logits: bool = False) -> None:
        """all_logits: logits at every new position (scoring) instead of the last one only (generation; a
        2048-token prompt would otherwise produce 2048 x vocabulary floats and their LM-head matmul)."""
        super().__init__()
        self.all_logits = all_logits
        for name, module in list(model.named_modules()):
            if isinstance(module, Int8WeightOnlyLinear):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, DequantizingLinear(module))
            elif isinstance(module, QuantizedLinear):
                raise TypeError(f"{type(module).__name__} cannot be exported")
        self.model = model
        self.config = model.config

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        net = self.model.model
        batch, new = input_ids.shape
        hidden = net.embed_tokens(input_ids)  # [B, S, H]
        past_len = attention_mask.shape[1] - new
        mask = self._visible(attention_mask, past_len, new)  # [B, 1, S, P+S]
        presents = []
        for index, layer in enumerate(net.layers):
            attn = layer.self_attn
            x = self._rms_norm(layer.input_layernorm, hidden)
            qkv = attn.qkv_proj(x)
            q, k, v = qkv.split([attn.q_size, attn.kv_size, attn.kv_size], dim=-1)
            heads = torch.cat([q, k], dim=-1).reshape(batch * new, attn.num_heads + attn.num_kv_heads, attn.head_dim)
            heads = attn.rotary_emb[0](position_ids.reshape(-1), heads).reshape(batch, new, -1, attn.head_dim)
            q = heads[:, :, :attn.num_heads].transpose(1, 2)  # [B, Hq, S, D]
            k = heads[:, :, attn.num_heads:].transpose(1, 2)  # [B, Hkv, S, D]
            v = v.reshape(batch, new, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
            k = torch.cat([past[2 * index], k], dim=2)  # [B, Hkv, P+S, D]
            v = torch.cat([past[2 * index + 1], v], dim=2)
            presents += [k, v]
            out = self._attention(q, k, v, mask, attn.num_heads // attn.num_kv_heads, attn.attn.scale)
            hidden = hidden + attn.o_proj(out.transpose(1, 2).reshape(batch, new, attn.q_size))
            x = self._rms_norm(layer.post_attention_layernorm, hidden)
            hidden = hidden + layer.mlp(x)
        if not self.all_logits:
            hidden = hidden[:, -1:]  # with left padding, every row's last position is a real token
        hidden = self._rms_norm(net.norm, hidden)
        logits = self.model.lm_head(hidden).float()
        return (logits, *presents)

    def _visible(self, attention_mask: torch.Tensor, past_len: torch.Tensor | int, new: int) -> torch.Tensor:
        """Key j is visible to new token i (absolute index past_len + i) iff j <= past_len + i, j is not padding,
        and (sliding window) past_len + i - j < window."""
        keys = torch.arange(attention_mask.shape[1], device=attention_mask.device)
        queries = torch.arange(new, device=attention_mask.device) + past_len
        offset = queries[:, None] - keys[None, :]  # [S, P+S]
        visible = offset >= 0
        if self.config.sliding_window is not None:
            visible = visible & (offset < self.config.sliding_window)
        return visible[None, None] & attention_mask.bool()[:, None, None, :]

    @staticmethod
    def _attention(q, k, v, mask, group: int, scale: float) -> torch.Tensor:
        if group > 1:  # grouped-query attention: each KV head serves `group` query heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # softmax in float32 whatever the dtype
        scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)  # a padding row stays finite
        return (scores.softmax(dim=-1) @ v.float()).to(q.dtype)

    @staticmethod
    def _rms_norm(norm: nn.Module, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + norm.eps)
        return norm.weight * normed.to(x.dtype)
