"""Quantized linear layers: packed weights in memory, low-precision kernels in forward.

Each class stores what its checkpoint stores (`qweight`, `scales`, `zeros`, `smooth`, `bias`) and can give
it back in the same layout (`checkpoint_tensors`), so a converted model saves and reloads bit for bit.
Each class is one scheme (registered under its name in QUANTIZED_LAYERS): its layer, its packing, how its
tensors split across tensor-parallel ranks (`tensor_split`) and how it lowers to ONNX (or why it cannot). The
LayerFactory builds them in a projection's place when a quantized checkpoint is loaded; the model file does not
change.

Products: the ops `int8_weight_linear`, `int4_weight_linear` and `int8_int8_linear` of the layer's OpSet
(their reference implementations call PyTorch's `_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu` /
the CUDA tinygemm kernel, and `torch._int_mm`).
"""

from __future__ import annotations

import torch
from torch import nn

from llminfer.config import DTYPES, QuantizationConfig
from llminfer.errors import UnsupportedModelError
from llminfer.layers.linear import Linear
from llminfer.layers.parallel import REPLICATED, ParallelOutput, TensorSplit
from llminfer.ops import OpSet, default_ops
from llminfer.ops.linear import INT4_LAYOUTS, INT8_LAYOUTS
from llminfer.quantization import functional as Q
from llminfer.schemes import QUANTIZATION_SCHEMES


