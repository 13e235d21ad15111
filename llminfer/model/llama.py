"""The Llama family (Llama 2/3, Mistral, Qwen2, SmolLM2) as one decoder-only network (Qwen3 varies its attention).

Touvron et al., 2023: pre-norm decoder blocks of RMSNorm -> grouped-query attention with rotary
positions -> residual, RMSNorm -> SwiGLU MLP -> residual. Mistral adds a sliding attention
window, Qwen2 biases on q/k/v. Parameter names follow Hugging Face checkpoints, except that
q/k/v and gate/up are fused (see `packed_modules_mapping`).

Tokens of all sequences in a batch are flattened: shapes below use T for that total.
"""

import torch
from torch import nn

from llminfer.config import ModelConfig
from llminfer.layers.attention import Attention, ForwardContext
from llminfer.layers.factory import LayerFactory
from llminfer.layers.norm import RMSNorm
from llminfer.layers.rotary import RotaryEmbedding
from llminfer.model.base import CausalLM


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding, layers: LayerFactory,
                 prefix: str) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads = config.num_attention_heads, config.num_key_value_heads
        self.head_dim = config.head_dim
        self.q_size, self.kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        self.qkv_proj = layers.merged_column(
            f"{prefix}.qkv_proj", config.hidden_size,
            {"q": (self.q_size, "heads"), "k": (self.kv_size, "kv_heads"), "v": (self.kv_size, "kv_heads")},
            bias=config.attention_bias)
        self.o_proj = layers.row(f"{prefix}.o_proj", self.q_size, config.hidden_size, split_by="heads")
        self.rotary_emb = [rotary_emb]  # a list, so the shared module is not registered once per layer
        scale = config.query_pre_attn_scalar ** -0.5 if config.query_pre_attn_scalar else None  # Gemma's choice
        self.attn = Attention(layer_idx, self.num_heads, self.num_kv_heads, self.head_dim,
                              config.layer_sliding_window(layer_idx), scale)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 Hkv) D]
        qk, v = qkv.split([self.q_size + self.kv_size, self.kv_size], dim=-1)
        qk = self.rotary_emb[0](positions, qk.view(-1, self.num_heads + self.num_kv_heads, self.head_dim))
        q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)  # [T, Hq, D], [T, Hkv, D]
        v = v.view(-1, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        return self.o_proj(self.attn(q, k, v, ctx))  # [T, H]


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig, layers: LayerFactory, prefix: str) -> None:
        super().__init__()
        width = config.intermediate_size
        self.gate_up_proj = layers.merged_column(f"{prefix}.gate_up_proj", config.hidden_size,
                                                 {0: (width, "intermediate"), 1: (width, "intermediate")})
        self.down_proj = layers.row(f"{prefix}.down_proj", width, config.hidden_size, split_by="intermediate")
        # SwiGLU (Shazeer, 2020), or GeGLU with tanh GELU for the Gemma family
        ops = layers.ops
        self.act_and_mul = ops.silu_and_mul if config.hidden_act == "silu" else ops.gelu_tanh_and_mul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_and_mul(self.gate_up_proj(x)))  # [T, H] -> [T, 2I] -> [T, I] -> [T, H]


class LlamaDecoderLayer(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)). The residual stream is carried beside the hidden state, so each
    residual add is fused into the norm that follows it."""

    attention_class: type[nn.Module] = LlamaAttention  # a variant's attention (Qwen3's q/k norms) plugs in here

    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding, layers: LayerFactory,
                 prefix: str) -> None:
        super().__init__()
        ops = layers.ops
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.self_attn = self.attention_class(config, layer_idx, rotary_emb, layers, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.mlp = LlamaMLP(config, layers, f"{prefix}.mlp")

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:  # the first layer: the residual stream starts as the embeddings
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, ctx)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig, layers: LayerFactory, prefix: str = "model",
                 decoder_layer: type[LlamaDecoderLayer] = LlamaDecoderLayer) -> None:
        super().__init__()
        ops = layers.ops
        self.embed_tokens = layers.embedding(f"{prefix}.embed_tokens", config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                          config.rope_scaling, ops)
        self.layers = nn.ModuleList(
            decoder_layer(config, i, self.rotary_emb, layers, f"{prefix}.layers.{i}")
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None  # [T, H]
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual, ctx)
        return self.norm(hidden, residual)[0]


class LlamaForCausalLM(CausalLM):
    # checkpoint name -> (our fused parameter, which part of it)
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    decoder_layer_class: type[LlamaDecoderLayer] = LlamaDecoderLayer

    def __init__(self, config: ModelConfig, layers: LayerFactory) -> None:
        super().__init__(config, layers)
        self.model = LlamaModel(config, layers, decoder_layer=self.decoder_layer_class)
        self.add_lm_head(layers)
