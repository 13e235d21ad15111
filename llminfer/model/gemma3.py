"""Gemma 3 (Gemma Team, 2025), text decoder.

Differences from the Llama block: RMSNorm scales by (1 + weight); each block normalizes both before and after
its attention and its MLP ("sandwich" norms); the MLP is GeGLU with tanh GELU; embeddings are multiplied by
sqrt(hidden_size); queries and keys get a per-head RMSNorm before rotary and the attention scale is
query_pre_attn_scalar ** -0.5; five local layers (sliding window, rope base 10k) alternate with one global
layer (full context, rope base 1M, optionally scaled). The embedding matrix is tied to the LM head.
"""

import torch
from torch import nn

from llminfer.config import ModelConfig
from llminfer.layers.attention import ForwardContext
from llminfer.layers.factory import LayerFactory
from llminfer.layers.norm import RMSNorm
from llminfer.layers.rotary import RotaryEmbedding
from llminfer.model.base import CausalLM
from llminfer.model.llama import LlamaForCausalLM, LlamaMLP
from llminfer.model.qwen3 import Qwen3Attention


class Gemma3RMSNorm(RMSNorm):
    """Checkpoints store w; the norm multiplies by 1 + w (zero-initialized weights mean identity)."""

    def scale(self) -> torch.Tensor:
        return self.weight + 1.0


class Gemma3Attention(Qwen3Attention):
    norm_class = Gemma3RMSNorm


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding, layers: LayerFactory,
                 prefix: str) -> None:
        super().__init__()
        hidden, eps, ops = config.hidden_size, config.rms_norm_eps, layers.ops
        self.input_layernorm = Gemma3RMSNorm(hidden, eps, ops)
        self.self_attn = Gemma3Attention(config, layer_idx, rotary_emb, layers, f"{prefix}.self_attn")
        self.post_attention_layernorm = Gemma3RMSNorm(hidden, eps, ops)
        self.pre_feedforward_layernorm = Gemma3RMSNorm(hidden, eps, ops)
        self.mlp = LlamaMLP(config, layers, f"{prefix}.mlp")  # gate/up/down with the config's GELU
        self.post_feedforward_layernorm = Gemma3RMSNorm(hidden, eps, ops)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden: what the previous block adds to the residual stream (the embeddings, for the first)."""
        if residual is None:
            x, residual = self.input_layernorm(hidden), hidden
        else:
            x, residual = self.input_layernorm(hidden, residual)
        x = self.post_attention_layernorm(self.self_attn(positions, x, ctx))
        x, residual = self.pre_feedforward_layernorm(x, residual)
        return self.post_feedforward_layernorm(self.mlp(x)), residual


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig, layers: LayerFactory, prefix: str = "model") -> None:
        super().__init__()
        ops = layers.ops
        self.embed_tokens = layers.embedding(f"{prefix}.embed_tokens", config.vocab_size, config.hidden_size)
        # sqrt(H) rounded to each compute dtype, as HF's tensor of it is (a Python number in forward: no tensor is
        # built from Python values there, so that a recorded decode step can replay it)
        self.embed_scale = {dtype: torch.tensor(config.hidden_size ** 0.5, dtype=dtype, device="cpu").item()
                            for dtype in (torch.float32, torch.bfloat16, torch.float16)}
        head_dim, positions = config.head_dim, config.max_position_embeddings
        self.rotary_emb = RotaryEmbedding(head_dim, positions, config.rope_theta, config.rope_scaling, ops)
        self.rotary_emb_local = RotaryEmbedding(head_dim, positions, config.rope_local_base_freq or 10000.0, None,
                                                ops)
        self.layers = nn.ModuleList(
            Gemma3DecoderLayer(config, i, self.rotary_emb if config.layer_sliding_window(i) is None
                               else self.rotary_emb_local, layers, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers))
        self.norm = Gemma3RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        embeddings = self.embed_tokens(input_ids)  # [T, H]
        hidden = embeddings * self.embed_scale[embeddings.dtype]
        residual = None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, ctx)
        return self.norm(hidden, residual)[0]


class Gemma3ForCausalLM(CausalLM):
    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping  # q|k|v and gate|up fused the same way

    def __init__(self, config: ModelConfig, layers: LayerFactory) -> None:
        super().__init__(config, layers)
        self.model = Gemma3Model(config, layers)
        self.add_lm_head(layers)
