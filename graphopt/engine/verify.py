"""Numerical comparison of a rewritten model with a reference.

Outputs are flattened with torch's pytree (tuples, dicts, Hugging Face
`ModelOutput`s) and compared leaf by leaf:

- floating tensors: max absolute error, max relative error (normalised by the
  reference's largest magnitude, so near-zero elements do not dominate) and
  cosine similarity of the flattened tensors;
- integer/bool tensors and Python scalars must be equal.

`Budget` states what a pass may cost. `LOSSLESS` is "float32 rounding":
rewrites such as BN folding or GEMM merging re-associate sums, and a
float32 dot product of length K drifts by about sqrt(K)·2⁻²⁴ relative to
its magnitude; through a few dozen layers that stays well under 1e-4 of the
output's scale, while any real bug (a wrong channel, a missing bias) is
orders of magnitude above it.

A half-precision model rounds every intermediate to 2⁻¹¹ (float16) or 2⁻⁸
(bfloat16) relative, so a re-association there moves the output by a few
units of that rounding: `LOSSLESS` allows `ROUNDING_ULPS` machine epsilons of
the coarsest floating dtype among the reference outputs when that is larger
than 1e-4 (float32 outputs keep 1e-4). A wrong channel or missing bias still
shows as an error of the output's own order.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.utils._pytree as pytree

#: Relative error allowed for a lossless rewrite of a float32 model (see module docstring).
LOSSLESS_REL_TOL = 1e-4
#: Lossless in half precision: this many machine epsilons of the output dtype.
ROUNDING_ULPS = 4


@dataclass(frozen=True)
class Budget:
    """The largest error a pass may introduce, relative to the graph before it."""
    max_rel_err: float | None = None
    min_cosine: float | None = None
    rounding_ulps: float = 0.0    # also allow this many epsilons of the outputs' coarsest float dtype

    def allowed_rel_err(self, err: "Errors") -> float | None:
        if self.max_rel_err is None:
            return None
        return max(self.max_rel_err, self.rounding_ulps * err.eps)

    def check(self, err: "Errors") -> str | None:
        """None if `err` is within budget, else the reason why not."""
        if err.mismatch:
            return err.mismatch
        allowed = self.allowed_rel_err(err)
        if allowed is not None and not err.max_rel <= allowed:
            return f"relative error {err.max_rel:.3g} exceeds the budget {allowed:.3g}"
        if self.min_cosine is not None and not err.min_cosine >= self.min_cosine:
            return f"cosine similarity {err.min_cosine:.6f} is below the budget {self.min_cosine:.6f}"
        return None

    def describe(self) -> str:
        parts = []
        if self.max_rel_err is not None:
            ulps = f" (or {self.rounding_ulps:g} eps of a half-precision output)" if self.rounding_ulps else ""
            parts.append(f"rel err ≤ {self.max_rel_err:g}{ulps}")
        if self.min_cosine is not None:
            parts.append(f"cosine ≥ {self.min_cosine:g}")
        return ", ".join(parts) or "unbounded"


LOSSLESS = Budget(max_rel_err=LOSSLESS_REL_TOL, rounding_ulps=ROUNDING_ULPS)


@dataclass(frozen=True)
class Errors:
    max_abs: float = 0.0
    max_rel: float = 0.0
    min_cosine: float = 1.0
    mismatch: str | None = None   # structural/exact mismatch, e.g. different shapes
    eps: float = 0.0              # machine epsilon of the coarsest floating dtype compared

    def worst(self, other: "Errors") -> "Errors":
        return Errors(max(self.max_abs, other.max_abs), max(self.max_rel, other.max_rel),
                      min(self.min_cosine, other.min_cosine), self.mismatch or other.mismatch,
                      max(self.eps, other.eps))


def flatten_outputs(outputs: Any) -> list[Any]:
    leaves, _ = pytree.tree_flatten(outputs)
    return leaves


def compare(actual: Any, expected: Any) -> Errors:
    """Errors of `actual` against `expected` (any pytree of tensors/scalars)."""
    got, want = flatten_outputs(actual), flatten_outputs(expected)
    if len(got) != len(want):
        return Errors(math.inf, math.inf, -1.0, f"{len(got)} outputs instead of {len(want)}")
    result = Errors()
    for i, (a, b) in enumerate(zip(got, want)):
        result = result.worst(_compare_leaf(i, a, b))
    return result


def _compare_leaf(index: int, a: Any, b: Any) -> Errors:
    if not isinstance(b, torch.Tensor):
        same = (a == b) if not isinstance(a, torch.Tensor) else False
        return Errors() if same else Errors(math.inf, math.inf, -1.0, f"output {index}: {a!r} != {b!r}")
    if not isinstance(a, torch.Tensor) or a.shape != b.shape:
        got = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        return Errors(math.inf, math.inf, -1.0, f"output {index}: shape {got} instead of {tuple(b.shape)}")
    if not b.is_floating_point() and not b.is_complex():
        if torch.equal(a, b):
            return Errors()
        return Errors(math.inf, math.inf, -1.0, f"output {index}: integer values differ")
    eps = torch.finfo(b.dtype).eps if b.is_floating_point() else 0.0
    a64, b64 = a.detach().double(), b.detach().double()
    finite = torch.isfinite(b64)
    if not torch.equal(torch.isfinite(a64), finite):
        return Errors(math.inf, math.inf, -1.0, f"output {index}: non-finite values where the reference has none")
    if b64.numel() == 0 or not finite.any():
        return Errors(eps=eps)
    # the finite entries (views when all are: an LLM's logits in float64 are large, so no needless copies)
    av, bv = (a64.reshape(-1), b64.reshape(-1)) if bool(finite.all()) else (a64[finite], b64[finite])
    max_abs = (av - bv).abs_().max().item()
    scale = torch.linalg.vector_norm(bv, ord=math.inf).item()
    max_rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    denom = av.norm() * bv.norm()
    cosine = (av @ bv / denom).item() if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    return Errors(max_abs, max_rel, cosine, eps=eps)


def run_on(module: Callable, inputs: Sequence[tuple[tuple, dict]]) -> list[Any]:
    """Outputs of `module` on each (args, kwargs) pair, without autograd."""
    with torch.no_grad():
        return [module(*args, **kwargs) for args, kwargs in inputs]


def compare_runs(actual: Sequence[Any], expected: Sequence[Any]) -> Errors:
    result = Errors()
    for a, b in zip(actual, expected):
        result = result.worst(compare(a, b))
    return result
