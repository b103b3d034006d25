"""Algebraic cleanups: layout chains collapse, matmul(+bias) becomes linear with a
pre-transposed weight, scalars fold into neighbouring linears."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from graphopt.engine.rules import Reason

from .helpers import count, examples, fuse, ops, randn, reasons


class Layout(nn.Module):
    def __init__(self, perms: list[list[int]]) -> None:
        super().__init__()
        self.perms = perms

    def forward(self, x):
        for p in self.perms:
            x = x.permute(*p)
        return x.reshape(x.shape[0], -1).reshape(-1) * 2   # .view(-1) fails on some permutations (non-contiguous)


@examples(8)
@given(st.lists(st.permutations([0, 1, 2, 3]), min_size=2, max_size=4), st.integers(0, 2**16))
def test_permute_and_reshape_chains_collapse(perms, seed):
    opt = fuse(Layout([list(p) for p in perms]), lambda s: (randn(2, 3, 4, 5, seed=s),))
    assert count(opt, "permute chain") >= 1 and count(opt, "reshape chain") == 1
    assert ops(opt).count("permute") <= 1 and ops(opt).count("reshape") + ops(opt).count("view") == 1


class HandLinear(nn.Module):
    def __init__(self, f_in: int, f_out: int, bias: bool, scale: str) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(f_in, f_out))
        self.b = nn.Parameter(torch.randn(f_out)) if bias else None
        self.scale = scale

    def forward(self, x):
        if self.scale == "input":
            x = x * 0.5
        y = x @ self.w
        if self.b is not None:
            y = y + self.b
        return y / 3.0 if self.scale == "output" else y


@examples(8)
@given(st.integers(1, 8), st.integers(1, 8), st.booleans(), st.sampled_from(["none", "input", "output"]),
       st.integers(0, 2**16))
def test_matmul_bias_and_scalars_become_one_linear(f_in, f_out, bias, scale, seed):
    torch.manual_seed(seed)
    opt = fuse(HandLinear(f_in, f_out, bias, scale), lambda s: (randn(2, 3, f_in, seed=s),))
    assert count(opt, "matmul + bias → linear" if bias else "matmul → linear") == 1
    assert count(opt, "scalar → linear") == (scale != "none")
    assert ops(opt) == ["linear"]


class NoFold(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x, y):
        h = self.a(x)
        return h * 0.5, h, x @ y   # the linear output is used twice; y is not a constant


def test_no_fold_with_shared_output_or_runtime_operand():
    opt = fuse(NoFold(), lambda s: (randn(2, 4, seed=s), randn(4, 4, seed=s + 1)))
    assert count(opt, "scalar") == 0 and count(opt, "matmul") == 0
    assert "matmul" in ops(opt)
    assert Reason.OTHER_USERS in reasons(opt, "algebraic_cleanup")
