"""Weight-only int8 / int4 linear layers on PyTorch's own CPU kernels: what ``load_in_8bit`` / ``load_in_4bit`` mean
for an LM on the CPU.

bitsandbytes' CPU layers are slower than plain bfloat16 on the same CPU (they dequantize, or call a packed kernel
that is no faster); PyTorch ships CPU kernels for weight-only quantized matmuls, the ones gpt-fast uses:

- ``aten._weight_int8pack_mm(x, w_int8 [N, K], scales [N])``: int8 weights, one scale per output channel.
- ``aten._weight_int4pack_mm_for_cpu(x, packed [N, K/2], group, scales_and_zeros [K/group, N, 2])`` with
  ``aten._convert_weight_to_int4pack_for_cpu(w_int32 [N, K], 1)``: int4 weights in groups of ``group`` input
  columns, each group with a scale and a zero (w = (q - 8) * scale + zero).

Notable features:

- Our own small layers over these ops, not torchao: torchao 0.18's int8 weight-only layer converts the whole int8
  weight to float at every call (slower than bfloat16), and its CPU int4 layer (a prototype) is this same op.
- The kernels run with bfloat16 activations whatever the model's dtype: with float32 activations the same ops are
  5-15x slower on the CPUs measured (benchmarks/cpu_quantization.py); inputs are cast in and outputs back.
- Quantized at load time from the checkpoint's float weights (round to nearest: symmetric per output channel for
  int8, min/max per group for int4), layer by layer, each float weight freed as its layer is replaced.
- Widths the kernels cannot run are never given to them (``int8_fits`` / ``int4_group``): in torch 2.13 the int8
  kernel crashes or returns garbage when K % 16 != 0, and the int4 packing needs N % 16 == 0 and K % group == 0.
  Each distinct shape is also run once at load against F.linear on its dequantized weight (``_works``); a layer
  that fails either way stays in int8 (4-bit mode) or float — named in one log line, never an error mid-answer.
- Gradients reach the inputs (relevancy maps need them): backward multiplies by the dequantized weight.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

COMPUTE_DTYPE = torch.bfloat16  # the kernels' activation dtype (see the module docstring)
INT4_GROUP_SIZE = 64  # input columns per int4 scale/zero; chosen by benchmarks/cpu_quantization.py (see README)
INT4_GROUP_SIZES = (256, 128, 64, 32)  # what _weight_int4pack_mm_for_cpu accepts
INT8_K_MULTIPLE = 16  # _weight_int8pack_mm (bfloat16, AVX512) reads K in vectors of 16: other K crash or are wrong
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"

KERNELS = {
    8: ("_weight_int8pack_mm",),
    4: ("_weight_int4pack_mm_for_cpu", "_convert_weight_to_int4pack_for_cpu"),
}


def missing_kernels(bits: int) -> list[str]:
    """The aten ops ``bits``-bit layers need that this torch lacks (empty: all there)."""
    return [name for name in KERNELS[bits] if not hasattr(torch.ops.aten, name)]


def int8_fits(in_features: int, out_features: int) -> bool:
    return in_features % INT8_K_MULTIPLE == 0 and out_features > 0


def int4_group(in_features: int, out_features: int, group_size: int | None = None) -> int | None:
    """The int4 group for a layer: ``group_size`` (None: ``INT4_GROUP_SIZE``), or the largest smaller one that
    divides K; None where none fits."""
    group_size = group_size or INT4_GROUP_SIZE
    if out_features % INT4_N_MULTIPLE:
        return None
    fitting = [g for g in INT4_GROUP_SIZES if g <= group_size and in_features % g == 0]
    return fitting[0] if fitting else None


class _WeightOnlyMatmul(torch.autograd.Function):
    """x @ W.T on the layer's kernel; the input's gradient through the dequantized weight (the ops have none)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: nn.Module) -> torch.Tensor:
        ctx.layer = layer
        return layer._matmul(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad @ ctx.layer.dequantize().to(grad.dtype), None  # (M, N) @ (N, K)


class _QuantizedLinear(nn.Module):
    """Shared by the int8 and int4 layers: reshaping, dtype casts, bias, autograd. Subclasses give ``_matmul``
    ((M, K) bfloat16 → (M, N) bfloat16) and ``dequantize`` (→ float32 (N, K))."""

    in_features: int
    out_features: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(COMPUTE_DTYPE).contiguous()  # (M, K), M = batch × tokens
        needs_grad = torch.is_grad_enabled() and x2.requires_grad  # the ops have no derivative of their own
        y = (_WeightOnlyMatmul.apply(x2, self) if needs_grad else self._matmul(x2)).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def _bias_from(self, linear: nn.Linear) -> None:
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)


