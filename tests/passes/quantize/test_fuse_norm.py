"""LayerNorm fused into the per-token quantization it feeds: the graph surgery, on CPU.

On CPU the fused op runs torch's LayerNorm and then quantize_per_token, so the fused graph must
compute exactly what the unfused int8 graph computes (bit for bit), at any batch size; on CUDA the
Triton kernel's own error is checked in tests/kernels/test_layer_norm_quantize.py.
"""
import copy

import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.engine.rules import Reason
from graphopt.passes.quantize.fuse_norm import FuseLayerNormQuantize
from tests.passes.quantize.helpers import QUIET, graph_targets

FUSED = "graphopt.layer_norm_quantize.default"


class PreNormBlock(nn.Module):
    """x + W₂ act(W₁ LN(x)), and LN(x) also read by a second branch (the residual keeps y alive)."""

    def __init__(self, d: int, hidden: int, affine: bool) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d, elementwise_affine=affine)
        self.up, self.down, self.side = nn.Linear(d, hidden), nn.Linear(hidden, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        return x + self.down(torch.relu(self.up(y))) + self.side(y) + y


def _int8_graph(model: nn.Module, x: torch.Tensor) -> graphopt.OptimizedModule:
    return graphopt.optimize(model, (x,), quantize="int8-dynamic", speed_check=False, verify=False,
                             quantize_options={"smoothquant": False}, **QUIET)


@settings(max_examples=8, deadline=None)
# in_features > 16: such layers go int8 (smaller ones stay float by the default min_in_features)
@given(d=st.integers(17, 48), hidden=st.integers(17, 40), seq=st.sampled_from([None, 3]), affine=st.booleans(),
       seed=st.integers(0, 2**16))
def test_fused_graph_computes_what_the_unfused_graph_computes(d, hidden, seq, affine, seed):
    torch.manual_seed(seed)
    model = PreNormBlock(d, hidden, affine).eval()
    shape = (lambda b: (b, d)) if seq is None else (lambda b: (b, seq, d))
    opt = _int8_graph(model, torch.randn(shape(4)))
    assert FUSED not in graph_targets(opt), "on CPU the pipeline leaves the pair unfused (Reason.DEVICE)"
    gm = copy.deepcopy(opt.graph_module)
    result = FuseLayerNormQuantize(devices=("cpu",)).run(gm)
    assert result.stats["matches"] == {"layer_norm → quantize_per_token": 1}
    gm.recompile()
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(FUSED) == 1 and "aten.layer_norm.default" not in targets
    for batch in (1, 6):   # the batch stays dynamic through the fused reshape
        x = torch.randn(shape(batch)) * 3
        with torch.no_grad():
            assert torch.equal(gm(x), opt.graph_module(x))


def test_the_pipeline_rejects_it_on_cpu_with_its_reason_code():
    torch.manual_seed(0)
    opt = _int8_graph(PreNormBlock(24, 20, True).eval(), torch.randn(4, 24))
    record = next(r for r in opt.report.records if r.name == "fuse_layer_norm_quantize")
    assert record.stats["reasons"] == {Reason.DEVICE: len(record.stats["rejected"])} and record.stats["rejected"]
