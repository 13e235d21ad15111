"""Build a network from a config, and load one from any checkpoint we can read."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch

from llminfer.architectures import architecture_of
from llminfer.config import DTYPES, ModelConfig, QuantizationConfig, load_model_config_file
from llminfer.errors import ConfigError
from llminfer.layers.factory import LayerFactory
from llminfer.layers.parallel import Collectives, TensorParallelPlan
from llminfer.loading.checkpoint import Checkpoint
from llminfer.model.base import CausalLM
from llminfer.ops import OpSet, resolve_ops
from llminfer.quantization.methods import QuantizationMethod
from llminfer.schemes import QUANTIZATION_SCHEMES

logger = logging.getLogger(__name__)


def build_model(config: ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                quantization: QuantizationConfig | None = None, ops: OpSet | None = None,
                shard_plan: TensorParallelPlan | None = None, collectives: Collectives | None = None) -> CausalLM:
    """An uninitialised network of the config's shape (weights are loaded afterwards), calling `ops` (default:
    the best implementations available on `device`).

    Its layers come from one LayerFactory: with a quantization config, the projections it covers are built as
    quantized layers (no float weight is allocated for them); with a shard plan, as this rank's share of the
    config's network (`config` is then the plan's rank config) combined through `collectives`.
    """
    layers = LayerFactory(ops or resolve_ops(None, device),
                          QuantizationMethod(quantization) if quantization is not None else None,
                          shard_plan, collectives)
    # Create parameters directly in the target dtype and device: no float32 copy of a bf16 model.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = architecture_of(config.model_type).network_class()(config, layers)
    finally:
        torch.set_default_dtype(previous)
    if quantization is not None:
        model.quantization = quantization
    return model.eval()


class AutoModel:
    """`AutoModel.from_pretrained(path)` or `AutoModel.from_config(file)` then `.load_weights(...)`."""

    @staticmethod
    def from_config(config: ModelConfig | str | Path, dtype: str = "float32", device: str = "cpu",
                    seed: int | None = 0, ops: str | dict[str, str] | None = None) -> CausalLM:
        """A network with small random weights, built from a ModelConfig or a YAML/JSON config file."""
        if not isinstance(config, ModelConfig):
            config = load_model_config_file(config)
        model = build_model(config, _dtype(dtype), device, ops=resolve_ops(ops, device))
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight"):
                    param.fill_(1.0)
                else:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.02)
        return model

    @staticmethod
    def from_pretrained(model: str | Path, dtype: str = "auto", device: str = "cpu",
                        quantization: str | None = None, ops: str | dict[str, str] | None = None) -> CausalLM:
        """Load an HF folder, a GGUF file, a converted or quantized folder, a hub id or an alias like
        'smollm2-135m'. dtype 'auto' is float32, or bfloat16 for quantized models. `quantization` (a scheme)
        quantizes a float checkpoint at load by round-to-nearest, or must match a quantized checkpoint's.
        `ops` picks op implementations ('rms_norm=reference,...'; default: the best available here)."""
        from llminfer.loading import open_checkpoint

        return load_model(open_checkpoint(str(model)), dtype, device, quantization, ops=resolve_ops(ops, device))


def load_model(checkpoint: Checkpoint, dtype: str = "auto", device: str = "cpu",
               quantization: str | None = None, shard_plan: TensorParallelPlan | None = None,
               ops: OpSet | None = None, collectives: Collectives | None = None,
               max_model_len: int | None = None) -> CausalLM:
    """A ready network (tokenizer attached) from a checkpoint. Quantized checkpoints are built quantized and
    their packed weights loaded directly: no float weight of a quantized layer is ever created. With a shard
    plan (and the collectives that join the ranks), this rank's share of the network, reading only its slice of
    each tensor. max_model_len: the context the caller will use (position tables are sized by it, not by the
    config's maximum)."""
    stored = checkpoint.quantization_config()
    if stored is not None and quantization not in (None, stored.scheme):
        raise ConfigError(f"{checkpoint.name}: the checkpoint is quantized as {stored.describe()}; "
                          f"quantization '{quantization}' conflicts with it (omit the flag, or quantize the float "
                          "checkpoint instead)")
    if dtype == "auto":
        dtype = stored.compute_dtype if stored else "bfloat16" if quantization else "float32"
    config = checkpoint.config if shard_plan is None else shard_plan.rank_config  # its heads and MLP width
    if max_model_len is not None and max_model_len < config.max_position_embeddings:
        config = replace(config, max_position_embeddings=max_model_len)
    check_fits_in_memory(config, torch.float32 if quantization and stored is None else _dtype(dtype),
                         stored is not None, device, checkpoint.name)
    if stored is not None:
        network = build_model(config, _dtype(dtype), device, replace(stored, compute_dtype=dtype), ops,
                              shard_plan, collectives)
    else:
        # Float weights are loaded in float32 when they are about to be quantized: rounding happens once.
        network = build_model(config, torch.float32 if quantization else _dtype(dtype), device, ops=ops,
                              shard_plan=shard_plan, collectives=collectives)
    network.load_weights(rank_tensors(checkpoint, network, shard_plan), source=checkpoint.name)
    if stored is None and quantization:
        from llminfer.quantization import RTN, PTQConfig

        RTN(PTQConfig.for_scheme(quantization, group_size=on_the_fly_group_size(quantization),
                                 compute_dtype=dtype)).convert(network)
    network.tokenizer = checkpoint.tokenizer()
    return network


def check_fits_in_memory(config: ModelConfig, dtype: torch.dtype, quantized: bool, device: str,
                         source: str) -> None:
    """Refuse, before building anything, a model whose weights, position tables and one KV block per layer
    exceed the memory this machine has available (a config that says 10**12 positions, a 1e6-layer GGUF)."""
    available = available_memory_bytes() if str(device) == "cpu" else None
    if available is None:
        return
    element = dtype.itemsize
    weights = config.num_parameters * (1 if quantized else element)
    rope_tables = 3 * config.max_position_embeddings * config.head_dim // 2 * 4 * (2 if config.layer_types else 1)
    kv_block = 2 * config.num_hidden_layers * config.num_key_value_heads * config.head_dim * 16 * element
    needed = weights + rope_tables + kv_block
    if needed > available:
        gib = 2**30
        raise ConfigError(f"{source}: needs about {needed / gib:.1f} GiB (weights {weights / gib:.1f} GiB, position "
                          f"tables for {config.max_position_embeddings} positions {rope_tables / gib:.1f} GiB, one "
                          f"KV block per layer {kv_block / gib:.2f} GiB) but {available / gib:.1f} GiB is available"
                          "; a smaller --max-model-len shrinks the position tables")


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), else None: the check is skipped where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def rank_tensors(checkpoint: Checkpoint, network: CausalLM, shard_plan: TensorParallelPlan | None = None):
    """The checkpoint's tensors as `network` holds them: each sliced to this rank's share (by the layer it
    loads into), or read as stored from a checkpoint sharded offline for this rank."""
    if shard_plan is None:
        return checkpoint.named_tensors()
    if hasattr(checkpoint, "rank_tensors"):  # sharded offline: this rank's files hold exactly its slices
        return checkpoint.rank_tensors(shard_plan.rank, shard_plan.world_size)
    return ((name, network.checkpoint_split(name).take(tensor)) for name, tensor in checkpoint.named_tensors())


def on_the_fly_group_size(scheme: str) -> int | None:
    """A grouped scheme quantized at load uses its finest group (a16w4: 32); others through `llminfer quantize`."""
    sizes = QUANTIZATION_SCHEMES[scheme].group_sizes
    return min(sizes) if sizes else None


def load_time_quantization(checkpoint: Checkpoint, scheme: str | None) -> QuantizationConfig | None:
    """How the loaded network's layers will be quantized: as stored, or as `scheme` asks at load."""
    stored = checkpoint.quantization_config()
    if stored is not None or not scheme:
        return stored
    return QuantizationConfig(scheme, group_size=on_the_fly_group_size(scheme))


def _dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype '{name}' is not supported (expected one of {', '.join(DTYPES)})")
    return DTYPES[name]
