"""Parallel linears / convs reading one input merge into one GEMM and a split."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from .helpers import count, examples, fuse, ops, randn


class Parallel(nn.Module):
    def __init__(self, width: int, outs: list[int], biases: list[bool], reshape_heads: bool):
        super().__init__()
        self.branches = nn.ModuleList(nn.Linear(width, o, bias=b) for o, b in zip(outs, biases))
        self.reshape_heads = reshape_heads

    def forward(self, x):
        ys = [f(x) for f in self.branches]
        if self.reshape_heads:   # a view straight on each output, as attention does
            ys = [y.view(*y.shape[:-1], 1, y.shape[-1]).sum(-2) for y in ys]
        return sum(y.sum(-1, keepdim=True) for y in ys) + ys[0].mean()


@examples(8)
@given(st.integers(2, 12), st.lists(st.tuples(st.integers(1, 9), st.booleans()), min_size=2, max_size=4),
       st.booleans(), st.integers(0, 2**16))
def test_parallel_linears_merge(width, branches, reshape_heads, seed):
    torch.manual_seed(seed)
    model = Parallel(width, [o for o, _ in branches], [b for _, b in branches], reshape_heads)
    opt = fuse(model, lambda s: (randn(2, 3, width, seed=s),))
    assert opt.report.matches().get(f"merged {len(branches)}× linear") == 1
    assert ops(opt).count("linear") == 1
    # the merged weight stays under the first branch's module: layer names, patterns, state_dict keys
    merged = [name for name, _ in opt.graph_module.named_parameters() if "merged_weight" in name]
    assert len(merged) == 1 and merged[0].startswith("branches.0."), merged


class Inception(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(8, 4, 1), nn.Conv2d(8, 6, 1, bias=False)
        self.c, self.d = nn.Conv2d(8, 3, 3, padding=1), nn.Conv2d(8, 5, 3, padding=1)
        self.e = nn.Conv2d(8, 8, 1, groups=2)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x).relu(), self.c(x), self.d(x), self.e(x)], 1)


def test_inception_branches_merge_by_geometry():
    opt = fuse(Inception(), lambda s: (randn(2, 8, 6, 6, seed=s),))
    assert opt.report.matches().get("merged 2× conv2d") == 2
    assert ops(opt).count("conv2d") == 3   # 1×1 pair, 3×3 pair, the grouped one alone


class RuntimeWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)

    def forward(self, x, w):
        return self.a(x) + torch.nn.functional.linear(x, w)


def test_no_merge_with_a_runtime_weight():
    opt = fuse(RuntimeWeight(), lambda s: (randn(2, 4, seed=s), randn(4, 4, seed=s + 1)))
    assert count(opt, "merged") == 0