class Int8Linear(_QuantizedLinear):
    """Weight-only int8: ``weight`` int8 (N, K), ``scales`` bfloat16 (N,) — W ≈ weight * scales[:, None]."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.empty(out_features, dtype=COMPUTE_DTYPE))
        self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """Round to nearest, symmetric, one scale per output channel (amax / 127)."""
        layer = cls(linear.in_features, linear.out_features)
        layer.weight, layer.scales = int8_quantize(linear.weight)
        layer._bias_from(linear)
        return layer

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, self.weight, self.scales)  # (M, N)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float() * self.scales.float()[:, None]  # (N, K)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


class Int4Linear(_QuantizedLinear):
    """Weight-only int4 in groups: ``weight`` uint8 (N, K/2) in the kernel's packed layout, ``scales_and_zeros``
    bfloat16 (K/group, N, 2) — W[n, k] ≈ (q[n, k] - 8) * scale[k // group, n] + zero[k // group, n]."""

    def __init__(self, in_features: int, out_features: int, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer(
            "scales_and_zeros", torch.empty(in_features // group_size, out_features, 2, dtype=COMPUTE_DTYPE)
        )
        self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int) -> Int4Linear:
        """Round to nearest, asymmetric: each group's min and max span the 16 levels."""
        layer = cls(linear.in_features, linear.out_features, group_size)
        q, scale, zero = int4_quantize(linear.weight, group_size)
        layer.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)  # innerKTiles: unused on CPU
        layer.scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
        layer._bias_from(linear)
        return layer

    def _matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.weight, self.group_size, self.scales_and_zeros)

    def levels(self) -> torch.Tensor:
        """The int levels (N, K) 0..15 back from the packed weight (the layouts of PyTorch's AVX-512 and AVX2
        kernels)."""
        block = _int4_block()
        if block is None:
            raise RuntimeError(
                "This torch packs int4 weights in a layout blipdemo cannot read back, so int4 layers pass no "
                "gradient here (method='relevancy' needs one): load with load_in_8bit=True instead."
            )
        return _unpack_int4(self.weight, self.out_features, self.in_features, block)

    def dequantize(self) -> torch.Tensor:
        sz = self.scales_and_zeros.transpose(0, 1)  # (N, G, 2)
        return int4_dequantize(self.levels(), sz[..., 0], sz[..., 1])

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 in groups of {self.group_size}"


