"""The post-training quantization API:

    cfg = PTQConfig(mode="quantize", weight_dtype="int4", group_size=64, kv_dtype="int8", algorithm="gptq")
    q = GPTQ(cfg)                        # or RTN(cfg)
    q.apply(model, calibration=texts)    # measure: activation statistics (GPTQ, SmoothQuant); RTN needs none
    q.convert(model)                     # swap the linear layers for packed quantized ones
    save_quantized(model, "out/")        # deploy with LLM("out/") or AutoModel.from_pretrained("out/")
"""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from llminfer.config import DTYPES
from llminfer.errors import ConfigError
from llminfer.layers.linear import Linear
from llminfer.quantization import functional as Q
from llminfer.quantization.apply import cast_float_parts, replace_module, target_linears
from llminfer.quantization.calibration import CalibrationData, calibration_data
from llminfer.quantization.config import PTQConfig, QuantizationConfig
from llminfer.quantization.layers import QUANTIZED_LAYERS
from llminfer.quantization.methods import int8_lm_head_config

# Calibration and GPTQ take minutes: the bars are shown even when stderr is not a terminal (a log then gets a line
# every 10 s instead of a redrawn bar).
_PROGRESS = {"file": sys.stderr, "disable": False, "mininterval": 0.1 if sys.stderr.isatty() else 10.0}

Calibration = str | Sequence[str] | Sequence[Sequence[int]] | None


