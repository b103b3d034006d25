"""IR helpers: metadata refresh keeps the capture's symbolic dimensions."""
import torch
import torch.nn as nn

from graphopt.engine import ir
from graphopt.frontend.capture import capture


class PadsTokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 4)

    def forward(self, ids):
        return nn.functional.pad(self.embed(ids)[:, 1:], (0, 0, 0, 1)) * 2


def test_refresh_meta_keeps_symbolic_dimensions_through_composite_ops():
    """`aten.pad` run by plain fake-tensor propagation specialises the batch and sequence on the shared
    shape environment (a second refresh then records plain ints); under the Python dispatcher, as export
    traces, they stay symbolic."""
    gm = capture(PadsTokens(), (torch.randint(0, 9, (2, 16)),)).module
    for _ in range(2):
        ir.refresh_meta(gm)
    for node in gm.graph.nodes:
        value = node.meta.get("val")
        if node.op != "get_attr" and isinstance(value, torch.Tensor):
            assert not any(isinstance(d, int) for d in value.shape[:2]), (node.name, value.shape)
