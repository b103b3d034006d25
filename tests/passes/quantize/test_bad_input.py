"""Bad input: clear errors, or float with the reason."""
import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import InputError, OptionError
from tests.passes.quantize.helpers import QUIET, cosine, int8_record


def model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval()


X = torch.randn(4, 32, generator=torch.Generator().manual_seed(0))   # seeded: the global RNG state at import varies


def test_empty_calibration_data():
    with pytest.raises(InputError, match="empty"):
        graphopt.optimize(model(), (X,), quantize="int8-static", calibration_data=[], **QUIET)


def test_nan_in_calibration_names_the_input():
    bad = X.clone()
    bad[1, 3] = float("nan")
    with pytest.raises(InputError, match=r"batch 1 .*input"):
        graphopt.optimize(model(), (X,), quantize="int8-static", calibration_data=[X, bad], **QUIET)


def test_inf_appearing_inside_the_network_names_the_layer():
    """Layer 0 overflows; the error comes where a quantized layer (2) would observe it, naming layer 0."""
    m = model()
    with torch.no_grad():
        m[0].weight[0] = 3e38          # finite weights whose product overflows to inf
    huge = X.abs() * 1e3
    with pytest.raises(InputError, match="first appear in layer '0'"):
        graphopt.optimize(m, (X,), quantize="int8-static", calibration_data=[huge], **QUIET)


class MaskedLog(nn.Module):
    """T5's relative-position buckets in small: the log of a size that is 0 for some elements (−inf there,
    on purpose), discarded by `where`, feeding the quantized layers. The size is computed from the input
    so that constant folding cannot remove it."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(32, 64), nn.Linear(64, 8)

    def forward(self, x):
        size = x.abs().floor()                               # 0 wherever |x| < 1
        log_size = torch.log(size)                           # −inf there
        return self.b(torch.relu(self.a(x + torch.where(size > 0, log_size, torch.zeros_like(x)))))


@pytest.mark.parametrize("scheme", ["int8-static", "int8-dynamic"])
def test_infinite_intermediates_a_model_discards_are_not_a_calibration_error(scheme):
    """Regression: T5 at O3 with finite calibration data failed with "calibration batch 0 holds NaN/inf"."""
    torch.manual_seed(0)
    m = MaskedLog().eval()
    calibration = [torch.randn(4, 32) for _ in range(3)]
    opt = graphopt.optimize(m, (X,), level="O2", quantize=scheme, calibration_data=calibration, **QUIET)
    assert int8_record(opt).modified and not int8_record(opt).rolled_back, opt.report
    assert "smoothquant" in [r.name for r in opt.report.records]   # it calibrates too (default with data)
    with torch.no_grad():
        assert cosine(opt(X), m(X)) > 0.99      # the int8 pass's own budget


def test_all_zero_activations_get_a_finite_scale():
    x = torch.zeros(4, 32)
    # verify=False: verification on nonzero inputs would (rightly) reject a range calibrated on zeros
    opt = graphopt.optimize(model(), (x,), quantize="int8-static", calibration_data=[x], verify=False, **QUIET)
    assert int8_record(opt).modified
    for name, buffer in opt.graph_module.named_buffers():
        if name.endswith("x_scale"):
            assert torch.isfinite(buffer).all() and (buffer > 0).all()
    with torch.no_grad():
        assert cosine(opt(x), model()(x)) > 0.999


def test_constant_activations():
    x = torch.full((4, 32), 2.5)
    opt = graphopt.optimize(model(), (x,), quantize="int8-dynamic", calibration_data=[x], **QUIET)
    with torch.no_grad():
        assert cosine(opt(x), model()(x)) > 0.999


class Dequantizing(nn.Module):
    """A layer whose weight is already int8, dequantized at run time."""

    def __init__(self):
        super().__init__()
        w_q = torch.randint(-127, 128, (16, 64), dtype=torch.int8)
        w_q[:, 0] = 127                # as a per-channel absmax quantizer leaves it
        self.register_buffer("w_q", w_q)
        self.register_buffer("scale", torch.rand(16, 1) + 0.01)
        self.first = nn.Linear(32, 64)

    def forward(self, x):
        return nn.functional.linear(self.first(x), self.w_q.float() * self.scale)


def test_already_quantized_weights_are_recognized():
    """Constant folding turns `w_q.float() * scale` into a float constant on an int8 grid: it is
    requantized exactly (same codes and scales); left unfolded it stays float with the reason."""
    m = Dequantizing().eval()
    opt = graphopt.optimize(m, (X,), quantize="int8-dynamic", **QUIET)
    rows = {row["layer"]: row for row in int8_record(opt).stats["layers"]}
    [other] = [row for name, row in rows.items() if name != "first"]
    if other["scheme"] == "float":
        assert "already quantized" in other["reason"]
    else:
        assert "already quantized" in other["note"]
        w = m.w_q.float() * m.scale
        from graphopt.passes.quantize.observers import quantize_weight
        w_q, scale = quantize_weight(w)
        assert torch.allclose(w_q.float() * scale[:, None], w, rtol=1e-6, atol=0)


def test_already_optimized_module_is_left_alone():
    opt = graphopt.optimize(model(), (X,), quantize="int8-dynamic", **QUIET)
    again = graphopt.optimize(opt.graph_module, (X,), quantize="int8-dynamic", **QUIET)
    assert int8_record(again).stats["layers"] == [] and not int8_record(again).modified
    with torch.no_grad():
        assert torch.equal(again(X), opt(X))


def test_float64_layers_stay_float_with_the_reason():
    m = model().double()
    opt = graphopt.optimize(m, (X.double(),), quantize="int8-dynamic", **QUIET)
    rows = int8_record(opt).stats["layers"]
    assert all(row["scheme"] == "float" and "float64" in row["reason"] for row in rows)


@pytest.mark.parametrize("options, message", [
    ({"quantize_options": {"nonsense": 1}}, "unknown quantize_options"),
    ({"quantize_options": {"observer": "max"}}, "observer"),
    ({"quantize_options": {"alpha": 2.0}}, "alpha"),
    ({"accuracy_budget": 1.5}, "accuracy_budget"),
    ({"accuracy_budget": 0.01}, "calibration_data"),
])
def test_bad_options(options, message):
    with pytest.raises(OptionError, match=message):
        graphopt.optimize(model(), (X,), quantize="int8-dynamic", **options, **QUIET)


def test_static_needs_calibration():
    with pytest.raises(OptionError, match="calibration_data"):
        graphopt.optimize(model(), (X,), quantize="int8-static", **QUIET)