class PostTrainingQuantizer:
    """apply() gathers what the algorithm needs from calibration data; convert() quantizes the layers."""

    needs_calibration = False

    def __init__(self, config: PTQConfig) -> None:
        self.config = config
        self.calibration: CalibrationData | None = None
        self._stats: dict[str, torch.Tensor] = {}  # per layer: Hessian (GPTQ) or activation maxima (SmoothQuant)

    def apply(self, model: nn.Module, calibration: Calibration = None, calibration_source: str | None = None
              ) -> nn.Module:
        if model.quantization is not None:
            raise ConfigError(f"the model is already quantized ({model.quantization.describe()})")
        if self.needs_calibration:
            window = min(self.config.calibration_window, model.config.max_position_embeddings - 1)
            self.calibration = calibration_data(calibration, model.tokenizer, self.config.calibration_tokens,
                                                window, calibration_source)
            self._calibrate(model)
        return model

    def convert(self, model: nn.Module) -> nn.Module:
        if self.needs_calibration and self.calibration is None:
            raise ConfigError(f"{type(self).__name__} ({self.config.algorithm}) needs apply(model, calibration=...) "
                              "before convert()")
        qconfig = self.config.quantization_config(self.calibration.describe() if self.calibration else None)
        layer_class = QUANTIZED_LAYERS[qconfig.scheme]
        targets = target_linears(model, qconfig)
        for name, linear in targets:
            if qconfig.group_size:
                Q.check_group_size(linear.in_features, qconfig.group_size, name)
        for name, linear in tqdm(targets, desc="quantizing", unit="layer", **_PROGRESS):
            with torch.no_grad():
                layer = layer_class.from_float(linear, qconfig, **self._layer_state(name, linear, qconfig))
            replace_module(model, name, layer)
        if qconfig.int8_lm_head and not qconfig.quantize_lm_head and isinstance(model.lm_head, Linear):
            # The largest matrix of a small model, streamed once per decode step: int8 per channel (A16W8), its
            # own copy when tied to the embedding (which stays float for the lookup).
            model.lm_head = QUANTIZED_LAYERS["a16w8"].from_float(model.lm_head, int8_lm_head_config(qconfig))
        cast_float_parts(model, DTYPES[qconfig.compute_dtype])
        model.quantization = qconfig
        self._stats.clear()
        return model

    def _layer_state(self, name: str, linear: nn.Module, qconfig: QuantizationConfig) -> dict[str, torch.Tensor]:
        return {}

    def _calibrate(self, model: nn.Module) -> None:
        """Run the float model over the calibration windows with a hook on every target layer's input."""
        qconfig = self.config.quantization_config()
        hooks = [module.register_forward_hook(self._recorder(name))
                 for name, module in target_linears(model, qconfig)]
        try:
            windows = self.calibration.windows
            for window in tqdm(windows, desc="calibrating", unit="win", **_PROGRESS):
                model.sequence_logits(window)  # one whole-window pass, no KV cache: the hooks see every input
        finally:
            for hook in hooks:
                hook.remove()

    def _recorder(self, name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            self._observe(name, inputs[0].reshape(-1, inputs[0].shape[-1]).float())
        return record

    def _observe(self, name: str, x: torch.Tensor) -> None:
        raise NotImplementedError


class RTN(PostTrainingQuantizer):
    """Round-to-nearest on every scheme; with algorithm='smoothquant' (A8W8), per-input-channel smoothing
    factors s_j = max|x_j|^a / max|W_j|^(1-a) from calibration data move activation outliers into the weights
    (Xiao et al., 2023)."""

    def __init__(self, config: PTQConfig) -> None:
        if config.algorithm == "gptq":
            raise ConfigError("PTQConfig(algorithm='gptq') is run by GPTQ(cfg), not RTN(cfg)")
        super().__init__(config)
        self.needs_calibration = config.algorithm == "smoothquant"

    def _observe(self, name: str, x: torch.Tensor) -> None:
        peak = x.abs().amax(dim=0)
        self._stats[name] = torch.maximum(self._stats[name], peak) if name in self._stats else peak

    def _layer_state(self, name: str, linear: nn.Module, qconfig: QuantizationConfig) -> dict[str, torch.Tensor]:
        if not qconfig.smoothing:
            return {}
        alpha = self.config.smoothquant_alpha
        act_peak = self._stats[name].clamp(min=1e-5)
        weight_peak = linear.weight.float().abs().amax(dim=0).clamp(min=1e-5)
        smooth = (act_peak.pow(alpha) / weight_peak.pow(1 - alpha)).clamp(min=1e-5)
        return {"smooth": smooth}


class GPTQ(PostTrainingQuantizer):
    """GPTQ (Frantar et al., 2022) for A16W4: columns are quantized in order and each one's rounding error is
    spread over the not-yet-quantized columns, weighted by the inverse Hessian H = 2 X^T X of the layer's
    calibration inputs. Group grids (min-max) are fixed when their first column is reached."""

    needs_calibration = True

    def __init__(self, config: PTQConfig) -> None:
        if config.algorithm != "gptq":
            config = replace(config, algorithm="gptq")
        super().__init__(config)
        self._counts: dict[str, int] = {}

    def _observe(self, name: str, x: torch.Tensor) -> None:
        gram = x.T @ x
        self._stats[name] = self._stats[name] + gram if name in self._stats else gram
        self._counts[name] = self._counts.get(name, 0) + x.shape[0]

    def _layer_state(self, name: str, linear: nn.Module, qconfig: QuantizationConfig) -> dict[str, torch.Tensor]:
        hessian = 2 * self._stats.pop(name) / self._counts[name]
        q, scale, zero = gptq_int4(linear.weight, hessian, qconfig.group_size, self.config.gptq_damp)
        return {"q": q, "scale": scale, "zero": zero}


def gptq_int4(weight: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01,
              block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K], hessian [K, K] -> (levels uint8 [N, K], scale [N, K/g], zero [N, K/g])."""
    W = weight.detach().float().clone()
    H = hessian.detach().double().clone()
    n, k = W.shape
    dead = torch.diag(H) == 0  # inputs that were always zero: anything goes, quantize them as zero
    H[dead, dead] = 1
    W[:, dead] = 0
    H += damp * torch.diag(H).mean() * torch.eye(k, dtype=H.dtype, device=H.device)
    # Upper Cholesky factor of H^-1: row i holds the error-propagation weights of column i.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    levels = torch.zeros(n, k, dtype=torch.uint8, device=W.device)
    scales = torch.zeros(n, k // group_size, device=W.device)
    zeros = torch.zeros(n, k // group_size, device=W.device)
    block_size = max(block_size // group_size, 1) * group_size  # a group never spans two blocks
    for b0 in range(0, k, block_size):
        b1 = min(b0 + block_size, k)
        W1, H1 = W[:, b0:b1].clone(), Hinv[b0:b1, b0:b1]
        errors = torch.zeros_like(W1)
        for i in range(b1 - b0):
            col = b0 + i
            if col % group_size == 0:
                scale, zero = Q.int4_group_params(W1[:, i:i + group_size], group_size)
                scales[:, col // group_size], zeros[:, col // group_size] = scale[:, 0], zero[:, 0]
                scale, zero = scale[:, 0], zero[:, 0]
            w = W1[:, i]
            q = torch.round(w / scale + zero).clamp(0, Q.INT4_LEVELS)
            levels[:, col] = q.to(torch.uint8)
            error = (w - (q - zero) * scale) / H1[i, i]
            W1[:, i:] -= error[:, None] * H1[i, i:][None, :]
            errors[:, i] = error
        W[:, b1:] -= errors @ Hinv[b0:b1, b1:]
    return levels, scales, zeros


def quantizer_for(config: PTQConfig) -> PostTrainingQuantizer:
    return GPTQ(config) if config.algorithm == "gptq" else RTN(config)
