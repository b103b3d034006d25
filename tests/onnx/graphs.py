"""Random ONNX graphs for property tests, built with onnx.helper.

A graph starts from an image input [N, C, H, W], runs a few image ops
(Conv, BatchNormalization, Relu, Add, Transpose pairs, Concat of branches),
flattens with a Reshape (sometimes two), then a few matrix ops (MatMul+Add,
Gemm, Relu, Transpose pairs, Concat, Add of branches). Branches reuse any
earlier tensor of the right shape, so graphs are DAGs, not just chains.
"""
from __future__ import annotations

import itertools

import numpy as np
import onnx
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


class Builder:
    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = itertools.count()

    def name(self, prefix: str) -> str:
        return f"{prefix}{next(self.count)}"

    def const(self, value: np.ndarray, prefix: str = "c") -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape: int, fan_in: int) -> str:
        return self.const((self.rng.standard_normal(shape) / np.sqrt(fan_in)).astype(np.float32), "w")

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(f"{op}_"), **attrs))
        return out


def image_op(draw, b: Builder, x: str, shape: tuple, pool: list) -> tuple[str, tuple]:
    n, c, h, w = shape
    op = draw(st.sampled_from(["Conv", "ConvBN", "Relu", "AddConst", "AddBranch", "TransposePair", "Concat"]))
    if op in ("Conv", "ConvBN"):
        cout, k = draw(st.integers(1, 6)), draw(st.sampled_from([1, 3]))
        bias = draw(st.booleans())
        inputs = [x, b.weight(cout, c, k, k, fan_in=c * k * k)] + ([b.weight(cout, fan_in=1)] if bias else [])
        y = b.node("Conv", inputs, kernel_shape=[k, k], pads=[k // 2] * 4)
        if op == "ConvBN":
            gamma = b.const(b.rng.uniform(0.5, 1.5, cout).astype(np.float32))
            beta = b.const(b.rng.standard_normal(cout).astype(np.float32))
            mean = b.const(b.rng.standard_normal(cout).astype(np.float32))
            var = b.const(b.rng.uniform(0.5, 2.0, cout).astype(np.float32))
            y = b.node("BatchNormalization", [y, gamma, beta, mean, var], epsilon=1e-5)
        return y, (n, cout, h, w)
    if op == "Relu":
        return b.node("Relu", [x]), shape
    if op == "AddConst":
        return b.node("Add", [x, b.const(b.rng.standard_normal((1, c, 1, 1)).astype(np.float32))]), shape
    same = [t for t, s in pool if s == shape]
    if op == "AddBranch":
        return b.node("Add", [x, draw(st.sampled_from(same))]), shape
    if op == "TransposePair":  # any perm, then one that brings the batch axis back to 0
        perm = [int(p) for p in draw(st.permutations([0, 1, 2, 3]))]
        rest = [int(p) for p in draw(st.permutations([i for i in range(4) if i != perm.index(0)]))]
        back = [perm.index(0)] + rest
        y = b.node("Transpose", [b.node("Transpose", [x], perm=perm)], perm=back)
        mid = tuple(shape[p] for p in perm)
        return y, tuple(mid[p] for p in back)
    other = draw(st.sampled_from([t for t, s in pool if s[0] == n and s[2:] == (h, w)]))
    other_c = next(s for t, s in pool if t == other)[1]
    return b.node("Concat", [x, other], axis=1), (n, c + other_c, h, w)


def matrix_op(draw, b: Builder, x: str, shape: tuple, pool: list) -> tuple[str, tuple]:
    n, f = shape
    op = draw(st.sampled_from(["MatMulAdd", "MatMul", "Gemm", "Relu", "TransposePair", "Concat", "AddBranch"]))
    if op in ("MatMulAdd", "MatMul"):
        out = draw(st.integers(1, 12))
        y = b.node("MatMul", [x, b.weight(f, out, fan_in=f)])
        if op == "MatMulAdd":
            y = b.node("Add", [y, b.weight(out, fan_in=1)] if draw(st.booleans()) else [b.weight(out, fan_in=1), y])
        return y, (n, out)
    if op == "Gemm":
        out, trans = draw(st.integers(1, 12)), draw(st.integers(0, 1))
        w = b.weight(*((out, f) if trans else (f, out)), fan_in=f)
        return b.node("Gemm", [x, w, b.weight(out, fan_in=1)], transB=trans), (n, out)
    if op == "Relu":
        return b.node("Relu", [x]), shape
    if op == "TransposePair":
        t = b.node("Transpose", [x], perm=[1, 0])
        return b.node("Transpose", [t], perm=[1, 0]), shape
    if op == "AddBranch":
        return b.node("Add", [x, draw(st.sampled_from([t for t, s in pool if s == shape]))]), shape
    other = draw(st.sampled_from([t for t, s in pool if len(s) == 2 and s[0] == n]))
    return b.node("Concat", [x, other], axis=1), (n, f + next(s for t, s in pool if t == other)[1])


@st.composite
def onnx_graphs(draw, opset: int = OPSET) -> onnx.ModelProto:
    """A random valid float32 model with one input `x` [N, C, H, W] and one output `y` [N, F]."""
    seed = draw(st.integers(0, 2**31 - 1))
    b = Builder(np.random.default_rng(seed))
    n, c, h, w = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    x, shape = "x", (n, c, h, w)
    pool = [(x, shape)]
    for _ in range(draw(st.integers(0, 4))):
        x, shape = image_op(draw, b, x, shape, pool)
        pool.append((x, shape))
    flat = int(np.prod(shape[1:]))
    if draw(st.booleans()):  # Reshape∘Reshape
        x = b.node("Reshape", [x, b.const(np.array([n, shape[1], -1], np.int64), "s")])
    x, shape = b.node("Reshape", [x, b.const(np.array([-1, flat], np.int64), "s")]), (n, flat)
    pool = [(x, shape)]
    for _ in range(draw(st.integers(1, 4))):
        x, shape = matrix_op(draw, b, x, shape, pool)
        pool.append((x, shape))
    if draw(st.booleans()):
        x = b.node("Identity", [x])
    graph = helper.make_graph(
        b.nodes[:-1] + [_rename(b.nodes[-1], "y")],   # the matrix stage always adds a node
        "random", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [n, c, h, w])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model, full_check=True)
    return model


def _rename(node: onnx.NodeProto, output: str) -> onnx.NodeProto:
    node.output[0] = output
    return node
