"""graphopt's custom int8 ops in standard ONNX operators, for `torch.onnx.export(dynamo=True)`.

    quantize_per_token(x, smooth)  ⇒  s = max(ReduceMax(|x / smooth|, axis 1) / 127, tiny)
                                      x_q = QuantizeLinear(x / smooth, s, zero point int8 0 [M], axis=0)
    int8_linear(x_q, w_q, s_x, s_w, b, act, dtype)
                                   ⇒  acc = MatMulInteger(x_q + 128, w_qᵀ + 128, 128, 128)   (uint8 × uint8)
                                      act(Cast(acc, float) · s_x[:, None] · s_w[None, :] + b)
    w8a16_linear(x, w_q, s_w, b)   ⇒  MatMul(x, DequantizeLinear(w_qᵀ, s_w, axis=1)) + b
    w4a16_linear(x, w, s, z, g, b) ⇒  q = Slice(Reshape([w & 15, w >> 4], [N, −1]), K)   (opset ≥ 21)
                                      MatMul(x, Transpose(DequantizeLinear(q, s, z, axis=1, block_size=g))) + b
    layer_norm_quantize(x, w, b, eps, smooth)
                                   ⇒  y = LayerNormalization(x, w or 1, b, axis=-1, epsilon=eps)
                                      (y, quantize_per_token(y, smooth))

w4a16_linear's unpacking (BitwiseAnd, BitShift: the codes of int4pack.py, low
nibble first) acts on the constant packed weight, so the export's constant
folding turns it into uint8 codes, and the `Int4Weights` export pass stores
those codes and the zero points as UINT4 initializers (two a byte): the file
keeps int4's size. Block-wise DequantizeLinear computes (q − z) · s over
blocks of `block_size` columns of axis 1, the op's own group layout (scales
and zero points [N, ⌈K / g⌉]); q − z is an exact integer and the product one
float32 rounding, as in the op's float32 path.

QuantizeLinear divides by the scale and rounds half to even as the op's CPU
path does, and |x / s| ≤ 127 by the choice of s, so its saturation is the
op's clip: the int8 values are identical (tested). The product is the exact
int32 sum, as the op's; int8-static (a constant per-tensor scale, expanded to
the rows by the rewrite) takes the same form. The shift to uint8 (+128 on
both sides, zero points 128) is exact; on the weights it is constant-folded
at export (uint8 initializers, one byte each, as the int8 ones were).

The form was chosen by measurement (`python -m bench.onnx --only choice`,
bench/results/onnx_int8_forms.md; one [1024 × 384] × [384 × 1536] linear,
ONNX Runtime 1.32, 2 threads, AVX2 without VNNI, all forms timed interleaved
in one run): uint8 × uint8 MatMulInteger 27–28 ms at the pure quantization
error (max rel err 0.039), against the previous QDQ form (DequantizeLinear →
MatMul) 42–43 ms and int8 × int8 MatMulInteger 137 ms at the same error
(three runs on the shared, noisy machine: U8U8 21–29 ms, QDQ 34–56 ms, s8s8
90–137 ms, fp32 MatMul 25–68 ms; U8U8 was the fastest exact form each time).
ORT's uint8 × uint8 kernel widens to 16 bits; its faster uint8 × int8 kernel
(and DynamicQuantizeLinear, per tensor) sums pairs in saturating int16:
0.5–0.58 relative error, rejected. Writing the quantization out (Div, Round, Clip,
Add 128, Cast) measured the same within the machine's noise as one
QuantizeLinear; int8_linear quantizes its input straight to uint8 where it
comes from quantize_per_token (see `_codes_uint8`) and shifts int8-static's
codes. Only the default ONNX domain is used, unless the export asks for ONNX Runtime's
contrib operators (`export_onnx(..., ops="onnxruntime")`, the table of `translation_table(opset, ops)`):

    w4a16_linear(x, w, s, z, g, b) ⇒  MatMulNBits(x, Reshape(Pad(w), [N, ⌈K / g⌉, g / 2]), s, z₄, bias=b,
                                                  K, N, bits=4, block_size=g, accuracy_level=1)

MatMulNBits (domain com.microsoft) computes A · ((q − z) · s)ᵀ over blocks of `block_size` columns, the
codes packed along K, low bits first, as onnxruntime-genai's builder writes them. int4pack.py's bytes
are that packing already (code 2j low, 2j + 1 high) and a group of g is g / 2 whole bytes, so the
packed weight is only padded to whole blocks and split into them; the zero points [N, ⌈K / g⌉] are
packed two a byte the same way (z₄, each row padded to whole bytes); the scales are the op's own.
The padding after column K is never read (the K attribute: the result is the same whatever the
padded codes, measured). The form computes what the op's float32 path does: q − z exact, one rounding by
the scale, a float32 product. int8 weight-only linears keep the standard form (DequantizeLinear + MatMul):
ONNX Runtime's 8-bit MatMulNBits at the float32 level ran 12–23× slower than the float MatMul at Llama-1B
shapes, M = 1 and 8 (bench/results/matmul_nbits.md, 2 threads, interleaved).

accuracy_level = 1 (float32): ONNX Runtime 1.32's CPU kernel at levels 0 (unset), 1, 2 and 3 ran
float32 activations and matched an exact product of the dequantized weight to float32 rounding
(≤ 1e-6 relative, bits 4 and 8, K not a multiple of the block, N = 7, 17, M = 1 … 16); level 4 quantizes
the activations to int8 per block (2e-3 – 1.1e-2 relative error measured): what the module computes
is a float product, so 1, the level that asks for float32 by name rather than the runtime's default.
At level 1 the 4-bit kernel took 0.29–0.98× the float MatMul's time at M = 1 and 0.93–1.7× at M = 8 (same
table): the file is 8× smaller in weights, not reliably faster; level 4 took 0.15–0.40× and is another
computation (W4A8).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from onnx import helper

_FLOAT = 1      # onnx.TensorProto.FLOAT
_UINT8 = 2      # onnx.TensorProto.UINT8
_INT8 = 3       # onnx.TensorProto.INT8
_INT32 = 6      # onnx.TensorProto.INT32
_DTYPES = {torch.float32: 1, torch.float16: 10, torch.bfloat16: 16}


#: First opset with the Gelu operator (ONNX Runtime runs it as one fused kernel).
GELU_OPSET = 20
#: First opset whose DequantizeLinear takes 4-bit types and block-wise scales (block_size).
BLOCKWISE_OPSET = 21


#: ONNX Runtime's contrib operator domain.
CONTRIB_DOMAIN = "com.microsoft"
#: MatMulNBits' accuracy_level: float32 activations (see the module docstring).
ACCURACY_LEVEL = 1
#: MatMulNBits' smallest block_size (its blocks are powers of two from 16 up).
MIN_BLOCK = 16


def translation_table(opset: int, ops: str = "standard") -> dict[Any, Callable[..., Any]]:
    """{torch op overload: onnxscript translation} for a model of `opset` written with the operators of
    `ops` (graphopt.engine.config.EXPORT_OPS); empty when graphopt.kernels is not importable."""
    try:
        import graphopt.kernels  # noqa: F401  (registers torch.ops.graphopt.*)
    except Exception:  # noqa: BLE001  (no kernels: graphs cannot hold their ops either)
        return {}
    graphopt_ops = torch.ops.graphopt
    table = {graphopt_ops.quantize_per_token.default: quantize_per_token,
             graphopt_ops.int8_linear.default: int8_linear_translation(gelu_op=opset >= GELU_OPSET),
             graphopt_ops.w8a16_linear.default: w8a16_linear,
             graphopt_ops.layer_norm_quantize.default: layer_norm_quantize}
    if ops == "onnxruntime":
        table[graphopt_ops.w4a16_linear.default] = w4a16_matmul_nbits
    elif opset >= BLOCKWISE_OPSET:
        table[graphopt_ops.w4a16_linear.default] = w4a16_linear
    return table


def opset_problem(module: torch.nn.Module, opset: int, ops: str = "standard") -> str | None:
    """Why `module`'s graphopt ops cannot be written at `opset` with the operators of `ops` (None if they can)."""
    graph = getattr(module, "graph", None)
    int4 = [n for n in graph.nodes if str(n.target).startswith("graphopt.w4a16_linear")] if graph is not None else []
    if ops == "onnxruntime":
        groups = sorted({int(n.args[4]) for n in int4 if not _is_block_size(int(n.args[4]))})
        if groups:
            return (f"int4 weights are written as MatMulNBits, whose block_size is a power of two ≥ {MIN_BLOCK}; "
                    f"the module's group size {', '.join(map(str, groups))} is not: export with ops='standard'")
        return None
    if int4 and opset < BLOCKWISE_OPSET:
        return (f"int4 weights (graphopt::w4a16_linear) are written as block-wise DequantizeLinear, which needs "
                f"opset {BLOCKWISE_OPSET} or later; opset {opset} was asked for")
    return None


