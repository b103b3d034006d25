"""Recognize hand-written attention and call scaled_dot_product_attention.

    s = matmul(q·c_q, kᵀ·c_k) · c          (scale: mul or div by constants, before or after)
    s = s + M                              (optional additive mask)
      | masked_fill(s, B, −inf) | where(B', s, −inf)   (optional boolean mask)
    matmul(softmax(s, −1), v)          ⇒   scaled_dot_product_attention(q, k, v, mask, scale=c_q·c_k·c)

Math: SDPA computes softmax(q·kᵀ·scale + M) · v, with a boolean mask meaning
"attend where True" (so masked_fill's B becomes ¬B). The scale is the product
of every constant factor on q, on kᵀ and on the scores, which commute with the
matmul; k is recovered from kᵀ by undoing the transpose/permute that produced
it (heads split by view + transpose/permute), or by a new transpose.

Rejected with a reason: softmax not over the last dim, intermediates with other
users, a scale that is a tensor rather than a constant, a mask added before the
scale, a finite fill value (SDPA's boolean mask means −inf), a mask that would
broadcast the scores to a larger shape or has another dtype, and q/k/v whose
ranks, batch dims or dtypes do not fit.
"""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from graphopt.engine import ir
from graphopt.engine.rules import Reason, Reject

from ..rules import Bindings, Match, Rule
from ._match import arg, call, interior, permutation, rank, same_shape, scalar, users

aten = torch.ops.aten

_MATMULS = (aten.matmul, aten.bmm)


class AttentionRule(Rule):
    """A canonical-form walker: every spelling of mask and scale under the softmax reads the same."""
    name = "attention"
    anchors = (aten.softmax, aten._softmax)

    def match(self, gm: fx.GraphModule, softmax: fx.Node) -> Bindings | Reject | None:
        consumers = users(softmax)
        out = consumers[0] if consumers else None
        if out is None or not ir.is_op(out, *_MATMULS) or out.args[0] is not softmax:
            return None   # a softmax that does not weight values
        if len(consumers) != 1:
            return Reject(Reason.OTHER_USERS, "softmax output has other users")
        r = rank(softmax)
        if r is None or r < 3 or softmax.args[1] % r != r - 1:
            return Reject(Reason.WRONG_AXIS, "softmax is not over the last dim of a batched score tensor")
        if _softmax_casts(softmax):
            return Reject(Reason.DTYPE_MISMATCH, "softmax changes the dtype")
        dead = [out, softmax]
        scores = _strip_mask_and_scale(softmax.args[0], softmax, dead)
        if isinstance(scores, Reject):
            return scores
        product, mask, scale = scores
        if not ir.is_op(product, *_MATMULS):
            return Reject(Reason.WRONG_PRODUCER, "scores are not a matmul")
        q, q_scale = _strip_scale(product.args[0], product, dead)
        kt, k_scale = _strip_scale(product.args[1], product, dead)
        if q_scale is None or k_scale is None:
            return Reject(Reason.NOT_CONSTANT, "q or k is scaled by a non-constant")
        v = out.args[1]
        reason = _check_operands(q, kt, v, mask)
        if reason:
            return reason
        return {"q": q, "kt": kt, "v": v, "mask": mask, "scale": scale * q_scale * k_scale, "product": product,
                "out": out, "dead": dead}

    def rewrite(self, gm: fx.GraphModule, b: Bindings) -> Match:
        q, v, mask, out, dead = b["q"], b["v"], b["mask"], b["out"], b["dead"]
        k = _untranspose(gm, b["kt"], b["product"], out, dead)
        if mask is not None and mask[1]:
            mask_node = call(gm.graph, aten.logical_not.default, (mask[0],), before=out)
        else:
            mask_node = mask[0] if mask is not None else None
        sdpa = call(gm.graph, aten.scaled_dot_product_attention.default, (q, k, v, mask_node),
                    {"scale": b["scale"]}, before=out)
        ir.replace_all_uses(out, sdpa)
        return Match("scaled_dot_product_attention" + ("" if mask is None else " (masked)"), dead)


RULES = [AttentionRule()]


def _softmax_casts(softmax: fx.Node) -> bool:
    if ir.is_op(softmax, aten._softmax):
        return bool(softmax.args[2])
    dtype = arg(softmax, 2, "dtype")
    return dtype is not None and dtype != ir.dtype(softmax.args[0])


def _strip_mask_and_scale(value: object, owner: fx.Node, dead: list[fx.Node]):
    """(matmul node, (mask, negate) | None, scale) under the softmax, or a reason."""
    mask, scale = None, 1.0
    while isinstance(value, fx.Node) and ir.is_op(value, aten.add, aten.mul, aten.div, aten.masked_fill, aten.where):
        if not interior(value, owner):
            return Reject(Reason.OTHER_USERS, f"{value.name} (between the scores and the softmax) has other users")
        factor = _scalar_factor(value)
        if factor is not None:
            scale, inner = scale * factor, value.args[0]
        elif ir.is_op(value, aten.mul, aten.div):
            return Reject(Reason.NOT_CONSTANT, "scores are scaled by a tensor, not a constant")
        else:
            if mask is not None:
                return Reject(Reason.UNSUPPORTED_FORM, "more than one mask")
            if scale != 1.0:
                return Reject(Reason.NOT_THE_FORMULA, "the mask is added before the scale (SDPA would not scale it)")
            found = _mask(value)
            if isinstance(found, Reject):
                return found
            mask, inner = found
        dead.append(value)
        owner, value = value, inner
    if not isinstance(value, fx.Node) or not interior(value, owner):
        return Reject(Reason.OTHER_USERS, "the scores matmul has other users")
    dead.append(value)
    return value, mask, scale


