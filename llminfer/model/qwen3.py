"""Qwen3 (Yang et al., 2025): the Llama block, with an RMSNorm over each query and key head before rotary
(QK-norm, for training stability) and no q/k/v biases."""

import torch

from llminfer.config import ModelConfig
from llminfer.layers.attention import ForwardContext
from llminfer.layers.factory import LayerFactory
from llminfer.layers.norm import RMSNorm
from llminfer.layers.rotary import RotaryEmbedding
from llminfer.model.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM


class Qwen3Attention(LlamaAttention):
    norm_class: type[RMSNorm] = RMSNorm  # Gemma 3 plugs in its (1 + weight) norm

    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding, layers: LayerFactory,
                 prefix: str) -> None:
        super().__init__(config, layer_idx, rotary_emb, layers, prefix)
        # one weight [D] for every head
        self.q_norm = self.norm_class(self.head_dim, config.rms_norm_eps, layers.ops)
        self.k_norm = self.norm_class(self.head_dim, config.rms_norm_eps, layers.ops)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(-1, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        rotary = self.rotary_emb[0]
        q, k = rotary(positions, q), rotary(positions, k)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        return self.o_proj(self.attn(q, k, v, ctx))  # [T, H]


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    decoder_layer_class = Qwen3DecoderLayer
