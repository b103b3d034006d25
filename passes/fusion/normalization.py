"""Recognize LayerNorm and RMSNorm written out.

    d = x − mean(x, D);  d · rsqrt(mean(d², D) + ε)  [· γ] [+ β]  ⇒  layer_norm(x, shape(D), γ, β, ε)
    (also d / sqrt(var(x, D, correction=0) + ε), and d·d for d²)
    x · rsqrt(mean(x², D) + ε)  [· γ]                            ⇒  rms_norm(x, shape(D), γ, ε)
    (also x / sqrt(mean(x², D) + ε))

D must be the trailing dimensions (that is what both ops normalize), reduced
with keepdim. Math: layer_norm computes exactly (x − E[x]) / sqrt(Var[x] + ε) · γ + β
with the biased variance, and rms_norm x / sqrt(E[x²] + ε) · γ, so the rewrite
only changes float32 rounding. The affine γ/β are absorbed when they are
constants of the normalized shape (leading 1s allowed) and the same dtype.
Rejected with a reason: ε added outside the square root (x / (std + ε) is not
LayerNorm), a reduction over non-trailing dims or without keepdim, and
intermediates with other users.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.rules import Reason, Reject

from ..rules import Bindings, Match, Rule
from ._match import arg, call, constant_tensor, interior, rank, scalar

aten = torch.ops.aten


class NormalizationRule(Rule):
    """A canonical-form walker: LayerNorm / RMSNorm from var or mean(z²), rsqrt or 1/sqrt, with γ, β."""
    name = "normalization"
    anchors = (aten.rsqrt, aten.sqrt)

    def match(self, gm: fx.GraphModule, root: fx.Node) -> Bindings | Reject | None:
        normalize = next(iter(root.users), None)
        if normalize is None:
            return None
        inverse = ir.is_op(root, aten.rsqrt)
        if inverse and not ir.is_op(normalize, aten.mul) or not inverse and not _divides_by(normalize, root):
            if ir.is_op(normalize, aten.add) and not inverse:
                return Reject(Reason.NOT_THE_FORMULA, "eps is added outside the square root (x / (std + eps) is not a LayerNorm)")
            return None
        if len(root.users) != 1:
            return Reject(Reason.OTHER_USERS, f"{root.name} has other users")
        z = normalize.args[1] if normalize.args[0] is root else normalize.args[0]
        dead = [normalize, root]
        eps, stat = _eps(root.args[0], root, dead)
        if isinstance(stat, Reject):
            return stat
        reduced = _reduction(stat, z)
        if isinstance(reduced, Reject):
            return reduced
        dims, source_of_square = reduced
        dead.append(stat)
        if source_of_square is not None:
            dead.append(source_of_square)
        x = _centered_source(z, dims, stat)
        if isinstance(x, Reject):
            return x
        if x is None and ir.is_op(stat, aten.var):
            return Reject(Reason.NOT_THE_FORMULA, "variance of a tensor that is not the centred input")
        if x is not None and set(z.users) - {normalize, source_of_square, stat}:
            return Reject(Reason.OTHER_USERS, "centred value x − mean(x) has other users")
        shape = list(ir.shape(z)[-len(dims):])
        if not all(isinstance(d, int) for d in shape):
            return Reject(Reason.UNKNOWN_SHAPE, "normalized dims have symbolic sizes")
        return {"normalize": normalize, "z": z, "x": x, "eps": eps, "shape": shape, "dead": dead}

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        normalize, z, x, eps, shape, dead = b["normalize"], b["z"], b["x"], b["eps"], b["shape"], b["dead"]
        out, gamma, beta = _affine(gm, normalize, shape, ir.dtype(z), with_bias=x is not None)
        if x is not None:
            dead += [z, z.args[1]]
            new = call(gm.graph, aten.layer_norm.default, (x, shape, gamma, beta, eps), before=out)
            pattern = "layer_norm"
        else:
            new = call(gm.graph, aten.rms_norm.default, (z, shape, gamma, eps), before=out)
            pattern = "rms_norm"
        ir.replace_all_uses(out, new)
        return Match(pattern, [out, *dead])


RULES = [NormalizationRule()]


def _divides_by(node: fx.Node, denominator: fx.Node) -> bool:
    return ir.is_op(node, aten.div) and node.args[1] is denominator


def _eps(value: object, owner: fx.Node, dead: list[fx.Node]) -> tuple[float, fx.Node | Reject]:
    """(ε, the statistic under the root) from `stat + ε` or `stat`."""
    if isinstance(value, fx.Node) and ir.is_op(value, aten.add):
        eps = scalar(value.args[1])
        if eps is None:
            return 0.0, Reject(Reason.NOT_CONSTANT, "eps is not a constant scalar")
        if not interior(value, owner):
            return 0.0, Reject(Reason.OTHER_USERS, "stat + eps has other users")
        dead.append(value)
        value = value.args[0]
        owner = dead[-1]
    else:
        eps = 0.0
    if not isinstance(value, fx.Node) or not interior(value, owner):
        return eps, Reject(Reason.OTHER_USERS, "the statistic under the square root has other users or is not computed")
    return eps, value


def _trailing_dims(node: fx.Node, dims: object, keepdim: object) -> list[int] | Reject:
    r = rank(node)
    if r is None or not isinstance(dims, (list, tuple)) or not dims:
        return Reject(Reason.UNKNOWN_SHAPE, "reduction dims unknown")
    if keepdim is not True:
        return Reject(Reason.UNSUPPORTED_FORM, "reduction without keepdim")
    normalized = sorted(d % r for d in dims)
    if normalized != list(range(r - len(normalized), r)):
        return Reject(Reason.WRONG_AXIS, f"reduction over dims {list(dims)} is not over the trailing dims")
    return normalized


def _reduction(stat: fx.Node, z: object) -> tuple[list[int], fx.Node | None] | Reject:
    """(dims, the z² node) for mean(z², D); (dims, None) for var(x, D, correction=0)."""
    if ir.is_op(stat, aten.var):
        if stat.target == aten.var.dim:
            biased, keepdim = arg(stat, 2, "unbiased", True) is False, arg(stat, 3, "keepdim", False)
        else:
            biased, keepdim = stat.kwargs.get("correction", 1) == 0, stat.kwargs.get("keepdim", False)
        if not biased:
            return Reject(Reason.NOT_THE_FORMULA, "variance is unbiased (correction ≠ 0), LayerNorm uses the biased one")
        dims = _trailing_dims(stat, arg(stat, 1, "dim"), keepdim)
        return dims if isinstance(dims, Reject) else (dims, None)
    if not ir.is_op(stat, aten.mean) or len(stat.args) < 2:
        return Reject(Reason.NOT_THE_FORMULA, "statistic is not mean(x², dims)")
    square = stat.args[0]
    if not isinstance(square, fx.Node) or not interior(square, stat) or not _is_square_of(square, z):
        return Reject(Reason.NOT_THE_FORMULA, "statistic is not the mean of the square of the normalized value")
    dims = _trailing_dims(square, stat.args[1], arg(stat, 2, "keepdim", False))
    return dims if isinstance(dims, Reject) else (dims, square)


def _is_square_of(node: fx.Node, z: object) -> bool:
    if ir.is_op(node, aten.pow):
        return node.args[0] is z and scalar(node.args[1]) == 2.0
    return ir.is_op(node, aten.mul) and node.args[0] is z and node.args[1] is z


def _centered_source(z: object, dims: list[int], stat: fx.Node) -> fx.Node | None | Reject:
    """x when z = x − mean(x, dims, keepdim) (LayerNorm), None when z is not centred (RMSNorm)."""
    if not isinstance(z, fx.Node) or not ir.is_op(z, aten.sub) or z.kwargs.get("alpha", 1) != 1:
        return None
    x, mean = z.args[0], z.args[1]
    if not isinstance(mean, fx.Node) or not ir.is_op(mean, aten.mean) or mean.args[0] is not x:
        return None
    if _trailing_dims(x, mean.args[1], arg(mean, 2, "keepdim", False)) != dims:
        return Reject(Reason.WRONG_AXIS, "the mean and the variance reduce over different dims")
    if ir.is_op(stat, aten.var) and stat.args[0] is not x:
        return Reject(Reason.NOT_THE_FORMULA, "variance of a different tensor than the centred one")
    if set(mean.users) != {z}:
        return Reject(Reason.OTHER_USERS, "mean(x) has other users")
    return x


def _affine(gm: fx.GraphModule, normalized: fx.Node, shape: list, dtype: torch.dtype | None,
            with_bias: bool) -> tuple[fx.Node, fx.Node | None, fx.Node | None]:
    """Absorb `· γ` and (LayerNorm) `+ β` constants: (last absorbed node, γ, β)."""
    out, gamma, beta = normalized, None, None
    user = next(iter(out.users), None) if len(out.users) == 1 else None
    if user is not None and ir.is_op(user, aten.mul):
        gamma = _param(gm, user, out, shape, dtype)
        if gamma is not None:
            out = user
    user = next(iter(out.users), None) if len(out.users) == 1 else None
    if with_bias and user is not None and ir.is_op(user, aten.add) and user.kwargs.get("alpha", 1) == 1:
        beta = _param(gm, user, out, shape, dtype)
        if beta is not None:
            out = user
    return out, gamma, beta


def _param(gm: fx.GraphModule, op: fx.Node, value: fx.Node, shape: list, dtype: torch.dtype | None) -> fx.Node | None:
    """The constant other operand of `op`, reshaped to `shape`, if it broadcasts only along it."""
    other = op.args[1] if op.args[0] is value else op.args[0]
    tensor = constant_tensor(gm, other)
    if tensor is None or tensor.dtype != dtype or tensor.dim() > rank(value):
        return None
    dims = list(tensor.shape)
    lead, tail = dims[:len(dims) - len(shape)], dims[len(dims) - len(shape):]
    if any(d != 1 for d in lead) or tail != list(shape):
        return None
    if list(tensor.shape) == list(shape):
        return other
    return ir.add_constant(gm, ir.owned_name(other, f"{other.name}_affine"), tensor.reshape(shape), before=op)
