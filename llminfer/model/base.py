"""What every causal LM class shares: weight loading by checkpoint name (generation: llminfer.generate)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Sequence

import torch
from torch import nn

from llminfer.config import ModelConfig
from llminfer.errors import ModelFormatError
from llminfer.layers.attention import DenseAttentionBackend, ForwardContext
from llminfer.layers.factory import LayerFactory
from llminfer.layers.linear import Linear, default_weight_loader
from llminfer.layers.parallel import REPLICATED, TensorSplit

if TYPE_CHECKING:
    from llminfer.config import QuantizationConfig
    from llminfer.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# Tensors some checkpoints carry that the network computes itself.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CausalLM(nn.Module):
    packed_modules_mapping: dict[str, tuple[str, str | int]] = {}

    def __init__(self, config: ModelConfig, layers: LayerFactory) -> None:
        super().__init__()
        self.config = config
        self.ops = layers.ops  # the implementation of every op, chosen for this model's device
        self.tokenizer: Tokenizer | None = None  # attached by AutoModel.from_pretrained when the checkpoint has one
        self.quantization: QuantizationConfig | None = None  # set when the linear layers are quantized

    def add_lm_head(self, layers: LayerFactory) -> None:
        """The LM head over `self.model`'s hidden states, sharing the embedding matrix when the config ties them
        (unless the head is quantized)."""
        self.lm_head = layers.lm_head("lm_head", self.config.hidden_size, self.config.vocab_size)
        if self.config.tie_word_embeddings and isinstance(self.lm_head, Linear):
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, positions, ctx)  # [T] ids -> [T, H] final hidden states

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [N, H] -> [N, V]

    @torch.no_grad()
    def sequence_logits(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Logits at every position of one whole sequence [L, V], with no KV cache (the engine is not needed)."""
        ids = torch.tensor(list(token_ids), dtype=torch.long, device=self.device)
        positions = torch.arange(len(ids), device=self.device)
        ctx = DenseAttentionBackend.context(self.ops, [len(ids)], self.device)
        return self.compute_logits(self(ids, positions, ctx))

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]] | str | Path,
                     source: str = "checkpoint") -> None:
        """Copy checkpoint tensors (HF names) into the parameters; every parameter must be filled.

        `weights` is (name, tensor) pairs, or a checkpoint path/alias to read them from.
        """
        if isinstance(weights, (str, Path)):
            from llminfer.loading import open_checkpoint

            checkpoint = open_checkpoint(str(weights))
            checkpoint.check_compatible(self.config)
            weights, source = checkpoint.named_tensors(), checkpoint.name
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for name, tensor in weights:
            if name.endswith(_IGNORED_SUFFIXES) or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            param_name, shard = self._parameter_for(name)
            param = params.get(param_name)
            if param is None:
                logger.warning("%s: ignoring tensor '%s' that this model has no parameter for", source, name)
                continue
            loader = getattr(param, "weight_loader", None)
            try:
                value = tensor.to(param.dtype)
                loader(param, value, shard) if loader else default_weight_loader(param, value)
            except ValueError as exc:
                raise ModelFormatError(f"{source}: tensor '{name}': {exc}") from None
            owner_parts = getattr(self.get_submodule(param_name.rsplit(".", 1)[0]), "shard_offsets", None)
            if shard is None and owner_parts:  # stored fused: every part of it is loaded
                loaded.update(f"{param_name}/{part}" for part in owner_parts)
            else:
                loaded.add(f"{param_name}/{shard}")
        expected = {f"{name}/{shard}" for name, shard in self._expected_parts(params)}
        missing = sorted(expected - loaded)
        if missing:
            raise ModelFormatError(f"{source}: missing tensor(s) for {', '.join(m.split('/')[0] for m in missing[:5])}"
                                   + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
        for module in self.modules():  # e.g. quantized layers fold their scales into the kernel's layout
            if hasattr(module, "process_weights_after_loading"):
                module.process_weights_after_loading()

    def checkpoint_split(self, name: str) -> TensorSplit:
        """The share of checkpoint tensor `name` this network holds, as the layer it loads into answers it (the
        whole tensor on one process; norms and tensors the network does not have: replicated)."""
        param_name, shard = self._parameter_for(name)
        owner_name, _, suffix = param_name.rpartition(".")
        try:
            owner = self.get_submodule(owner_name)
        except AttributeError:
            return REPLICATED
        split = getattr(owner, "tensor_split", None)
        return split(suffix, shard) if split is not None else REPLICATED

    def _parameter_for(self, checkpoint_name: str) -> tuple[str, str | int | None]:
        for ckpt_part, (fused, shard) in self.packed_modules_mapping.items():
            if f".{ckpt_part}." in checkpoint_name:
                return checkpoint_name.replace(f".{ckpt_part}.", f".{fused}."), shard
        return checkpoint_name, None

    def _expected_parts(self, params: dict[str, nn.Parameter]) -> list[tuple[str, str | int | None]]:
        parts = []
        for name in params:
            owner = self.get_submodule(name.rsplit(".", 1)[0])
            shards = getattr(owner, "shard_offsets", None)
            parts.extend((name, shard) for shard in shards) if shards else parts.append((name, None))
        return parts
