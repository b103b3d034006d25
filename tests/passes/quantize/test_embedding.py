"""int8_embeddings: lookup tables stored as per-row int8; gathered rows within half a step of the float rows."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings
from hypothesis import strategies as st

import graphopt
from graphopt.passes.quantize.embedding import MIN_ELEMENTS
from graphopt.engine.rules import Reason
from tests.passes.quantize.helpers import QUIET


class Lookup(nn.Module):
    def __init__(self, rows: int, dim: int, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, dim).to(dtype)
        self.small = nn.Embedding(4, dim).to(dtype)          # below MIN_ELEMENTS: stays float

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids) + self.small(ids % 4)


def _record(opt):
    return opt.report["int8_embeddings"]


@settings(max_examples=15)
@given(rows=st.integers(MIN_ELEMENTS // 64, MIN_ELEMENTS // 16), dim=st.sampled_from([64, 96, 130]),
       seed=st.integers(0, 2**16), spread=st.floats(0.01, 100.0))
def test_gathered_rows_are_within_half_a_step_of_the_float_rows(rows, dim, seed, spread):
    torch.manual_seed(seed)
    model = Lookup(rows, dim).eval()
    with torch.no_grad():    # rows of very different magnitudes: each row gets its own scale
        model.table.weight.mul_(torch.logspace(-2, 0, rows)[torch.randperm(rows)][:, None] * spread)
    ids = torch.randint(0, rows, (3, 11))
    opt = graphopt.optimize(model, (ids,), quantize="int8-weight-only", **QUIET)
    record = _record(opt)
    assert not record.rolled_back, record.reason
    assert [row["scheme"] for row in record.stats["layers"]] == ["int8 rows", "float"]
    assert "too small to gain" in record.stats["layers"][1]["reason"]
    other = torch.randint(0, rows, (5, 7))
    table = model.table.weight.detach()
    step = table.abs().amax(dim=1) / 127                      # each row's quantization step
    with torch.no_grad():
        got, want = opt(other), model(other)
    bound = step[other][..., None] / 2 * (1 + 1e-5) + 1e-6 * want.abs()
    assert bool(((got - want).abs() <= bound).all())


def test_table_bytes_drop_four_times_and_the_state_survives_a_round_trip():
    model = Lookup(2048, 64).eval()
    ids = torch.randint(0, 2048, (2, 9))
    opt = graphopt.optimize(model, (ids,), quantize="int8-dynamic", **QUIET)
    weights = _record(opt).stats["weight_bytes"]      # int8 rows plus one float32 scale per row
    assert weights == {"before": 2048 * 64 * 4, "after": 2048 * (64 + 4)}   # 3.76× for 64-wide rows
    state = io.BytesIO()
    torch.save(opt.state_dict(), state)
    state.seek(0)
    other = graphopt.optimize(Lookup(2048, 64).eval(), (ids,), quantize="int8-dynamic", **QUIET)
    other.load_state_dict(torch.load(state))
    assert torch.equal(other(ids), opt(ids))
    exported = torch.export.export(opt.graph_module, (ids,))
    assert torch.equal(exported.module()(ids), opt(ids))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_tables_keep_their_dtype(dtype):
    model = Lookup(2048, 64, dtype).eval()
    ids = torch.randint(0, 2048, (2, 9))
    opt = graphopt.optimize(model, (ids,), quantize="int8-weight-only", **QUIET)
    assert _record(opt).stats["layers"][0]["scheme"] == "int8 rows"
    assert opt(ids).dtype == dtype


def test_excluded_tables_stay_float_with_the_reason():
    model = Lookup(2048, 64).eval()
    ids = torch.randint(0, 2048, (2, 9))
    opt = graphopt.optimize(model, (ids,), quantize="int8-dynamic", quantize_options={"exclude": ["table"]}, **QUIET)
    assert _record(opt).stats["layers"][0]["reason"] == "excluded by quantize_options['exclude']"
    assert _record(opt).reasons == {Reason.EXCLUDED: 1, Reason.NOT_ELIGIBLE: 1}   # table; small (too small)