def int8_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, K) float → int8 (N, K) and bfloat16 scales (N,): round to nearest, symmetric, scale = amax / 127."""
    w = weight.detach().float()
    # The scale is rounded to bfloat16 first, so that the integers are chosen for the scale the kernel uses.
    scales = (w.abs().amax(dim=1).clamp(min=1e-12) / 127).to(COMPUTE_DTYPE)  # (N,)
    return torch.round(w / scales.float()[:, None]).clamp(-127, 127).to(torch.int8), scales


def int4_quantize(weight: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, K) float → int32 levels 0..15 (N, K), bfloat16 scales and zeros (N, K/group): round to nearest,
    asymmetric, each group's min and max spanning the 16 levels; ``zero`` is the value of level 8."""
    n, k = weight.shape
    w = weight.detach().float().reshape(n, k // group_size, group_size)  # (N, G, group)
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # (N, G)
    scale = ((high - low).clamp(min=1e-12) / 15).to(COMPUTE_DTYPE)
    zero = (low + 8 * scale.float()).to(COMPUTE_DTYPE)  # the kernel computes (q - 8) * scale + zero
    q = torch.round((w - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp(0, 15)
    return q.to(torch.int32).reshape(n, k), scale, zero


def int4_dequantize(levels: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Levels (N, K) with scales and zeros (N, K/group) → float32 (N, K): (q - 8) * scale + zero."""
    n, k = levels.shape
    q = levels.float().reshape(n, scale.shape[1], -1)  # (N, G, group)
    return ((q - 8) * scale.float()[..., None] + zero.float()[..., None]).reshape(n, k)


def _unpack_int4(packed: torch.Tensor, n: int, k: int, block: int = 64) -> torch.Tensor:
    """(N, K) uint8 levels from ``_convert_weight_to_int4pack_for_cpu``'s layout, which depends on the CPU kernel
    torch picked: rows in blocks of ``block`` (64 with AVX-512, 32 with AVX2 only) stored as (K, block/2) bytes —
    block 64: byte d < 16 holds rows d (low nibble) and d + 32 (high), byte 16 + d rows d + 16 and d + 48; block 32:
    byte d holds rows d (low) and d + 16 (high) — and a last block of fewer rows as (K, rows/2) bytes holding rows
    2j (low) and 2j + 1 (high)."""
    flat = packed.reshape(-1)
    out = torch.empty(n, k, dtype=torch.uint8)
    full = n // block * block
    if full:
        b = flat[: full * k // 2].view(n // block, k, block // 2)
        lo, hi = b & 15, b >> 4
        if block == 64:
            rows = torch.cat([lo[..., :16], lo[..., 16:], hi[..., :16], hi[..., 16:]], dim=-1)  # (N/64, K, 64)
        else:
            rows = torch.cat([lo, hi], dim=-1)  # (N/32, K, 32)
        out[:full] = rows.permute(0, 2, 1).reshape(full, k)
    if n > full:
        b = flat[full * k // 2 :].view(k, (n - full) // 2)
        out[full:] = torch.stack([b & 15, b >> 4], dim=-1).reshape(k, n - full).T
    return out


@functools.cache
def _int4_block() -> int | None:
    """The row block ``_unpack_int4`` reads this torch's packing back with (full blocks and a tail of 16 rows), or
    None when neither known layout does."""
    q = torch.randint(0, 16, (80, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
    if packed.shape != (80, 32):
        return None
    return next((b for b in (64, 32) if torch.equal(_unpack_int4(packed, 80, 64, b).int(), q)), None)


def _works(layer: _QuantizedLinear, reference: torch.Tensor) -> bool:
    """One run of the layer's kernel on its own weights against F.linear on ``reference``, its weight quantized and
    dequantized without the kernel's packing (N, K).

    Tolerance: the kernels accumulate in float32 and round the output to bfloat16 (relative 2**-8 of the largest
    output); 4x that leaves room for the order of summation, far below what a wrong layout or garbage gives.
    """
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).to(COMPUTE_DTYPE)
    try:
        with torch.no_grad():
            got = layer._matmul(x).float()
            ref = F.linear(x.float(), reference)
    except RuntimeError:
        return False
    return bool(torch.isfinite(got).all()) and (got - ref).abs().max().item() <= 4 * 2**-8 * ref.abs().max().item()


def quantize_linears(model: nn.Module, bits: int, *, group_size: int | None = None) -> dict[str, str]:
    """Replace the LM's ``nn.Linear`` layers in place with int8 (``bits=8``) or int4 (``bits=4``) layers.

    Returns ``{module name: "int4" | "int8" | "float" | "tied"}`` for every linear layer. In 4-bit mode a layer the
    int4 kernel cannot run (N % 16, or no group dividing K) and the output layer (``lm_head``: the logits are the
    most sensitive, and it is one layer) are int8; a layer neither kernel runs stays float. An output layer tied to
    the input embeddings stays float, "tied" (quantizing it would add memory, not save it). ``group_size``: int4's
    (None: ``INT4_GROUP_SIZE``, read at each call). Weights must be on the CPU.
    """
    if bits not in KERNELS:
        raise ValueError(f"bits must be 8 or 4, got {bits}")
    out_layer = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    in_layer = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = out_layer is not None and in_layer is not None and out_layer.weight is in_layer.weight
    checked: dict[tuple, bool] = {}  # (kind, N, K, group) → the kernel ran this shape right
    kinds: dict[str, str] = {}
    for name, linear in list(model.named_modules()):
        if type(linear) is not nn.Linear:
            continue
        if linear.weight.device.type != "cpu":
            raise ValueError(f"{name}: weight on {linear.weight.device}; CPU quantization needs CPU weights.")
        if linear is out_layer and tied:
            kinds[name] = "tied"
            continue
        n, k = linear.out_features, linear.in_features
        layer = None
        group = int4_group(k, n, group_size) if bits == 4 and linear is not out_layer else None
        if group is not None:
            layer = Int4Linear.from_linear(linear, group)
            if ("int4", n, k, group) not in checked:
                checked["int4", n, k, group] = _works(layer, int4_dequantize(*int4_quantize(linear.weight, group)))
            layer = layer if checked["int4", n, k, group] else None
        if layer is None and int8_fits(k, n):
            layer = Int8Linear.from_linear(linear)
            if ("int8", n, k) not in checked:
                q, scales = int8_quantize(linear.weight)
                checked["int8", n, k] = _works(layer, q.float() * scales.float()[:, None])
            layer = layer if checked["int8", n, k] else None
        if layer is None:
            kinds[name] = "float"
            continue
        kinds[name] = "int4" if isinstance(layer, Int4Linear) else "int8"
        model.set_submodule(name, layer)  # the float weight goes with the old module
    return kinds
