"""ONNX Runtime's MatMulNBits on this CPU against the float MatMul: which forms `export_onnx(ops="onnxruntime")`
may write for weight-only layers.

    python -m bench.matmul_nbits

One linear layer y = x · Wᵀ (Llama-1B shapes, M = 1 and 8 rows, random weights), each form in its own
ONNX Runtime session (all graph optimizations, 2 intra-op threads), timed round-robin in one run: float32
MatMul (the anchor); MatMulNBits with 4-bit and 8-bit codes (block 128) at accuracy_level 1 (float32
activations: what the module computes, what the export writes for int4) and 4 (activations quantized to
int8 per block: another computation, W4A8 / W8A8).
"""
from __future__ import annotations

import argparse
import os
from typing import Any, Callable

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bench.harness import interleaved, pin_threads, rows_against, write_results

SHAPES = ((2048, 2048), (2048, 5632), (5632, 2048))   # (K, N): attention, MLP up, MLP down
BLOCK = 128


def _session(node: onnx.NodeProto, weights: list[np.ndarray], names: list[str], k: int, n: int,
             rows: int) -> Callable[[np.ndarray], Any]:
    graph = helper.make_graph([node], "layer", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [rows, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [rows, n])],
                              [numpy_helper.from_array(w, name) for w, name in zip(weights, names)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21),
                                                    helper.make_opsetid("com.microsoft", 1)])
    options = ort.SessionOptions()
    options.intra_op_num_threads = pin_threads()
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"A": x})


def forms(k: int, n: int, rows: int, rng: np.random.Generator) -> dict[str, Callable[[np.ndarray], Any]]:
    calls = {"float32 MatMul": _session(helper.make_node("MatMul", ["A", "W"], ["Y"]),
                                        [rng.standard_normal((k, n), dtype=np.float32)], ["W"], k, n, rows)}
    blocks = k // BLOCK
    for bits in (4, 8):
        codes = rng.integers(0, 256, (n, blocks, BLOCK * bits // 8), dtype=np.uint8)
        scales = (rng.random(n * blocks, dtype=np.float32) * 0.01 + 1e-3).astype(np.float32)
        for level in (1, 4):
            node = helper.make_node("MatMulNBits", ["A", "B", "scales"], ["Y"], domain="com.microsoft", K=k, N=n,
                                    bits=bits, block_size=BLOCK, accuracy_level=level)
            calls[f"MatMulNBits {bits}-bit, accuracy_level {level}"] = _session(node, [codes, scales],
                                                                                ["B", "scales"], k, n, rows)
    return calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    args = parser.parse_args(argv)
    load = os.getloadavg()
    rng = np.random.default_rng(0)
    rows_out = []
    for k, n in SHAPES:
        for rows in (1, 8):
            x = rng.standard_normal((rows, k), dtype=np.float32)
            calls = {name: (lambda run=run: run(x)) for name, run in forms(k, n, rows, rng).items()}
            rows_out += rows_against(interleaved(calls, args.rounds), "float32 MatMul", "form",
                                     "× float32 MatMul (time)", K=k, N=n, M=rows)
            print(*rows_out[-len(calls):], sep="\n", flush=True)
    notes = (f"Each row: the median of {args.rounds} interleaved rounds (one call of each form per round, order "
             f"rotating) and its p10–p90; × float32 MatMul = time ratio (< 1 is faster). Block {BLOCK}, random "
             f"codes and scales. Load average at start: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}.")
    print(f"wrote {write_results('matmul_nbits', 'ONNX Runtime MatMulNBits vs float MatMul (CPU)', rows_out, notes)}")


if __name__ == "__main__":
    main()