def _scalar_factor(node: fx.Node) -> float | None:
    if ir.is_op(node, aten.mul, aten.div) and isinstance(node.args[0], fx.Node):
        c = scalar(node.args[1])
        if c is not None and c != 0:
            return c if ir.is_op(node, aten.mul) else 1.0 / c
    return None


def _mask(node: fx.Node):
    """((mask, negate), scores) for add / masked_fill / where, or a reason."""
    if ir.is_op(node, aten.add):
        scores, mask = node.args[0], node.args[1]
        if not isinstance(mask, fx.Node) or not isinstance(scores, fx.Node) or node.kwargs.get("alpha", 1) != 1:
            return Reject(Reason.UNSUPPORTED_FORM, "additive mask is not a tensor")
        if not same_shape(ir.shape(node), ir.shape(scores)):
            return Reject(Reason.SHAPE_MISMATCH, "the mask broadcasts the scores to a larger shape")
        if ir.dtype(mask) != ir.dtype(scores):
            return Reject(Reason.DTYPE_MISMATCH, f"additive mask dtype {ir.dtype(mask)} differs from the scores' {ir.dtype(scores)}")
        return (mask, False), scores
    if ir.is_op(node, aten.masked_fill):
        scores, mask, fill = node.args[0], node.args[1], node.args[2]
        negate = True
    else:   # where(B, s, -inf) keeps s where B; where(B, -inf, s) masks where B
        negate = scalar(node.args[1]) is not None
        mask, scores, fill = node.args[0], node.args[2 if negate else 1], node.args[1 if negate else 2]
        if not same_shape(ir.shape(node), ir.shape(scores)):
            return Reject(Reason.SHAPE_MISMATCH, "the mask broadcasts the scores to a larger shape")
    if scalar(fill) != -math.inf:
        return Reject(Reason.NOT_THE_FORMULA, f"fill value {fill} is not -inf (SDPA's boolean mask means -inf)")
    if ir.dtype(mask) != torch.bool:
        return Reject(Reason.DTYPE_MISMATCH, "boolean mask is not a bool tensor")
    return (mask, negate), scores


def _strip_scale(value: object, owner: fx.Node, dead: list[fx.Node]) -> tuple[object, float | None]:
    scale = 1.0
    while isinstance(value, fx.Node) and ir.is_op(value, aten.mul, aten.div) and interior(value, owner):
        factor = _scalar_factor(value)
        if factor is None:
            return value, None
        scale *= factor
        dead.append(value)
        owner, value = value, value.args[0]
    return value, scale


def _check_operands(q: object, kt: object, v: object, mask: object) -> Reject | None:
    shapes = [ir.shape(n) for n in (q, kt, v)]
    if any(s is None for s in shapes):
        return Reject(Reason.UNKNOWN_SHAPE, "q, k or v has no shape metadata")
    qs, ks, vs = shapes
    if not len(qs) == len(ks) == len(vs) or len(qs) < 3:
        return Reject(Reason.SHAPE_MISMATCH, f"q, kᵀ, v ranks {len(qs)}, {len(ks)}, {len(vs)} do not fit SDPA")
    if not (same_shape(qs[:-2], ks[:-2]) and same_shape(qs[:-2], vs[:-2])):
        return Reject(Reason.SHAPE_MISMATCH, "q, k and v batch/head dims differ (broadcasting matmul)")
    if str(ks[-1]) != str(vs[-2]):
        return Reject(Reason.SHAPE_MISMATCH, "k and v sequence lengths differ")
    dtypes = {ir.dtype(n) for n in (q, kt, v)}
    if len(dtypes) != 1 or not next(iter(dtypes)).is_floating_point:
        return Reject(Reason.DTYPE_MISMATCH, f"q, k, v dtypes {sorted(map(str, dtypes))} are not one float dtype")
    return None


def _untranspose(gm: fx.GraphModule, kt: fx.Node, product: fx.Node, before: fx.Node, dead: list[fx.Node]) -> fx.Node:
    """k such that kt = k.transpose(-2, -1): undo kt's own permutation when it has one."""
    r = rank(kt)
    perm = permutation(kt)
    if perm is None:
        return call(gm.graph, aten.transpose.int, (kt, -2, -1), before=before)
    if interior(kt, product):
        dead.append(kt)
    source = kt.args[0]
    perm[-2], perm[-1] = perm[-1], perm[-2]
    if perm == list(range(r)):
        return source
    return call(gm.graph, aten.permute.default, (source, perm), before=before)
