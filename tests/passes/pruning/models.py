"""Pruning-specific random models: the couplings the channel analysis must get right.

Besides the shared families of tests/strategies.py (residual, depthwise, concat,
split CNNs and hand-written attention), these draw grouped convolutions,
GroupNorm, squeeze-excitation gates with in-place ops, Swin-style (shifted) window attention, a chunk of one conv into two branches, conv → flatten → linear, and
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


class SqueezeExcite(nn.Module):
    """MBConv as torchvision writes it: in-place SiLU and `result += input`, gate · x from an SE branch."""

    def __init__(self, width: int, hidden: int, squeeze: int) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, width, 3, padding=1)
        self.expand = nn.Sequential(nn.Conv2d(width, hidden, 1, bias=False), nn.BatchNorm2d(hidden),
                                    nn.SiLU(inplace=True))
        self.dw = nn.Sequential(nn.Conv2d(hidden, hidden, 3, padding=1, groups=hidden, bias=False),
                                nn.BatchNorm2d(hidden), nn.SiLU(inplace=True))
        self.fc1, self.fc2 = nn.Conv2d(hidden, squeeze, 1), nn.Conv2d(squeeze, hidden, 1)
        self.proj = nn.Conv2d(hidden, width, 1)
        self.head = nn.Linear(width, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(self.expand(x))
        gate = torch.sigmoid(self.fc2(F.silu(self.fc1(F.adaptive_avg_pool2d(y, 1)))))
        result = self.proj(gate * y)
        result += x
        return self.head(result.mean((2, 3)))


class WindowAttention(nn.Module):
    """Swin-style block: (shifted) windows merged into the batch, a constant relative-position bias
    per head as the attention mask, then an MLP."""

    def __init__(self, dim: int, heads: int, window: int, shift: int, hidden: int) -> None:
        super().__init__()
        self.heads, self.window, self.shift = heads, window, shift
        self.qkv, self.o = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.register_buffer("bias", torch.randn(heads, window * window, window * window))
        self.up, self.down = nn.Linear(dim, hidden), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:   # x: [B, H, W, C]
        b, h, w, c = x.shape
        k, d = self.window, c // self.heads
        y = torch.roll(x, (-self.shift, -self.shift), (1, 2))
        y = y.view(b, h // k, k, w // k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, k * k, c)
        q, kk, v = self.qkv(y).split(c, dim=-1)
        q, kk, v = (t.view(t.shape[0], k * k, self.heads, d).transpose(1, 2) for t in (q, kk, v))
        out = F.scaled_dot_product_attention(q, kk, v, attn_mask=self.bias)
        out = self.o(out.transpose(1, 2).reshape(-1, k * k, c))
        out = out.view(b, h // k, w // k, k, k, c).permute(0, 1, 3, 2, 4, 5).reshape(b, h, w, c)
        x = x + torch.roll(out, (self.shift, self.shift), (1, 2))
        return x + self.down(F.gelu(self.up(x)))


@st.composite
def squeeze_excite_cases(draw: st.DrawFn) -> ModelCase:
    width, hidden = draw(st.integers(2, 6)), draw(st.integers(4, 16))
    squeeze, seed = draw(st.integers(2, 6)), draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = randomize_(SqueezeExcite(width, hidden, squeeze), seed)
    return ModelCase("squeeze-excite", model, _float_inputs(2, 5, 5),
                     f"width={width} hidden={hidden} squeeze={squeeze} seed={seed}")


@st.composite
def window_attention_cases(draw: st.DrawFn) -> ModelCase:
    heads, window = draw(st.integers(1, 3)), draw(st.sampled_from([2, 3]))
    dim, grid = heads * draw(st.integers(2, 4)), draw(st.integers(1, 2))
    shift, hidden, seed = draw(st.integers(0, window - 1)), draw(st.integers(4, 16)), draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = randomize_(WindowAttention(dim, heads, window, shift, hidden), seed)
    return ModelCase("window-attn", model, _float_inputs(window * grid, window * grid, dim),
                     f"dim={dim} heads={heads} window={window} grid={grid} shift={shift} hidden={hidden} seed={seed}")


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
    return st.one_of(cnn_cases(), attention_cases(), grouped_cases(), fused_attention_cases(),
                     squeeze_excite_cases(), window_attention_cases())
