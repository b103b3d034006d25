"""Pruning-specific random models: the couplings the channel analysis must get right.

Besides the shared families of tests/strategies.py (residual, depthwise, concat,
split CNNs and hand-written attention), these draw grouped convolutions,
GroupNorm, a chunk of one conv into two branches, conv → flatten → linear, and
attention through `F.scaled_dot_product_attention` with a fused QKV
projection and grouped-query K/V heads.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

from tests.strategies import ModelCase, _float_inputs, attention_cases, cnn_cases, randomize_


class GroupedNet(nn.Module):
    def __init__(self, cin: int, width: int, groups: int, gn_groups: int, pool: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(cin, width, 3, padding=1)
        self.grouped = nn.Conv2d(width, width * 2, 3, padding=1, groups=groups)
        self.norm = nn.GroupNorm(gn_groups, width * 2)
        self.left, self.right = nn.Conv2d(width, width, 1), nn.Conv2d(width, width, 1, groups=width)
        self.pool = pool
        self.fc = nn.Linear(width * 2 * pool * pool, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.norm(self.grouped(F.relu(self.stem(x)))))
        a, b = y.chunk(2, dim=1)
        y = torch.cat([self.left(a), self.right(b) * 0.5], dim=1)
        y = F.adaptive_avg_pool2d(y, self.pool)
        return self.fc(y.flatten(1))


class FusedAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim)
        self.o = nn.Linear(heads * self.head_dim, dim)
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        d = self.head_dim
        q, k, v = self.qkv(x).split([self.heads * d, self.kv_heads * d, self.kv_heads * d], dim=-1)
        q = q.view(b, s, self.heads, d).transpose(1, 2)
        k = k.view(b, s, self.kv_heads, d).transpose(1, 2)
        v = v.view(b, s, self.kv_heads, d).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, enable_gqa=self.heads != self.kv_heads)
        x = self.norm(x + self.o(out.transpose(1, 2).reshape(b, s, self.heads * d)))
        return x + self.down(F.gelu(self.up(x)))


@st.composite
def grouped_cases(draw: st.DrawFn) -> ModelCase:
    groups = draw(st.sampled_from([1, 2, 4]))
    width = groups * draw(st.integers(1, 3)) * 2
    gn_groups = draw(st.sampled_from([g for g in (1, 2, 4) if (width * 2) % g == 0]))
    pool, seed = draw(st.integers(1, 2)), draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = randomize_(GroupedNet(2, width, groups, gn_groups, pool), seed)
    return ModelCase("grouped", model, _float_inputs(2, 6, 6),
                     f"width={width} groups={groups} gn={gn_groups} pool={pool} seed={seed}")


@st.composite
def fused_attention_cases(draw: st.DrawFn) -> ModelCase:
    kv_heads = draw(st.integers(1, 2))
    heads = kv_heads * draw(st.integers(1, 3))
    dim = heads * draw(st.integers(2, 4))
    hidden, seq, seed = draw(st.integers(4, 24)), draw(st.integers(1, 6)), draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = randomize_(FusedAttention(dim, heads, kv_heads, hidden), seed)
    return ModelCase("fused-attn", model, _float_inputs(seq, dim),
                     f"dim={dim} heads={heads} kv={kv_heads} hidden={hidden} seq={seq} seed={seed}")


def prunable_models() -> st.SearchStrategy[ModelCase]:
    return st.one_of(cnn_cases(), attention_cases(), grouped_cases(), fused_attention_cases())
