"""int4-weight-only: group-wise RTN bounds, the activation-aware search, the rewrite on a tiny Llama, the head
policy and the memory bound.

RTN bound (int4.py): |Ŵ − W| ≤ s/2 with s = (max(0, max W_g) − min(0, min W_g)) / 15 per group.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.errors import OptionError
from graphopt.passes.quantize.int4 import awq_scale, fake_quantize_int4, int4_codes
from graphopt.data.zoo import CausalLMLogits
from tests.passes.quantize.helpers import QUIET, cosine, graph_targets

transformers = pytest.importorskip("transformers")


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), k=st.integers(1, 200), group=st.sampled_from([32, 64, 128]),
       shift=st.floats(-2, 2), seed=st.integers(0, 2**16))
def test_rtn_error_is_half_a_step(n, k, group, shift, seed) -> None:
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) + shift   # all-positive groups too
    codes, scale, zero = int4_codes(w, group)
    assert codes.max() <= 15 and zero.max() <= 15
    s = scale.repeat_interleave(group, dim=1)[:, :k]
    error = (fake_quantize_int4(w, group) - w).abs()
    assert (error <= s / 2 * (1 + 1e-5) + 1e-7).all()   # half a step, plus float32 rounding of w / s


def test_activation_aware_scale_beats_rtn_on_held_out_rows() -> None:
    """A few input channels 30x larger than the rest (the salient channels AWQ protects)."""
    g = torch.Generator().manual_seed(0)
    k, n = 256, 64
    loud = torch.ones(k)
    loud[torch.randperm(k, generator=g)[:8]] = 30.0
    calib, held_out = (torch.randn(r, k, generator=g) * loud for r in (512, 256))
    w = torch.randn(n, k, generator=g)
    c, alpha, rtn_error, best_error = awq_scale(w, calib, 64)
    assert alpha > 0 and best_error < rtn_error
    exact = held_out @ w.T
    rtn = ((held_out @ fake_quantize_int4(w, 64).T - exact).norm() / exact.norm()).item()
    aware = (((held_out / c) @ fake_quantize_int4(w * c, 64).T - exact).norm() / exact.norm()).item()
    assert aware < 0.8 * rtn, (aware, rtn)   # the calibration rows' gain carries over to new rows


def tiny_llama(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      initializer_range=0.1)
    return CausalLMLogits(transformers.LlamaForCausalLM(config).eval())


def param_bytes(module: nn.Module) -> int:
    tensors = {id(t): t for t in [*module.parameters(), *module.buffers()]}.values()
    return sum(t.numel() * t.element_size() for t in tensors)


def test_tiny_llama_rewrite_fires_and_stays_close() -> None:
    """Every projection of both layers becomes w4a16 with activation-aware scales (the head int8, the table
    int8 rows); logits keep cosine ≥ 0.95 to fp32 at batch 1 and 3 (the int4 pass's own budget, see
    config.DEFAULT_MIN_COSINE_INT4); the module's parameter bytes are ≤ 0.30× fp32. (One optimize call: a
    capture of the tiny Llama takes most of a minute on the shared 2-core machine.)"""
    calibrated = True
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, 12), generator=g)
    calibration = [torch.randint(0, 512, (2, 12), generator=g) for _ in range(3)] if calibrated else None
    opt = graphopt.optimize(model, (ids,), quantize="int4-weight-only", calibration_data=calibration,
                            quantize_options={"group_size": 32}, **QUIET)
    assert not opt.report.rolled_back, opt.report
    targets = graph_targets(opt)
    # O1 merges q/k/v and gate/up into one GEMM each, so each layer has 4 linears: qkv, o, gate_up, down
    assert sum(t.startswith("graphopt.w4a16_linear") for t in targets) == 2 * 4
    assert sum(t.startswith("graphopt.w8a16_linear") for t in targets) == 1        # lm_head
    assert not any("aten.linear" in t for t in targets)
    if calibrated:
        record = next(r for r in opt.report.records if r.name == "int4_weight_only")
        assert any("activation-aware" in row["runs"] for row in record.stats["layers"])
    assert param_bytes(opt.graph_module) <= 0.30 * param_bytes(model)
    for batch in (1, 3):
        x = torch.randint(0, 512, (batch, 12), generator=g)
        with torch.no_grad():
            expected, actual = model(x), opt(x)
        assert actual.shape == expected.shape
        assert cosine(actual, expected) >= 0.95


@pytest.mark.parametrize("head, head_op", [("float", "aten.linear"), ("int8", "graphopt.w8a16_linear"),
                                            ("int4", "graphopt.w4a16_linear")])
def test_head_policy(head, head_op) -> None:
    """The output head (the last linear before an output) follows quantize_options["head"]; the rest is int4."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10)).eval()
    opt = graphopt.optimize(model, (torch.randn(4, 64),), quantize="int4-weight-only",
                            quantize_options={"head": head, "group_size": 32}, **QUIET)
    linears = [t for t in graph_targets(opt) if "linear" in t]
    assert len(linears) == 2 and linears[0].startswith("graphopt.w4a16_linear") and linears[1].startswith(head_op)
    if head == "float":
        record = next(r for r in opt.report.records if r.name == "int4_weight_only")
        assert any("output head kept float" in row.get("reason", "") for row in record.stats["layers"])


@pytest.mark.parametrize("options, match", [
    ({"group_size": 48}, "group_size"),
    ({"head": "int2"}, "head"),
    ({"awq": True}, "calibration_data"),
])
def test_bad_int4_options(options, match) -> None:
    model = nn.Sequential(nn.Linear(64, 8)).eval()
    with pytest.raises(OptionError, match=match):
        graphopt.optimize(model, (torch.randn(2, 64),), quantize="int4-weight-only", quantize_options=options,
                          **QUIET)


def test_int4_options_rejected_for_int8() -> None:
    with pytest.raises(OptionError, match="int4-weight-only"):
        graphopt.optimize(nn.Linear(64, 8).eval(), (torch.randn(2, 64),), quantize="int8-weight-only",
                          quantize_options={"group_size": 64}, **QUIET)
