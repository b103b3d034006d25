"""repeat_kv before scaled_dot_product_attention becomes SDPA's enable_gqa (no materialized repeat)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from graphopt.engine.rules import Reason

from .helpers import count, examples, fuse, ops, randn, reasons


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """Hugging Face's repeat_kv, as its models write it."""
    b, h, n, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


class GroupedAttention(nn.Module):
    def __init__(self, groups: int, n_rep: int, head_dim: int, masked: bool, repeat_v: bool = True):
        super().__init__()
        self.groups, self.n_rep, self.d, self.masked, self.repeat_v = groups, n_rep, head_dim, masked, repeat_v
        self.q = nn.Linear(8, groups * n_rep * head_dim)
        self.kv = nn.Linear(8, 2 * groups * head_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).view(b, n, -1, self.d).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2 * self.groups, self.d).transpose(1, 2).chunk(2, dim=1)
        k = repeat_kv(k, self.n_rep)
        v = repeat_kv(v, self.n_rep) if self.repeat_v else v.repeat(1, self.n_rep, 1, 1)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask if self.masked else None)


@examples(6)
@given(groups=st.integers(1, 3), n_rep=st.integers(2, 4), head_dim=st.sampled_from([4, 8]), masked=st.booleans(),
       seq=st.integers(2, 6))
def test_repeat_kv_becomes_enable_gqa(groups, n_rep, head_dim, masked, seq):
    torch.manual_seed(0)
    model = GroupedAttention(groups, n_rep, head_dim, masked)

    def inputs(seed: int, batch: int = 2):
        mask = torch.ones(seq, seq, dtype=torch.bool).tril() & (randn(1, 1, seq, seq, seed=seed) > -1.5)
        return randn(batch + seed % 2, seq, 8, seed=seed), mask | torch.eye(seq, dtype=torch.bool)

    opt = fuse(model, inputs)     # compared with the model at two batch sizes
    assert count(opt, "repeat_kv") == 1
    assert "expand" not in ops(opt)
    sdpa = [n for n in opt.graph_module.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert [n.kwargs.get("enable_gqa") for n in sdpa] == [True]


def test_only_k_repeated_is_rejected_with_a_reason():
    torch.manual_seed(0)
    model = GroupedAttention(2, 2, 4, masked=False, repeat_v=False)
    opt = fuse(model, lambda seed: (randn(2, 5, 8, seed=seed), torch.zeros(())))
    assert count(opt, "repeat_kv") == 0
    assert reasons(opt, "grouped_query_attention") == {Reason.NOT_THE_FORMULA}
