"""O1's passes keep in-place cache writes: dead-code elimination keeps a write whose result is unused, and
common-subexpression elimination does not merge two copies of a cache when one of them is written."""
from __future__ import annotations

import torch

import graphopt
from graphopt.engine import ir


class WritesACache(torch.nn.Module):
    def forward(self, cache: torch.Tensor, new: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        written = cache.clone()
        untouched = cache.clone()                  # same op, same input as `written`: a CSE candidate
        written.index_copy_(1, slots, new)         # result unused: a DCE candidate
        written[:, :1] *= 2                        # a slice write
        return written - untouched


def test_cache_writes_survive_o1():
    cache, new, slots = torch.randn(2, 6, 4), torch.randn(2, 2, 4), torch.tensor([3, 5])
    opt = graphopt.optimize(WritesACache(), (cache, new, slots), level="O1", measure_latency=False,
                            progress=False)
    mutations = [n for n in opt.graph_module.graph.nodes if ir.is_mutating(n)]
    assert any("index_copy_" in str(n.target) for n in mutations), opt.graph_module.code
    for batch in (2, 3):
        args = (torch.randn(batch, 6, 4), torch.randn(batch, 2, 4), torch.tensor([0, 4]))
        assert torch.equal(opt(*args), WritesACache()(*args))
