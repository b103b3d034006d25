"""onnxscript's rewrite rules and cleanups, run as graphopt passes (verified, rolled back, reported).

onnxscript (a dependency through torch.onnx) ships tested rules for the
standard ONNX peepholes; graphopt runs them rather than keeping its own:

    onnx_eliminate_identity          Identity(x) ⇒ x  (onnx_ir's IdentityEliminationPass);
                                     Dropout(x) ⇒ x with ratio 0 or training_mode False (the default
                                     training_mode: graphopt's own `dropout.EliminateInferenceDropout`);
                                     Cast(x, to=dtype(x)) ⇒ x
    onnx_collapse_transpose_reshape  Transpose(Transpose(x, p₁), p₂) ⇒ Transpose(x, p₁∘p₂) (x when the identity);
                                     Reshape(Reshape(x, s₁), s₂) ⇒ Reshape(x, s₂)
    onnx_fold_conv_bn                BatchNormalization after Conv, ConvTranspose or Gemm folded into its
                                     weight and bias: W' = W·s, b' = (b − μ)·s + β, s = γ/√(σ² + ε)
    onnx_matmul_add_to_gemm          Add(MatMul(A, B), C) ⇒ Gemm(A, B, C)   (2-D A)
    onnx_dead_nodes                  nodes and initializers no graph output depends on (inputs are kept)

Each pass converts the graph to onnx_ir (onnxscript's IR), applies its rules
one by one (so the report counts matches per rule, by the rule's name) and
converts back. A rule that does not apply simply does not match: onnxscript
reports no per-candidate reasons, so these passes log matches only. A rule
that raises (onnxscript 0.7 matches Add(MatMul, MatMul) with both products in
the pattern, then refuses to remove the one the new Gemm reads) leaves the
graph as it was before that rule, logged as UNSUPPORTED_FORM.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import onnx_ir as ir
import onnx_ir.passes.common as ir_passes
from onnxscript import rewriter
from onnxscript.rewriter.rules import common

from graphopt.errors import first_line
from graphopt.onnx.ir import OnnxModel
from graphopt.engine.pass_manager import PassResult, RewriteLog
from graphopt.engine.rules import Reason, Reject

from .base import OnnxPass, upgrade_opset


class OnnxscriptRules(OnnxPass):
    """onnxscript rewrite rules (and onnx_ir passes) applied to the model, counted per rule."""

    def __init__(self, name: str, rules: Sequence[Any] = (),
                 ir_passes: Sequence[tuple[str, Callable[[], Any]]] = (), min_opset: int = 1) -> None:
        self.name, self.rules, self.ir_passes, self.min_opset = name, list(rules), list(ir_passes), min_opset

    def run(self, model: OnnxModel) -> PassResult:
        log = RewriteLog()
        if model.opset < self.min_opset:
            upgraded, reason = upgrade_opset(model, self.min_opset)
            if upgraded is None:
                return super().run(model)     # logs and reports the skip
            model = upgraded
            log.matched(f"opset upgrade to {self.min_opset}")
        ir_model = model.to_ir()
        for rule in self.rules:
            name = rule.name or type(rule).__name__
            before = ir_model.clone()      # shares the weights
            try:
                count = rewriter.RewriteRuleSet([rule]).apply_to_model(ir_model)
            except ValueError as exc:   # onnxscript 0.7 can match a node whose output another match still reads
                ir_model = before       # (Add(MatMul, MatMul)) and then refuses to remove it
                log.rejected(name, "the graph", Reject(Reason.UNSUPPORTED_FORM,
                                                        f"onnxscript's rule raised, graph left as it was: {first_line(exc)}"))
                continue
            if count:
                log.matched(name, count)
        for label, make in self.ir_passes:      # after the rules: they write Identity for what they remove
            before = _node_count(ir_model)
            make()(ir_model)
            if _node_count(ir_model) < before:
                log.matched(label, before - _node_count(ir_model))
        if not log.modified:
            return log.result(model)
        ir_passes.RemoveUnusedNodesPass()(ir_model)
        return log.result(OnnxModel.from_ir(ir_model))


def _node_count(model: ir.Model) -> int:
    return sum(1 for _ in model.graph)


class DeadNodeElimination(OnnxPass):
    """Nodes no output depends on, and the initializers nothing reads (onnx_ir's RemoveUnusedNodesPass)."""
    name = "onnx_dead_nodes"

    def run(self, model: OnnxModel) -> PassResult:
        log = RewriteLog()
        ir_model = model.to_ir()
        nodes, constants = _node_count(ir_model), len(ir_model.graph.initializers)
        ir_passes.RemoveUnusedNodesPass()(ir_model)
        if _node_count(ir_model) < nodes:
            log.matched("dead node", nodes - _node_count(ir_model))
        if len(ir_model.graph.initializers) < constants:
            log.matched("unused initializer", constants - len(ir_model.graph.initializers))
        if not log.modified:
            return log.result(model)
        return log.result(OnnxModel.from_ir(ir_model))


def eliminate_identity() -> OnnxscriptRules:
    return OnnxscriptRules("onnx_eliminate_identity",
                           [common.dropout_inference_rule, common.dropout_zero_rule, common.no_op_cast_rule],
                           [("Identity", ir_passes.IdentityEliminationPass)])


def collapse_transpose_reshape() -> OnnxscriptRules:
    return OnnxscriptRules("onnx_collapse_transpose_reshape",
                           [common.transpose_transpose_rule, common.no_op_transpose_rule, common.reshape_reshape_rule],
                           [("Identity", ir_passes.IdentityEliminationPass)])


def fold_conv_batchnorm() -> OnnxscriptRules:
    return OnnxscriptRules("onnx_fold_conv_bn", [common.fuse_batchnorm_into_conv_rule,
                                                 common.fuse_batchnorm_into_conv_transpose_rule,
                                                 common.fuse_batchnorm_into_gemm_rule])


def matmul_add_to_gemm() -> OnnxscriptRules:
    return OnnxscriptRules("onnx_matmul_add_to_gemm", [common.matmul_add_to_gemm_rule], min_opset=7)
