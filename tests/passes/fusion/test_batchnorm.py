"""BatchNorm folding: random convs (1-3 D, grouped, depthwise, transposed, with and
without bias) and linears followed by BN fold away, and the output is unchanged."""
from __future__ import annotations

import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from graphopt.engine.rules import Reason

from .helpers import count, examples, fuse, ops, randn, reasons

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
BN = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}


def random_bn(bn: nn.modules.batchnorm._BatchNorm, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=g))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=g) * 2 + 0.1)
        if bn.affine:
            bn.weight.copy_(torch.randn(bn.num_features, generator=g))
            bn.bias.copy_(torch.randn(bn.num_features, generator=g))
    return bn


@st.composite
def conv_bn(draw):
    dims = draw(st.sampled_from([1, 2, 3]))
    transposed = draw(st.booleans())
    groups = draw(st.sampled_from([1, 2, 4]))
    depthwise = draw(st.booleans()) and not transposed
    c_in = 4 * draw(st.integers(1, 2))
    c_out = c_in if depthwise else groups * draw(st.integers(1, 3))
    groups = c_in if depthwise else groups
    kernel = draw(st.sampled_from([1, 3]))
    stride = draw(st.sampled_from([1, 2]))
    bias, affine = draw(st.booleans()), draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    cls = (CONV_T if transposed else CONV)[dims]
    conv = cls(c_in, c_out, kernel, stride=stride, groups=groups, bias=bias)
    model = nn.Sequential(conv, random_bn(BN[dims](c_out, affine=affine), seed), nn.ReLU())
    size = 6 if dims < 3 else 4
    return model, lambda s: (randn(2, c_in, *[size] * dims, seed=s),), f"{cls.__name__} g={groups}"


@examples(8)
@given(conv_bn())
def test_conv_batchnorm_folds(case):
    model, make_inputs, _ = case
    opt = fuse(model, make_inputs)
    assert count(opt, "batchnorm→conv") == 1
    assert "batch_norm" not in ops(opt)
    assert_folded_weight_kept_its_module(opt)


@examples(4)
@given(st.integers(1, 8), st.integers(1, 8), st.booleans(), st.integers(0, 2**16))
def test_linear_batchnorm1d_folds(f_in, f_out, bias, seed):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(f_in, f_out, bias=bias), random_bn(nn.BatchNorm1d(f_out), seed))
    opt = fuse(model, lambda s: (randn(3, f_in, seed=s),))
    assert count(opt, "batchnorm→linear") == 1
    assert "batch_norm" not in ops(opt)
    assert_folded_weight_kept_its_module(opt)


def assert_folded_weight_kept_its_module(opt) -> None:
    """The folded weight lives under the layer's module path (`0.` in these Sequentials), not at the top:
    pruning patterns, per-layer labels and state_dict keys keep naming the layer."""
    weights = [name for name, p in opt.graph_module.named_parameters() if p.dim() > 1]
    assert weights and all(name.startswith("0.") for name in weights), weights


class SharedConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), random_bn(nn.BatchNorm2d(4), 0)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y), y.mean()


def test_no_fold_when_conv_output_has_another_user():
    opt = fuse(SharedConv(), lambda s: (randn(2, 3, 6, 6, seed=s),))
    assert count(opt, "batchnorm") == 0
    assert Reason.OTHER_USERS in reasons(opt, "fold_batchnorm")


def test_no_fold_for_batch_statistics():
    """track_running_stats=False: the BN normalizes with the batch's own statistics even in eval."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False))
    opt = fuse(model, lambda s: (randn(2, 3, 6, 6, seed=s),))
    assert count(opt, "batchnorm") == 0
    assert Reason.TRAINING_MODE in reasons(opt, "fold_batchnorm")


def test_no_fold_for_batchnorm1d_over_sequence_axis():
    """BN1d on a [N, L, C] linear output normalizes L: not the linear's features."""
    model = nn.Sequential(nn.Linear(5, 4), random_bn(nn.BatchNorm1d(3), 1))
    opt = fuse(model, lambda s: (randn(2, 3, 5, seed=s),))
    assert count(opt, "batchnorm") == 0
    assert Reason.WRONG_AXIS in reasons(opt, "fold_batchnorm")
