"""Hand-written attention in the layouts real models use becomes scaled_dot_product_attention."""
from __future__ import annotations

import math

import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from graphopt.engine.rules import Reason

from .helpers import count, examples, fuse, ops, randn, reasons, rejections


class Attention(nn.Module):
    """Heads split by view + transpose/permute; scale on q, on the scores (mul or div);
    mask additive, masked_fill(-inf) or where(-inf); k transposed or permuted directly."""

    def __init__(self, dim: int, heads: int, split: str, scale_at: str, mask: str, fused_qkv: bool):
        super().__init__()
        self.heads, self.split, self.scale_at, self.mask = heads, split, scale_at, mask
        self.qkv = nn.Linear(dim, 3 * dim) if fused_qkv else None
        self.q, self.k, self.v = (nn.Linear(dim, dim) for _ in range(3))
        self.out = nn.Linear(dim, dim)

    def forward(self, x, mask):
        b, n, c = x.shape
        h, d = self.heads, c // self.heads
        q, k, v = self.qkv(x).split(c, -1) if self.qkv is not None else (self.q(x), self.k(x), self.v(x))
        q, v = (t.view(b, n, h, d).transpose(1, 2) for t in (q, v))
        if self.split == "permute":
            kt = k.view(b, n, h, d).permute(0, 2, 3, 1)
        else:
            kt = k.view(b, n, h, d).transpose(1, 2).transpose(-2, -1)
        scale = 1 / math.sqrt(d)
        if self.scale_at == "q":
            s = (q * scale) @ kt
        elif self.scale_at == "div":
            s = (q @ kt) / math.sqrt(d)
        else:
            s = (q @ kt) * scale
        if self.mask == "additive":
            s = s + mask
        elif self.mask == "masked_fill":
            s = s.masked_fill(mask, float("-inf"))
        elif self.mask == "where":
            s = torch.where(mask, s, float("-inf"))
        a = torch.softmax(s, dim=-1)
        return self.out((a @ v).transpose(1, 2).reshape(b, n, c))


def make_mask(kind: str, n: int, seed: int):
    causal = torch.ones(n, n, dtype=torch.bool).triu(1)
    if kind == "additive":
        return (randn(1, 1, n, n, seed=seed),)
    if kind == "masked_fill":
        return (causal,)
    if kind == "where":
        return (~causal,)
    return (torch.zeros(()),)


@examples(10)
@given(st.sampled_from([1, 2, 4]), st.sampled_from(["transpose", "permute"]), st.sampled_from(["q", "mul", "div"]),
       st.sampled_from(["none", "additive", "masked_fill", "where"]), st.booleans(), st.integers(0, 2**16))
def test_written_attention_becomes_sdpa(heads, split, scale_at, mask, fused_qkv, seed):
    torch.manual_seed(seed)
    dim, n = 4 * heads, 5
    model = Attention(dim, heads, split, scale_at, mask, fused_qkv)
    opt = fuse(model, lambda s: (randn(2, n, dim, seed=s), *make_mask(mask, n, s)))
    assert count(opt, "scaled_dot_product_attention") == 1
    assert "scaled_dot_product_attention" in ops(opt) and "softmax" not in ops(opt)


class Variant(nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind

    def forward(self, q, k, v, t):
        s = q @ k.transpose(-2, -1)
        if self.kind == "tensor scale":
            s = s * t
        elif self.kind == "finite fill":
            s = s.masked_fill(t > 0, -1e4)
        elif self.kind == "mask before scale":
            s = (s + t) * 0.5
        p = s.softmax(-1)
        if self.kind == "probs reused":
            return p @ v, p
        return p @ v


@examples(1)
@given(st.just(None))
def test_no_rewrite_for_non_constant_scale_finite_fill_shared_probs_or_early_mask(_):
    expected = {"tensor scale": Reason.NOT_CONSTANT, "finite fill": Reason.NOT_THE_FORMULA,
                "mask before scale": Reason.NOT_THE_FORMULA, "probs reused": Reason.OTHER_USERS}
    for kind, why in expected.items():
        opt = fuse(Variant(kind), lambda s: (randn(2, 3, 4, 8, seed=s), randn(2, 3, 4, 8, seed=s + 1),
                                             randn(2, 3, 4, 8, seed=s + 2), randn(2, 3, 4, 4, seed=s + 3)))
        assert count(opt, "scaled_dot_product_attention") == 0, kind
        assert why in reasons(opt, "recognize_attention"), (kind, rejections(opt, "recognize"))


class Broadcasting(nn.Module):
    """k shared across heads (batch dims differ): SDPA cannot take it as is."""

    def forward(self, q, k, v):
        return (q @ k.transpose(-2, -1)).softmax(-1) @ v


def test_no_rewrite_when_batch_dims_do_not_fit():
    opt = fuse(Broadcasting(), lambda s: (randn(2, 3, 4, 8, seed=s), randn(2, 1, 4, 8, seed=s + 1),
                                          randn(2, 3, 4, 8, seed=s + 2)))
    assert count(opt, "scaled_dot_product_attention") == 0
    assert reasons(opt, "recognize_attention") == {Reason.SHAPE_MISMATCH}
