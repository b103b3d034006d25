"""Data generators and error bounds for the kernel tests.

Data is random and never zero (a zero operand hides a wrong index); outputs
are poisoned (NaN, or -128 for int8, a value the quantizer never emits) so an
element a kernel forgets to write fails the comparison.

Error bounds, with u(dtype) the unit roundoff (half the machine epsilon):

- int8 epilogue (``epilogue_tolerance``): the float32 epilogue rounds about
  four times (int32 -> float32, two scale products, the bias sum) and the
  activation adds a few ulps of exp/erf while scaling errors by its slope
  (at most 1.13 for gelu, gelu_tanh, silu): 16 u(float32) times
  ``B = |acc * x_scale * w_scale| + |bias|``; the final cast adds half an ulp
  of the output dtype, u(out) * 1.13 * B, plus half the subnormal spacing.
- Casts to bfloat16 inside an interpreted kernel: Triton 3.9's interpreter
  truncates float32 -> bfloat16 (the compiled kernel rounds to nearest), so
  there the cast may be off by a whole ulp: ``cast_roundoff`` doubles u.
- per-token quantization (``assert_quantized``): both implementations compute
  in float32 with correctly rounded divisions: x' = x / smooth (1 rounding),
  scale = max|x'| / 127 (1 more), v = x' / scale (1 more), so the scale is
  within 2 u of the float64 one and v within about 4 u * |v| of it. A code
  may differ from the reference only where the float64 v lies that close to a
  rounding boundary k + 1/2 (5 u * max(|v|, 1) is used), and then by one
  step; everywhere else it must be equal.
- float32 dot products (``dot_tolerance``): the classic worst-case bound of
  recursive summation, gamma_n = n u / (1 - n u) times ``sum |x||w|``, with n
  = K plus the split-K partial sums plus the scale and bias steps.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest
import torch
import triton
from hypothesis import strategies as st

from graphopt.kernels import reference_quantize_per_token

U32 = 2.0**-24


def _version(text: str) -> tuple[int, int]:
    major, minor = text.split(".")[:2]
    return int(major), int(minor)


# Triton <= 3.6's interpreter turns scalar kernel arguments into 1-element arrays and calls int() on
# them (in `range(0, K, ...)`), which numpy >= 2.4 refuses; Triton 3.9 passes 0-d arrays.
INTERPRETER_WORKS = _version(triton.__version__) >= (3, 7) or _version(np.__version__) < (2, 4)
DEVICES = (["cpu"] if INTERPRETER_WORKS else []) + (["cuda"] if torch.cuda.is_available() else [])
"""CPU tensors run the kernels interpreted; CUDA tensors (when a GPU is present) compiled."""
needs_a_device = pytest.mark.skipif(
    not DEVICES, reason=f"no GPU, and triton {triton.__version__}'s interpreter fails with numpy {np.__version__}"
)


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


def cast_roundoff(dtype: torch.dtype, interpreted: bool) -> float:
    """Error bound (relative) of the final cast to ``dtype`` inside a kernel."""
    if interpreted and dtype == torch.bfloat16:
        return torch.finfo(dtype).eps
    return unit_roundoff(dtype)


def subnormal_half_spacing(dtype: torch.dtype) -> float:
    info = torch.finfo(dtype)
    return info.smallest_normal * info.eps / 2


def sizes(edges: list[int], high: int) -> st.SearchStrategy[int]:
    """A dimension for a kernel test: one of `edges` (sizes at tile, group or packing boundaries), or any
    size in [1, high]."""
    return st.one_of(st.sampled_from(edges), st.integers(1, high))


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def int8_nonzero(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    """Uniform over [-128, 127] without 0."""
    magnitude = torch.randint(1, 129, shape, generator=g)
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return (magnitude * sign).clamp(-128, 127).to(torch.int8)


def log_uniform(shape: tuple[int, ...], low: float, high: float, g: torch.Generator) -> torch.Tensor:
    """Positive float32 values spread over [exp(low), exp(high)]."""
    return torch.exp(torch.empty(shape).uniform_(low, high, generator=g))


def randn(shape: tuple[int, ...], g: torch.Generator, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=g).to(dtype)


def nan_like(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def epilogue_tolerance(
    x_q: torch.Tensor,
    w_q: torch.Tensor,
    x_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    out_dtype: torch.dtype,
    interpreted: bool = False,
) -> torch.Tensor:
    """Per-element bound on |int8_linear - float64 reference| (see the module docstring)."""
    b = (x_q.double() @ w_q.double().T * x_scale.double()[:, None] * w_scale.double()[None, :]).abs()
    if bias is not None:
        b = b + bias.double().abs()
    return (16 * U32 + 1.13 * cast_roundoff(out_dtype, interpreted)) * b + subnormal_half_spacing(out_dtype)


def dot_tolerance(
    x: torch.Tensor,
    w_q: torch.Tensor,
    w_scale: torch.Tensor,
    bias: Optional[torch.Tensor],
    reference: torch.Tensor,
    out_dtype: torch.dtype,
    extra_sums: int = 1,
    interpreted: bool = False,
) -> torch.Tensor:
    """Per-element bound on |w8a16_linear - float64 reference| (see the module docstring)."""
    n = x.shape[1] + extra_sums + 2
    s = x.double().abs() @ w_q.double().abs().T * w_scale.double()[None, :]
    if bias is not None:
        s = s + bias.double().abs()
    gamma = n * U32 / (1 - n * U32)
    return gamma * s + cast_roundoff(out_dtype, interpreted) * reference.abs() + subnormal_half_spacing(out_dtype)


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tolerance: torch.Tensor) -> None:
    """Every element of ``actual`` is finite and within ``tolerance`` of ``expected``."""
    actual = actual.double()
    assert torch.isfinite(actual).all(), f"{int((~torch.isfinite(actual)).sum())} non-finite (unwritten?) elements"
    excess = (actual - expected).abs() - tolerance
    worst = int(excess.argmax()) if excess.numel() else 0
    assert excess.numel() == 0 or excess.max() <= 0, (
        f"element {divmod(worst, actual.shape[-1])}: got {actual.flatten()[worst].item()!r}, "
        f"expected {expected.flatten()[worst].item()!r} +- {tolerance.flatten()[worst].item():.3g}"
    )


def to_device(device: str, *tensors: Optional[torch.Tensor]) -> list[Optional[torch.Tensor]]:
    return [None if t is None else t.to(device) for t in tensors]


def assert_quantized(q: torch.Tensor, scale: torch.Tensor, x: torch.Tensor, smooth: Optional[torch.Tensor]) -> None:
    """Codes and scales match the float64 reference up to float32 rounding (see the module docstring)."""
    q_ref, scale_ref = reference_quantize_per_token(x, smooth)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert torch.all((scale.double() - scale_ref).abs() <= 2 * U32 * scale_ref), "scale off by more than 2 roundings"
    x64 = x.double() / (smooth.double() if smooth is not None else 1.0)
    v = x64 / scale_ref[:, None]
    near_boundary = ((v - v.floor()) - 0.5).abs() <= 5 * U32 * v.abs().clamp_min(1.0)
    differs = q != q_ref
    assert not torch.any(differs & ~near_boundary), "a code differs away from a rounding boundary"
    assert torch.all((q.int() - q_ref.int()).abs() <= 1)