def _is_block_size(size: int) -> bool:
    return size >= MIN_BLOCK and size & (size - 1) == 0


def _op() -> Any:
    from onnxscript import opset18
    return opset18


def quantize_per_token(x: Any, smooth: Any = None) -> tuple[Any, Any]:
    op = _op()
    from graphopt.kernels import SCALE_FLOOR
    xf = op.Cast(x, to=_FLOAT)
    if smooth is not None:
        xf = op.Div(xf, op.Cast(smooth, to=_FLOAT))
    amax = op.ReduceMax(op.Abs(xf), op.Constant(value_ints=[1]), keepdims=0)
    scale = op.Max(op.Div(amax, op.Constant(value_float=127.0)), op.Constant(value_float=float(SCALE_FLOOR)))
    zero = op.Expand(op.Constant(value=helper.make_tensor("zero", _INT8, [], [0])), op.Shape(scale))
    return op.QuantizeLinear(xf, scale, zero, axis=0), scale


def int8_linear_translation(gelu_op: bool) -> Callable[..., Any]:
    """The int8_linear translation; `gelu_op`: the model's opset has Gelu (else erf written out)."""
    def int8_linear(x_q: Any, w_q: Any, x_scale: Any, w_scale: Any, bias: Any = None, activation: str = "none",
                    out_dtype: torch.dtype = torch.float32) -> Any:
        op = _op()
        zero = op.Constant(value=helper.make_tensor("zero_point", _UINT8, [], [128]))
        acc = op.MatMulInteger(_codes_uint8(op, x_q), _to_uint8(op, op.Transpose(w_q, perm=[1, 0])), zero, zero)
        y = op.Mul(op.Mul(op.Cast(acc, to=_FLOAT), op.Unsqueeze(x_scale, op.Constant(value_ints=[1]))), w_scale)
        if bias is not None:
            y = op.Add(y, op.Cast(bias, to=_FLOAT))
        y = _activation(op, y, activation, gelu_op)
        return op.Cast(y, to=_DTYPES[out_dtype]) if out_dtype != torch.float32 else y
    return int8_linear