def _frozen(tensor: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(tensor, requires_grad=False)


QUANTIZED_LAYERS: dict[str, type["QuantizedLinear"]] = {}  # scheme name -> its layer class


class QuantizedLinear(ParallelOutput, nn.Module):
    scheme: str  # the name it is registered under (llminfer.schemes.QUANTIZATION_SCHEMES)

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        QUANTIZED_LAYERS[cls.scheme] = cls

    def __init__(self, in_features: int, out_features: int, bias: bool, compute_dtype: torch.dtype,
                 ops: OpSet | None = None) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.ops = ops or default_ops()
        self.compute_dtype = compute_dtype
        self.bias = _frozen(torch.zeros(out_features, dtype=compute_dtype)) if bias else None

    def _add_bias(self, y: torch.Tensor) -> torch.Tensor:
        """The product's last step: summed over ranks (row-parallel), the bias added, gathered (LM head)."""
        return self.combine(y, bias_added=False)

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x.reshape(-1, self.in_features)

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, config: QuantizationConfig,
              ops: OpSet) -> "QuantizedLinear":
        """A layer to be filled from a quantized checkpoint."""
        return cls(in_features, out_features, bias, DTYPES[config.compute_dtype], ops=ops)

    @classmethod
    def from_float(cls, linear: Linear, config: QuantizationConfig, **state: torch.Tensor) -> "QuantizedLinear":
        raise NotImplementedError

    def _take_place_of(self, linear: Linear) -> None:
        """Keep the float layer's role, checkpoint prefix and share of a tensor-parallel run, and its bias."""
        self.parallel = linear.parallel
        self.prefix, self.role = getattr(linear, "prefix", None), getattr(linear, "role", None)
        if linear.bias is not None:
            self.bias.data = linear.bias.detach().to(self.compute_dtype).clone()

    def tensor_split(self, suffix: str, shard: str | int | None = None) -> TensorSplit:
        """This rank's share of the checkpoint tensor `<prefix>.<suffix>`. Column-parallel and vocabulary rows:
        every tensor holds one row per output. Row-parallel: see `input_split`."""
        if self.parallel is None:
            return REPLICATED
        if self.parallel.role != "row":
            return REPLICATED if suffix == "smooth" else self.parallel.rows()  # smooth: one factor per input
        return REPLICATED if suffix == "bias" else self.input_split(suffix, self.parallel.columns())

    def input_split(self, suffix: str, columns: TensorSplit) -> TensorSplit:
        """A row-parallel layer's share of each tensor, given its input columns."""
        raise NotImplementedError

    def for_export(self) -> nn.Module:
        """The layer as plain tensor operations an ONNX graph can hold (PyTorch's int kernels cannot go there)."""
        exportable = [name for name, scheme in QUANTIZATION_SCHEMES.items() if scheme.exportable]
        raise UnsupportedModelError(f"{self.scheme} layers cannot be exported to ONNX "
                                    f"(exportable schemes: {', '.join(exportable)})")

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Tensor suffix -> value, in checkpoint layout."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int8WeightOnlyLinear(QuantizedLinear):
    """A16W8: y = x (q * scale)^T, int8 weights with one scale per output channel.

    The checkpoint holds q [N, K] int8 and the scales [N]; after loading, q is packed into the weight layout of
    the OpSet's int8 implementation (ops.linear.INT8_LAYOUTS), and a save reads it back as [N, K]."""

    scheme = "a16w8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, ops: OpSet | None = None) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, ops)
        self.qweight = _frozen(torch.zeros(out_features, in_features, dtype=torch.int8))  # [N, K] until packed
        self.qweight.weight_loader = self._load_plain_qweight
        self.scales = _frozen(torch.ones(out_features, dtype=compute_dtype))  # [N]; the kernel wants x's dtype
        self.layout = INT8_LAYOUTS[self.ops.weight_layout("int8_weight_linear")]
        self.packed = False

    @classmethod
    def from_float(cls, linear: Linear, config: QuantizationConfig, **state: torch.Tensor) -> "Int8WeightOnlyLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, _dtype(config), linear.ops)
        q, scale = Q.quantize_int8_per_channel(linear.weight)
        layer.qweight.data = q.to(linear.weight.device)
        layer.scales.data = scale.to(layer.compute_dtype)
        layer.process_weights_after_loading()
        layer._take_place_of(linear)
        return layer

    def _load_plain_qweight(self, param: nn.Parameter, q: torch.Tensor, shard=None) -> None:
        if self.packed or q.shape != param.shape or q.dtype != torch.int8:
            raise ValueError(f"expected int8 {(self.out_features, self.in_features)}, got {q.dtype} {tuple(q.shape)}")
        param.data = q.to(param.device).clone()

    def process_weights_after_loading(self) -> None:
        if not self.packed:
            self.qweight.data = self.layout.pack(self.qweight.data)
            self.packed = True

    def input_split(self, suffix: str, columns: TensorSplit) -> TensorSplit:
        return REPLICATED if suffix == "scales" else columns  # one scale per output channel

    def for_export(self) -> nn.Module:
        return DequantizingInt8Linear(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops.int8_weight_linear(self._flat(x), self.qweight, self.scales)
        return self._add_bias(y).reshape(*x.shape[:-1], -1)  # a vocabulary-parallel head gathers all

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        q = self.layout.rows(self.qweight, self.out_features, self.in_features) if self.packed else self.qweight
        return {"qweight": q, "scales": self.scales}


class Int4WeightOnlyLinear(QuantizedLinear):
    """A16W4: groups of `group_size` inputs share a scale and a zero point; levels packed two per byte.

    The checkpoint holds levels packed plainly ([N, K/2], even column in the low nibble), scales [N, K/g] in
    the compute dtype and float32 zero points [N, K/g]. After loading, the levels and the grid are packed into the
    weight layout of the OpSet's int4 implementation (`qweight` and `table`, ops.linear.INT4_LAYOUTS); a save reads
    levels, scales and zero points back from that layout, and they pack to the same tensors again bit for bit.
    """

    scheme = "a16w4"

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, group_size: int = 64, ops: OpSet | None = None) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, ops)
        Q.check_group_size(in_features, group_size)
        self.group_size = group_size
        groups = in_features // group_size
        self.qweight = _frozen(torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.qweight.weight_loader = self._load_plain_qweight
        self.scales = _frozen(torch.ones(out_features, groups, dtype=torch.float32))
        self.zeros = _frozen(torch.zeros(out_features, groups, dtype=torch.float32))
        self.register_buffer("table", None)  # set when the weights are packed for the kernel
        self.layout = INT4_LAYOUTS[self.ops.weight_layout("int4_weight_linear")]

    @classmethod
    def from_float(cls, linear: Linear, config: QuantizationConfig, q: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None, zero: torch.Tensor | None = None) -> "Int4WeightOnlyLinear":
        """Round-to-nearest, or the levels and grid a calibration method (GPTQ) chose."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, _dtype(config),
                    config.group_size, linear.ops)
        if q is None:
            q, scale, zero = Q.quantize_int4_groups(linear.weight, config.group_size)
        device = linear.weight.device
        layer.to(device)
        layer._load_plain_qweight(layer.qweight, Q.pack_int4(q.to(device)))
        layer.scales.data, layer.zeros.data = scale.float().to(device), zero.float().to(device)
        layer.process_weights_after_loading()
        layer._take_place_of(linear)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, config: QuantizationConfig,
              ops: OpSet) -> "Int4WeightOnlyLinear":
        return cls(in_features, out_features, bias, DTYPES[config.compute_dtype], config.group_size, ops)

    def input_split(self, suffix: str, columns: TensorSplit) -> TensorSplit:
        # levels two per byte; scales and zero points one per group of inputs (groups never straddle ranks)
        return columns.scaled(2 if suffix == "qweight" else self.group_size)

    def _load_plain_qweight(self, param: nn.Parameter, packed: torch.Tensor, shard=None) -> None:
        if self.table is not None or packed.shape != param.shape or packed.dtype != torch.uint8:
            raise ValueError(f"expected packed int4 levels uint8 {(self.out_features, self.in_features // 2)}, "
                             f"got {packed.dtype} {tuple(packed.shape)}")
        param.data = packed.to(param.device).clone()

    def process_weights_after_loading(self) -> None:
        if self.table is not None:
            return
        levels = Q.unpack_int4(self.qweight.data)
        self.qweight.data, self.table = self.layout.pack(levels, self.scales.data, self.zeros.data, self.group_size,
                                                         self.compute_dtype)
        self.scales = self.zeros = None  # in the table now; free them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ops.int4_weight_linear(self._flat(x), self.qweight, self.group_size, self.table)
        return self._add_bias(y).reshape(*x.shape[:-1], -1)  # a vocabulary-parallel head gathers all

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        # float32 scales: the table's exactly (float16 or the compute dtype), so that a reload packs the same table
        levels = self.layout.levels(self.qweight, self.table, self.group_size, self.in_features)
        scale, zero = self.layout.grid(self.table, self.group_size, self.in_features)
        return {"qweight": Q.pack_int4(levels), "scales": scale, "zeros": zero}

    def extra_repr(self) -> str:
        return super().extra_repr() + f", group_size={self.group_size}"


class Int8DynamicLinear(QuantizedLinear):
    """A8W8: int8 weights per output channel; activations quantized per token at run time (after division by
    the SmoothQuant factors, when present); int8 x int8 -> int32 matmul; rescaled to the compute dtype."""

    scheme = "a8w8"

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 compute_dtype: torch.dtype = torch.bfloat16, smoothing: bool = False,
                 ops: OpSet | None = None) -> None:
        super().__init__(in_features, out_features, bias, compute_dtype, ops)
        self.qweight = _frozen(torch.zeros(out_features, in_features, dtype=torch.int8))
        self.scales = _frozen(torch.ones(out_features, dtype=torch.float32))
        self.smooth = _frozen(torch.ones(in_features, dtype=torch.float32)) if smoothing else None

    @classmethod
    def from_float(cls, linear: Linear, config: QuantizationConfig,
                   smooth: torch.Tensor | None = None) -> "Int8DynamicLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, _dtype(config),
                    smoothing=config.smoothing, ops=linear.ops)
        weight = linear.weight.float()
        if config.smoothing:
            smooth = smooth if smooth is not None else torch.ones(linear.in_features)
            layer.smooth.data = smooth.float().to(weight.device)
            weight = weight * layer.smooth[None, :]  # outliers move from x into W: (x / s)(W s)^T = x W^T
        q, scale = Q.quantize_int8_per_channel(weight)
        layer.qweight.data, layer.scales.data = q, scale
        layer._take_place_of(linear)
        return layer

    @classmethod
    def empty(cls, in_features: int, out_features: int, bias: bool, config: QuantizationConfig,
              ops: OpSet) -> "Int8DynamicLinear":
        return cls(in_features, out_features, bias, DTYPES[config.compute_dtype], config.smoothing, ops)

    def input_split(self, suffix: str, columns: TensorSplit) -> TensorSplit:
        if suffix == "smooth":  # one factor per input column: the 1-D tensor splits along its only axis
            return TensorSplit(0, columns.ranges)
        return REPLICATED if suffix == "scales" else columns

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = self._flat(x).float()
        if self.smooth is not None:
            flat = flat / self.smooth
        xq, x_scale = Q.quantize_int8_per_token(flat, self._row_absmax(flat))
        y = self.ops.int8_int8_linear(xq, x_scale, self.qweight, self.scales).to(x.dtype)
        return self._add_bias(y).reshape(*x.shape[:-1], -1)  # a vocabulary-parallel head gathers all

    def _row_absmax(self, flat: torch.Tensor) -> torch.Tensor:
        """Each token's largest activation magnitude, which sets its int8 scale (a row-parallel rank sees
        only part of the row and takes the maximum over all ranks)."""
        return self.reduced_row_max(flat.abs().amax(dim=-1, keepdim=True))

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {"qweight": self.qweight, "scales": self.scales}
        if self.smooth is not None:
            tensors["smooth"] = self.smooth
        return tensors



def _dtype(config: QuantizationConfig) -> torch.dtype:
    return DTYPES[config.compute_dtype]


class DequantizingInt8Linear(nn.Module):
    """A16W8 in an exported graph: int8 weights and per-channel scales stay int8 in the file (a quarter of the
    float32 bytes); the graph multiplies them back to float before the matmul."""

    def __init__(self, layer: Int8WeightOnlyLinear) -> None:
        super().__init__()
        self.qweight, self.scales = layer.checkpoint_tensors().values()  # [N, K], whatever the kernel's layout
        self.bias = layer.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.qweight.to(x.dtype) * self.scales.to(x.dtype)[:, None]
        return torch.nn.functional.linear(x, weight, self.bias)
