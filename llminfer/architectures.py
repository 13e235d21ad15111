"""The architecture registry: one entry per decoder family we run.

An entry says what the network is called in Hugging Face `config.json` and in GGUF metadata, which model
class builds it (imported only when a model is built), which config fields it reads beyond the common
Llama-shaped ones, and how its GGUF tensors map to checkpoint names. Config validation, the loaders and
error messages all read this one list. Adding an architecture = a model file + an entry here.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

from llminfer.errors import UnsupportedModelError

if TYPE_CHECKING:
    from llminfer.model.base import CausalLM

# llama.cpp tensor names inside a block (blk.N.<name>) -> our checkpoint names under model.layers.N.
LLAMA_GGUF_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


@dataclass(frozen=True)
class Architecture:
    model_type: str  # our name, ModelConfig.model_type
    hf_architectures: tuple[str, ...]  # HF config.json "architectures" entries
    hf_model_types: tuple[str, ...]  # HF "model_type" values
    model_class: str  # "module:Class", imported when the network is built
    # config.json -> ModelConfig fields that differ from the Llama defaults (HF dict, source name for errors)
    hf_config: Callable[[dict[str, Any], str], dict[str, Any]] = lambda hf, source: {}
    gguf_architecture: str | None = None  # GGUF general.architecture, if llama.cpp files of it load
    gguf_block_names: dict[str, str] = field(default_factory=lambda: dict(LLAMA_GGUF_BLOCK_NAMES))
    gguf_permutes_qk: bool = False  # llama.cpp's converter permuted Q/K rows (interleaved rotary pairs)
    # GGUF metadata -> ModelConfig fields beyond the common ones (a getter of "<arch>.<key>" with a default)
    gguf_config: Callable[[Callable[[str, Any], Any]], dict[str, Any]] = lambda meta: {}
    gguf_norm_offset: float = 0.0  # llama.cpp stores Gemma's norm weights as w + 1: subtracted on load

    def network_class(self) -> type["CausalLM"]:
        module, _, name = self.model_class.partition(":")
        return getattr(importlib.import_module(module), name)


ARCHITECTURES: dict[str, Architecture] = {}


def register(architecture: Architecture) -> Architecture:
    ARCHITECTURES[architecture.model_type] = architecture
    return architecture


def architecture_of(model_type: str) -> Architecture:
    if model_type not in ARCHITECTURES:
        raise UnsupportedModelError(f"model_type '{model_type}' is not supported "
                                    f"(supported: {', '.join(sorted(ARCHITECTURES))})")
    return ARCHITECTURES[model_type]


def supported_hf_names() -> list[str]:
    return sorted(name for a in ARCHITECTURES.values() for name in a.hf_architectures)


# --- the entries --------------------------------------------------------------------------------------

_QK_NORM_GGUF_NAMES = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}


def _qwen_sliding_window(hf: dict[str, Any]) -> int | None:
    """Qwen configs carry a sliding_window that only applies when use_sliding_window says so."""
    return hf.get("sliding_window") if hf.get("use_sliding_window", False) else None


def _qwen2_config(hf: dict[str, Any], source: str) -> dict[str, Any]:
    return {"attention_bias": bool(hf.get("attention_bias", True)), "sliding_window": _qwen_sliding_window(hf)}


def _qwen3_config(hf: dict[str, Any], source: str) -> dict[str, Any]:
    return {"qk_norm": True, "sliding_window": _qwen_sliding_window(hf)}


def _every_nth_layer_global(num_layers: int, pattern: int) -> tuple[str, ...]:
    """Gemma's interleave: pattern - 1 sliding-window layers, then one full-attention layer, repeated."""
    return tuple("full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers))


def _gemma3_config(hf: dict[str, Any], source: str) -> dict[str, Any]:
    for cap in ("final_logit_softcapping", "attn_logit_softcapping"):
        if hf.get(cap) is not None:
            raise UnsupportedModelError(f"{source}: Gemma 3 with {cap}={hf[cap]} is not supported")
    pattern = hf.get("sliding_window_pattern") or hf.get("_sliding_window_pattern") or 6
    layer_types = hf.get("layer_types") or _every_nth_layer_global(hf["num_hidden_layers"], pattern)
    rope = hf.get("rope_parameters") or {}
    local = (rope.get("sliding_attention") or {}).get("rope_theta", hf.get("rope_local_base_freq", 10000.0))
    full = rope.get("full_attention") or {}
    scaling = full if full.get("rope_type", "default") != "default" else hf.get("rope_scaling")
    fields = {"qk_norm": True, "hidden_act": hf.get("hidden_activation") or "gelu_pytorch_tanh",
              "layer_types": tuple(layer_types), "rope_local_base_freq": float(local),
              "query_pre_attn_scalar": float(hf.get("query_pre_attn_scalar", hf.get("head_dim", 256))),
              "tie_word_embeddings": bool(hf.get("tie_word_embeddings", True)),
              "rope_scaling": {k: v for k, v in scaling.items() if k != "rope_theta"} if scaling else None}
    if "rope_theta" in full:
        fields["rope_theta"] = float(full["rope_theta"])
    return fields


def _gemma3_gguf_config(meta: Callable[[str, Any], Any]) -> dict[str, Any]:
    # llama.cpp's gemma3 files carry no layer pattern, local rope base or attention scale: it fixes them
    # (every 6th layer global, local base 10k, scale head_dim ** -0.5), and so do we.
    pattern = meta("attention.sliding_window_pattern", 6)
    return {"hidden_act": "gelu_pytorch_tanh", "rope_local_base_freq": 10000.0,
            "layer_types": _every_nth_layer_global(meta("block_count", None), pattern),
            "query_pre_attn_scalar": float(meta("attention.key_length", None))}


def _phi3_config(hf: dict[str, Any], source: str) -> dict[str, Any]:
    partial = hf.get("partial_rotary_factor", (hf.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedModelError(f"{source}: Phi-3 with partial_rotary_factor={partial} is not supported "
                                    "(only full rotary, 1.0)")
    return {}


register(Architecture("llama", ("LlamaForCausalLM",), ("llama",), "llminfer.model.llama:LlamaForCausalLM",
                      gguf_architecture="llama", gguf_permutes_qk=True))
register(Architecture("mistral", ("MistralForCausalLM",), ("mistral",), "llminfer.model.llama:LlamaForCausalLM",
                      gguf_architecture="mistral"))
register(Architecture("qwen2", ("Qwen2ForCausalLM",), ("qwen2",), "llminfer.model.llama:LlamaForCausalLM",
                      hf_config=_qwen2_config, gguf_architecture="qwen2"))
register(Architecture("qwen3", ("Qwen3ForCausalLM",), ("qwen3",), "llminfer.model.qwen3:Qwen3ForCausalLM",
                      hf_config=_qwen3_config, gguf_architecture="qwen3",
                      gguf_block_names={**LLAMA_GGUF_BLOCK_NAMES, **_QK_NORM_GGUF_NAMES}))
register(Architecture("gemma3", ("Gemma3ForCausalLM",), ("gemma3_text", "gemma3"),
                      "llminfer.model.gemma3:Gemma3ForCausalLM", hf_config=_gemma3_config,
                      gguf_architecture="gemma3", gguf_config=_gemma3_gguf_config, gguf_norm_offset=1.0,
                      gguf_block_names={**LLAMA_GGUF_BLOCK_NAMES, **_QK_NORM_GGUF_NAMES,
                                        "post_attention_norm": "post_attention_layernorm",
                                        "ffn_norm": "pre_feedforward_layernorm",
                                        "post_ffw_norm": "post_feedforward_layernorm"}))
# Phi-3's checkpoints store q|k|v and gate|up already fused: the same network, loaded whole into them.
register(Architecture("phi3", ("Phi3ForCausalLM",), ("phi3",), "llminfer.model.llama:LlamaForCausalLM",
                      hf_config=_phi3_config))