def _codes_uint8(op: Any, x_q: Any) -> Any:
    """The activation codes as uint8: quantized straight to uint8 where x_q is quantize_per_token's
    QuantizeLinear (zero point int8 0), else x_q shifted (int8-static computes its codes with ATen ops).

    QuantizeLinear gives saturate(round(x / s) + z): with z = 0 into int8 the codes are
    clip(round(x / s), −128, 127), and adding 128 gives clip(round(x / s) + 128, 0, 255), which is
    QuantizeLinear into uint8 with zero point 128 — the same bytes in one op instead of four. The
    int8 QuantizeLinear is then read by nothing and dropped with the dead nodes. (quantize_per_token's
    own translation has to return int8: the exporter types its output from the torch op's.)"""
    producer = x_q.producer() if hasattr(x_q, "producer") else None
    if producer is None or producer.op_type != "QuantizeLinear" or len(producer.inputs) < 2:
        return _to_uint8(op, x_q)
    x, scale = producer.inputs[0], producer.inputs[1]
    zero = op.Expand(op.Constant(value=helper.make_tensor("zero_u8", _UINT8, [], [128])), op.Shape(scale))
    return op.QuantizeLinear(x, scale, zero, axis=0)


def _to_uint8(op: Any, q: Any) -> Any:
    """int8 q ↦ uint8 q + 128 (exact in int32)."""
    return op.Cast(op.Add(op.Cast(q, to=_INT32), op.Constant(value=helper.make_tensor("shift", _INT32, [], [128]))), to=_UINT8)


