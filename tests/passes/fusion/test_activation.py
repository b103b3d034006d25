"""GELU (erf and tanh forms) and SiLU written out in random spellings become the ATen ops."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from graphopt.engine.rules import Reason

from .helpers import count, examples, fuse, ops, randn, reasons

SQRT2, C = math.sqrt(2.0), math.sqrt(2.0 / math.pi)

GELU_ERF = [
    lambda x: 0.5 * x * (1 + torch.erf(x / SQRT2)),
    lambda x: x * 0.5 * (1.0 + torch.erf(x * 0.7071067811865476)),
    lambda x: x * (1 + torch.erf(x / SQRT2)) / 2,
    lambda x: (torch.erf(x / SQRT2) + 1) * (0.5 * x),
]
GELU_TANH = [
    lambda x: 0.5 * x * (1 + torch.tanh(C * (x + 0.044715 * torch.pow(x, 3)))),
    lambda x: x * 0.5 * (1 + torch.tanh(C * (x + 0.044715 * x * x * x))),
    lambda x: 0.5 * x * (1 + torch.tanh(C * x + C * 0.044715 * x ** 3)),
]
SILU = [lambda x: x * torch.sigmoid(x), lambda x: torch.sigmoid(x) * x]
NOT_GELU = [   # near misses: wrong constants, eps, or a plain erf/tanh/sigmoid use
    lambda x: 0.6 * x * (1 + torch.erf(x / SQRT2)),
    lambda x: 0.5 * x * (1 + torch.erf(x / 1.3)),
    lambda x: 0.5 * x * (1 + torch.tanh(C * (x + 0.05 * x ** 3))),
    lambda x: torch.tanh(x) + torch.sigmoid(x) * 2,
    lambda x: x * torch.sigmoid(x + 1),
]


class Block(nn.Module):
    def __init__(self, formula, width: int) -> None:
        super().__init__()
        self.linear, self.formula = nn.Linear(width, width), formula

    def forward(self, x):
        return self.formula(self.linear(x)) + x


def _case(formulas, draw_index: int, width: int, seed: int):
    torch.manual_seed(seed)
    return Block(formulas[draw_index % len(formulas)], width), lambda s: (randn(2, 3, width, seed=s),)


@examples(8)
@given(st.sampled_from(["erf", "tanh", "silu"]), st.integers(0, 3), st.integers(2, 16), st.integers(0, 2**16))
def test_written_activation_is_recognized(kind, index, width, seed):
    formulas = {"erf": GELU_ERF, "tanh": GELU_TANH, "silu": SILU}[kind]
    model, make_inputs = _case(formulas, index, width, seed)
    opt = fuse(model, make_inputs)
    pattern = {"erf": "gelu (erf)", "tanh": "gelu (tanh)", "silu": "silu"}[kind]
    assert count(opt, pattern) == 1
    assert ("silu" if kind == "silu" else "gelu") in ops(opt)
    assert not {"erf", "tanh", "sigmoid"} & set(ops(opt))


@examples(5)
@given(st.integers(0, len(NOT_GELU) - 1), st.integers(0, 2**16))
def test_near_misses_are_not_rewritten(index, seed):
    model, make_inputs = _case(NOT_GELU, index, 6, seed)
    opt = fuse(model, make_inputs)
    assert count(opt, "gelu") == 0 and count(opt, "silu") == 0


class SharedErf(nn.Module):
    def forward(self, x):
        e = torch.erf(x / SQRT2)
        return 0.5 * x * (1 + e), e


class SharedSigmoid(nn.Module):
    def forward(self, x):
        s = torch.sigmoid(x)
        return x * s, s


def test_no_rewrite_when_an_intermediate_has_another_user():
    for model, name in ((SharedErf(), "erf"), (SharedSigmoid(), "sigmoid")):
        opt = fuse(model, lambda s: (randn(4, 5, seed=s),))
        assert count(opt, "gelu") == 0 and count(opt, "silu") == 0
        assert Reason.OTHER_USERS in reasons(opt, "recognize_activations"), name
