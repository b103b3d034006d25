"""LayerNorm and RMSNorm written out (mean/var or pow-mean, rsqrt or sqrt, with or
without affine, over one or two trailing dims) become layer_norm / rms_norm."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from graphopt.engine.rules import Reason

from .helpers import count, examples, fuse, ops, randn, reasons


class WrittenNorm(nn.Module):
    def __init__(self, kind: str, dims: int, width: int, variance: str, root: str, affine: bool, eps: float):
        super().__init__()
        self.kind, self.dims, self.variance, self.root, self.eps = kind, dims, variance, root, eps
        shape = (3, width)[-dims:] if dims == 2 else (width,)
        self.weight = nn.Parameter(torch.randn(shape)) if affine else None
        self.bias = nn.Parameter(torch.randn(shape)) if affine and kind == "layer" else None

    def forward(self, x):
        d = tuple(range(-self.dims, 0))
        z = x - x.mean(d, keepdim=True) if self.kind == "layer" else x
        if self.variance == "var" and self.kind == "layer":
            v = x.var(d, keepdim=True, unbiased=False)
        elif self.variance == "mul":
            v = (z * z).mean(d, keepdim=True)
        else:
            v = z.pow(2).mean(d, keepdim=True)
        y = z * torch.rsqrt(v + self.eps) if self.root == "rsqrt" else z / torch.sqrt(v + self.eps)
        if self.weight is not None:
            y = y * self.weight
        if self.bias is not None:
            y = y + self.bias
        return y


@examples(10)
@given(st.sampled_from(["layer", "rms"]), st.sampled_from([1, 2]), st.integers(2, 12),
       st.sampled_from(["pow", "mul", "var"]), st.sampled_from(["rsqrt", "sqrt"]), st.booleans(),
       st.sampled_from([1e-5, 1e-6, 1e-12]), st.integers(0, 2**16))
def test_written_norm_is_recognized(kind, dims, width, variance, root, affine, eps, seed):
    torch.manual_seed(seed)
    model = WrittenNorm(kind, dims, width, variance, root, affine, eps)
    opt = fuse(model, lambda s: (randn(2, 3, width, seed=s) * 3 + 1,))
    op = "layer_norm" if kind == "layer" else "rms_norm"
    assert count(opt, op) == 1
    assert ops(opt).count(op) == 1 and not {"mean", "rsqrt", "sqrt", "var"} & set(ops(opt))


class StdPlusEps(nn.Module):
    def forward(self, x):
        z = x - x.mean(-1, keepdim=True)
        return z / (torch.sqrt(z.pow(2).mean(-1, keepdim=True)) + 1e-5)


class NonTrailing(nn.Module):
    def forward(self, x):
        z = x - x.mean(1, keepdim=True)
        return z * torch.rsqrt(z.pow(2).mean(1, keepdim=True) + 1e-5)


class SharedMean(nn.Module):
    def forward(self, x):
        m = x.mean(-1, keepdim=True)
        z = x - m
        return z * torch.rsqrt(z.pow(2).mean(-1, keepdim=True) + 1e-5), m


class Unbiased(nn.Module):
    def forward(self, x):
        z = x - x.mean(-1, keepdim=True)
        return z * torch.rsqrt(x.var(-1, keepdim=True) + 1e-5)


def test_near_misses_are_not_rewritten():
    cases = {StdPlusEps(): Reason.NOT_THE_FORMULA, NonTrailing(): Reason.WRONG_AXIS,
             SharedMean(): Reason.OTHER_USERS, Unbiased(): Reason.NOT_THE_FORMULA}
    for model, why in cases.items():
        opt = fuse(model, lambda s: (randn(2, 4, 6, seed=s),))
        assert count(opt, "layer_norm") == 0, type(model).__name__
        assert why in reasons(opt, "recognize_normalization"), (type(model).__name__, why)