def w8a16_linear(x: Any, w_q: Any, w_scale: Any, bias: Any = None) -> Any:
    op = _op()
    weight = op.DequantizeLinear(op.Transpose(w_q, perm=[1, 0]), w_scale, axis=1)
    y = op.MatMul(op.Cast(x, to=_FLOAT), weight)
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=_FLOAT))
    return op.CastLike(y, x)


def w4a16_linear(x: Any, w_packed: Any, scales: Any, zeros: Any, group_size: int, bias: Any = None) -> Any:
    op = _op()
    from onnxscript import opset21
    byte = op.Unsqueeze(w_packed, op.Constant(value_ints=[-1]))
    low = op.BitwiseAnd(byte, op.Constant(value=helper.make_tensor("low_mask", _UINT8, [], [15])))
    high = op.BitShift(byte, op.Constant(value=helper.make_tensor("high_shift", _UINT8, [], [4])), direction="RIGHT")
    pairs = op.Reshape(op.Concat(low, high, axis=-1), op.Constant(value_ints=[0, -1]))      # [N, 2 ⌈K / 2⌉]
    codes = op.Slice(pairs, op.Constant(value_ints=[0]), op.Shape(x, start=-1), op.Constant(value_ints=[1]))
    weight = opset21.DequantizeLinear(codes, scales, zeros, axis=1, block_size=int(group_size))
    y = op.MatMul(op.Cast(x, to=_FLOAT), op.Transpose(weight, perm=[1, 0]))
    if bias is not None:
        y = op.Add(y, op.Cast(bias, to=_FLOAT))
    return op.CastLike(y, x)


def w4a16_matmul_nbits(x: Any, w_packed: Any, scales: Any, zeros: Any, group_size: int, bias: Any = None) -> Any:
    op = _op()
    n, k, blocks, half = _dim(w_packed, 0), _dim(x, -1), _dim(scales, 1), int(group_size) // 2
    weight = op.Reshape(op.Pad(w_packed, op.Constant(value_ints=[0, 0, 0, blocks * half - _dim(w_packed, 1)])),
                        op.Constant(value_ints=[n, blocks, half]))
    pairs = op.Reshape(op.Pad(zeros, op.Constant(value_ints=[0, 0, 0, blocks % 2])), op.Constant(value_ints=[n, -1, 2]))
    low = op.Gather(pairs, op.Constant(value_int=0), axis=2)
    high = op.Gather(pairs, op.Constant(value_int=1), axis=2)
    shift = op.Constant(value=helper.make_tensor("zero_shift", _UINT8, [], [4]))
    packed_zeros = op.Reshape(op.BitwiseOr(low, op.BitShift(high, shift, direction="LEFT")),
                              op.Constant(value_ints=[n, -1]))
    y = _matmul_nbits_op()(_float32(op, x), weight, scales, packed_zeros, None,   # float32 x, cast back after
                           None if bias is None else _float32(op, bias),
                           K=k, N=n, bits=4, block_size=int(group_size), accuracy_level=ACCURACY_LEVEL)
    return y if _is_float32(x) else op.CastLike(y, x)


