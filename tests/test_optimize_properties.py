"""Property: level O1 computes what the original model computes, on any random model.

For models drawn from tests/strategies.py (MLPs, CNNs with BatchNorm, residual,
concat and split branches, hand-written attention, LayerNorm, many
activations) the optimized module must, on fresh random inputs of another
batch size, match the original within float32 rounding (verify.LOSSLESS_REL_TOL),
and leave the caller's model untouched. The rewrites each family exists to
exercise must also have fired (`expect_rewrites`), so the property cannot hold
because every rewrite silently stopped matching.
"""
import torch
import torch.nn as nn
from hypothesis import given, settings

import graphopt
from graphopt.engine.verify import LOSSLESS_REL_TOL, compare
from tests.strategies import models, same_digest, tensor_digest


@settings(max_examples=40)
@given(case=models())
def test_o1_matches_original_on_fresh_inputs_and_other_batch_sizes(case):
    digest = tensor_digest(case.model)
    opt = graphopt.optimize(case.model, case.make_inputs(3, 1), level="O1", measure_latency=False,
                            progress=False)
    assert same_digest(digest, tensor_digest(case.model)), "optimize() changed the caller's model"
    assert not opt.report.rolled_back, opt.report
    batches = [5, 3] if opt.report.meta["dynamic_batch"] else [3]
    for batch in batches:
        inputs = case.make_inputs(batch, 1234 + batch)
        with torch.no_grad():
            expected, actual = case.model(*inputs), opt(*inputs)
        errors = compare(actual, expected)
        assert errors.mismatch is None, errors.mismatch
        assert errors.max_rel <= LOSSLESS_REL_TOL, f"{case}: rel err {errors.max_rel:.3g}"
    expect_rewrites(case, opt.report.matches())


def expect_rewrites(case, matches: dict[str, int]) -> None:
    """Each CNN BatchNorm (all follow a convolution read only by it) is folded; each hand-written
    attention block becomes one scaled_dot_product_attention."""
    fired = lambda prefix: sum(n for name, n in matches.items() if name.startswith(prefix))  # noqa: E731
    if case.family == "cnn":
        norms = sum(isinstance(m, nn.BatchNorm2d) for m in case.model.modules())
        assert norms >= 1 and fired("batchnorm→conv") == norms, (case, matches)
    if case.family == "attn":
        assert fired("scaled_dot_product_attention") == len(case.model.layers), (case, matches)


@settings(max_examples=15)
@given(case=models())
def test_o0_is_capture_only(case):
    opt = graphopt.optimize(case.model, case.make_inputs(2, 0), level="O0", measure_latency=False,
                            progress=False)
    assert opt.report.records == []
    inputs = case.make_inputs(2, 7)
    with torch.no_grad():
        assert torch.allclose(opt(*inputs), case.model(*inputs), rtol=0, atol=0)
