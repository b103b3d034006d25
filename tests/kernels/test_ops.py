"""The torch.ops.graphopt custom ops: registration, opcheck, torch.export, torch.compile, clear errors, imports."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton.language as tl
from triton.runtime.jit import JITFunction

import graphopt.kernels as kernels
from graphopt.kernels import reference_int8_linear

from .helpers import (
    INTERPRETER_WORKS,
    assert_quantized,
    assert_within,
    epilogue_tolerance,
    generator,
    int8_nonzero,
    log_uniform,
    randn,
)

ops = torch.ops.graphopt


def int8_args(m: int = 5, n: int = 6, k: int = 33, seed: int = 0):
    g = generator(seed)
    return int8_nonzero((m, k), g), int8_nonzero((n, k), g), log_uniform((m,), -6, -4, g), log_uniform((n,), -6, -4, g)


@pytest.mark.parametrize(
    "op, args, kwargs",
    [
        (ops.quantize_per_token.default, (randn((5, 33), generator(0)),), {}),
        (ops.quantize_per_token.default, (randn((5, 33), generator(0)), torch.rand(33) + 0.5), {}),
        (ops.int8_linear.default, int8_args(), {}),
        (ops.int8_linear.default, (*int8_args(), torch.randn(6)), {"activation": "gelu", "out_dtype": torch.bfloat16}),
        (ops.w8a16_linear.default, (torch.randn(3, 33).half(), *int8_args()[1::2], torch.randn(6).half()), {}),
        (ops.layer_norm_quantize.default, (randn((5, 33), generator(0)), torch.rand(33), torch.randn(33), 1e-5), {}),
        (ops.layer_norm_quantize.default,
         (randn((5, 33), generator(1)).half(), None, None, 1e-6, torch.rand(33) + 0.5), {}),
    ],
    ids=["quantize", "quantize-smooth", "int8_linear", "int8_linear-epilogue", "w8a16", "layer_norm_quantize",
         "layer_norm_quantize-smooth"],
)
def test_opcheck(op, args, kwargs) -> None:
    """Schema, fake kernel, and AOT dispatch (static and dynamic shapes) agree with the real kernel."""
    torch.library.opcheck(op, args, kwargs)


def test_ops_on_cpu_match_references() -> None:
    x = randn((9, 33), generator(1))
    smooth = torch.rand(33) + 0.5
    q, s = ops.quantize_per_token(x, smooth)
    assert_quantized(q, s, x, smooth)
    _, w_q, _, w_scale = int8_args(9, 6, 33)
    y = ops.int8_linear(q, w_q, s, w_scale, activation="silu")
    expected = reference_int8_linear(q, w_q, s, w_scale, activation="silu")
    assert_within(y, expected, epilogue_tolerance(q, w_q, s, w_scale, None, torch.float32))
    # w8a16_linear's and w4a16_linear's CPU paths: test_w8a16.py and test_w4a16.py (their own bounds)


class Int8Block(torch.nn.Module):
    """What the int8 rewrite produces: per-token quantization, W8A8 linear with a gelu epilogue, W8A16 linear."""

    def __init__(self, k: int = 32, n: int = 24) -> None:
        super().__init__()
        g = generator(7)
        self.register_buffer("w1", int8_nonzero((n, k), g))
        self.register_buffer("s1", log_uniform((n,), -6, -4, g))
        self.register_buffer("b1", torch.randn(n, generator=g))
        self.register_buffer("smooth", log_uniform((k,), -1, 1, g))
        self.register_buffer("w2", int8_nonzero((k, n), g))
        self.register_buffer("s2", log_uniform((k,), -6, -4, g))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_q, x_scale = ops.quantize_per_token(x, self.smooth)
        h = ops.int8_linear(x_q, self.w1, x_scale, self.s1, self.b1, activation="gelu")
        return ops.w8a16_linear(h, self.w2, self.s2)


def test_torch_export_with_dynamic_batch() -> None:
    module = Int8Block()
    x = torch.randn(4, 32)
    batch = torch.export.Dim("batch", min=1, max=1024)
    exported = torch.export.export(module, (x,), dynamic_shapes=({0: batch},), strict=False)
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    ours = {f"graphopt.{name}.default" for name in ("quantize_per_token", "int8_linear", "w8a16_linear")}
    assert ours <= targets
    replay = exported.module()
    for rows in (4, 11):
        x = torch.randn(rows, 32)
        assert torch.equal(replay(x), module(x))


def test_torch_compile() -> None:
    module = Int8Block()
    compiled = torch.compile(module, backend="aot_eager", fullgraph=True)
    x = torch.randn(6, 32)
    assert torch.equal(compiled(x), module(x))


# (argument that is wrong, exception, words the message must contain)
INT8_CASES = {
    "x_q float": (lambda a: a.update(x_q=a["x_q"].float()), TypeError, "x_q"),
    "x_q 3-D": (lambda a: a.update(x_q=a["x_q"][None]), ValueError, "x_q"),
    "x_q column-major": (lambda a: a.update(x_q=a["x_q"].t().contiguous().t()), ValueError, "x_q must be row-major"),
    "K mismatch": (lambda a: a.update(w_q=a["w_q"][:, :-1]), ValueError, "K differs"),
    "x_scale length": (lambda a: a.update(x_scale=a["x_scale"][:-1]), ValueError, "x_scale"),
    "x_scale float16": (lambda a: a.update(x_scale=a["x_scale"].half()), TypeError, "x_scale"),
    "w_scale zero": (lambda a: a["w_scale"].__setitem__(2, 0.0), ValueError, "w_scale must be positive"),
    "x_scale nan": (lambda a: a["x_scale"].__setitem__(0, float("nan")), ValueError, "x_scale must be positive"),
    "bias length": (lambda a: a.update(bias=torch.randn(7)), ValueError, "bias"),
    "bias int": (lambda a: a.update(bias=torch.ones(6, dtype=torch.int32)), TypeError, "bias"),
    "activation": (lambda a: a.update(activation="tanh"), ValueError, "activation"),
    "out_dtype": (lambda a: a.update(out_dtype=torch.int32), TypeError, "out_dtype"),
    "device": (lambda a: a.update(w_scale=a["w_scale"].to("meta")), ValueError, "one device"),
}


@pytest.mark.parametrize("case", INT8_CASES, ids=str)
@pytest.mark.parametrize("impl", ["op", "triton", "reference"])
def test_int8_linear_rejects_bad_inputs(case: str, impl: str) -> None:
    x_q, w_q, x_scale, w_scale = int8_args(5, 6, 33)
    arguments = dict(x_q=x_q, w_q=w_q, x_scale=x_scale, w_scale=w_scale, bias=None, activation="none",
                     out_dtype=torch.float32)
    spoil, error, words = INT8_CASES[case]
    spoil(arguments)
    fn = {"op": ops.int8_linear, "triton": kernels.triton_int8_linear, "reference": reference_int8_linear}[impl]
    with pytest.raises(error, match=words):
        fn(**arguments)


QUANTIZE_CASES = {
    "x int8": (lambda a: a.update(x=a["x"].to(torch.int8)), TypeError, "x must have dtype"),
    "x 1-D": (lambda a: a.update(x=a["x"][0]), ValueError, "x must be 2-D"),
    "smooth length": (lambda a: a.update(smooth=torch.ones(5)), ValueError, "smooth"),
    "smooth zero": (lambda a: a.update(smooth=torch.zeros(33)), ValueError, "smooth must be positive"),
}


@pytest.mark.parametrize("case", QUANTIZE_CASES, ids=str)
@pytest.mark.parametrize("impl", ["op", "triton"])
def test_quantize_rejects_bad_inputs(case: str, impl: str) -> None:
    arguments = dict(x=randn((4, 33), generator(0)), smooth=None)
    spoil, error, words = QUANTIZE_CASES[case]
    spoil(arguments)
    fn = ops.quantize_per_token if impl == "op" else kernels.triton_quantize_per_token
    with pytest.raises(error, match=words):
        fn(**arguments)


W8A16_CASES = {
    "x int8": (lambda a: a.update(x=a["x"].to(torch.int8)), TypeError, "x must have dtype"),
    "w_q float": (lambda a: a.update(w_q=a["w_q"].half()), TypeError, "w_q"),
    "w_scale negative": (lambda a: a["w_scale"].__setitem__(0, -1.0), ValueError, "w_scale must be positive"),
    "K mismatch": (lambda a: a.update(x=a["x"][:, :7]), ValueError, "K differs"),
}


@pytest.mark.parametrize("case", W8A16_CASES, ids=str)
@pytest.mark.parametrize("impl", ["op", "triton"])
def test_w8a16_rejects_bad_inputs(case: str, impl: str) -> None:
    _, w_q, _, w_scale = int8_args(5, 6, 33)
    arguments = dict(x=randn((3, 33), generator(0), torch.float16), w_q=w_q, w_scale=w_scale, bias=None)
    spoil, error, words = W8A16_CASES[case]
    spoil(arguments)
    fn = ops.w8a16_linear if impl == "op" else kernels.triton_w8a16_linear
    with pytest.raises(error, match=words):
        fn(**arguments)


def test_scales_are_checked_again_after_a_write() -> None:
    """The positivity check runs once per tensor version: a scale zeroed in place after a good call is caught."""
    _, w_q, _, w_scale = int8_args(5, 6, 33)
    x = randn((3, 33), generator(0))
    ops.w8a16_linear(x, w_q, w_scale, None)
    w_scale[1:2].zero_()                          # through a view: the base's version counter moves too
    with pytest.raises(ValueError, match="w_scale must be positive"):
        ops.w8a16_linear(x, w_q, w_scale, None)


def test_inference_tensors_have_no_version_counter_and_are_checked_on_every_call() -> None:
    """Operands made under ``torch.inference_mode`` (activations, or weights of a model loaded there) carry no
    version counter: the ops still run, and a scale zeroed there is still caught."""
    with torch.inference_mode():
        _, w_q, _, w_scale = int8_args(5, 6, 33)
        x = randn((3, 33), generator(0))
        assert torch.isfinite(ops.w8a16_linear(x, w_q, w_scale, None)).all()
        w_scale[1] = 0.0
        with pytest.raises(ValueError, match="w_scale must be positive"):
            ops.w8a16_linear(x, w_q, w_scale, None)


def test_value_checks_can_be_switched_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHOPT_KERNEL_VALUE_CHECKS", "0")
    x_q, w_q, x_scale, w_scale = int8_args()
    w_scale[0] = 0.0
    assert ops.int8_linear(x_q, w_q, x_scale, w_scale)[:, 0].eq(0).all()


def test_this_process_runs_interpreted_kernels_with_compiled_only_triton_helpers() -> None:
    """Unless the suite was started with TRITON_INTERPRET=1, triton.language's helpers are compiled-only here,
    so every interpreted kernel test above also covered the launch-time workaround."""
    expected = JITFunction if not os.environ.get("TRITON_INTERPRET") else object
    assert isinstance(tl.standard.max, expected)


@pytest.mark.skipif(not INTERPRETER_WORKS, reason="this triton's interpreter fails with this numpy (see helpers)")
def test_kernels_run_when_triton_interpret_is_set_before_import() -> None:
    """The other import order: TRITON_INTERPRET=1 before triton is imported (helpers become interpreted)."""
    script = textwrap.dedent(
        """
        import torch
        import graphopt.kernels as k
        x = torch.randn(5, 40)
        x_q, s = k.triton_quantize_per_token(x)
        w_q = torch.randint(-127, 128, (6, 40), dtype=torch.int8)
        y = k.triton_int8_linear(x_q, w_q, s, torch.full((6,), 0.01), activation="silu")
        ref = k.reference_int8_linear(x_q, w_q, s, torch.full((6,), 0.01), activation="silu")
        assert (y.double() - ref).abs().max() < 1e-4, (y, ref)
        print("ok")
        """
    )
    env = dict(os.environ, TRITON_INTERPRET="1")
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-2000:]