def _float32(op: Any, value: Any) -> Any:
    """`value` as float32, with no Cast where it is float32 already (ONNX shape inference does not type a contrib
    op's output, so torch.onnx's optimizer would keep a Cast that changes nothing)."""
    return value if _is_float32(value) else op.Cast(value, to=_FLOAT)


def _is_float32(value: Any) -> bool:
    import onnx_ir
    return value.dtype == onnx_ir.DataType.FLOAT


@functools.cache
def _matmul_nbits_op() -> Any:
    """ONNX Runtime's MatMulNBits as an onnxscript op. torch.onnx builds a node from the op's schema, and
    the onnx package holds no com.microsoft schemas: this is MatMulNBits' signature as ONNX Runtime 1.32
    registers it (not registered with onnx, so onnx.checker leaves the contrib domain to the runtime)."""
    from onnx.defs import OpSchema
    from onnxscript import values
    optional = OpSchema.FormalParameterOption.Optional

    def parameter(name: str, kind: str, optional_: bool = False) -> OpSchema.FormalParameter:
        return OpSchema.FormalParameter(name, kind, param_option=optional if optional_ else
                                        OpSchema.FormalParameterOption.Single)
    floats = ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]
    schema = OpSchema(
        "MatMulNBits", CONTRIB_DOMAIN, 1,
        inputs=[parameter("A", "T1"), parameter("B", "T2"), parameter("scales", "T1"),
                parameter("zero_points", "T3", True), parameter("g_idx", "T4", True), parameter("bias", "T1", True)],
        outputs=[parameter("Y", "T1")],
        type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)", "tensor(int32)"], ""),
                          ("T3", ["tensor(uint8)", "tensor(int32)", *floats], ""), ("T4", ["tensor(int32)"], "")],
        attributes=[*(OpSchema.Attribute(name, OpSchema.AttrType.INT, required=True)
                      for name in ("K", "N", "bits", "block_size")),
                    OpSchema.Attribute("accuracy_level", helper.make_attribute("accuracy_level", 0))])
    return values.Op(values.Opset(CONTRIB_DOMAIN, 1), "MatMulNBits", schema)


def _dim(value: Any, axis: int) -> int:
    """A static dimension of a traced value (linear layers' weights and feature axes are static)."""
    return int(value.shape[axis])


def layer_norm_quantize(x: Any, weight: Any, bias: Any, eps: float, smooth: Any = None) -> tuple[Any, Any, Any]:
    op = _op()
    if weight is None:   # LayerNormalization's scale input is required
        ones = op.ConstantOfShape(op.Shape(x, start=-1), value=helper.make_tensor("one", _FLOAT, [1], [1.0]))
        weight = op.CastLike(ones, x)
    y = op.LayerNormalization(x, weight, bias, axis=-1, epsilon=float(eps))
    return (y, *quantize_per_token(y, smooth))


def _activation(op: Any, y: Any, activation: str, gelu_op: bool) -> Any:
    if activation == "none":
        return y
    if activation == "relu":
        return op.Relu(y)
    if activation == "silu":
        return op.Mul(y, op.Sigmoid(y))
    if activation in ("gelu", "gelu_tanh") and gelu_op:
        from onnxscript import opset20
        return opset20.Gelu(y, approximate="none" if activation == "gelu" else "tanh")
    if activation in ("gelu", "gelu_tanh"):   # written out below opset 20
        half, one = op.Constant(value_float=0.5), op.Constant(value_float=1.0)
        if activation == "gelu":
            inner = op.Erf(op.Mul(y, op.Constant(value_float=0.7071067811865476)))
        else:
            cube = op.Mul(op.Mul(y, y), y)
            u = op.Mul(op.Constant(value_float=0.7978845608028654),
                       op.Add(y, op.Mul(op.Constant(value_float=0.044715), cube)))
            inner = op.Tanh(u)
        return op.Mul(op.Mul(half, y), op.Add(one, inner))
    raise ValueError(f"int8_linear activation {activation!r} has no ONNX translation")
