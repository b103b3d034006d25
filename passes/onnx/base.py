"""What every ONNX pass shares: level/budget fields, opset upgrades, node helpers.

A pass subclasses `OnnxPass`, sets `name`, `level`, `min_opset` and
implements `rewrite(model, log)` (which may return extra statistics). `run` first makes sure the model's opset
is at least `min_opset`, upgrading it with `onnx.version_converter` when
needed; a model that cannot be upgraded is returned unchanged and the pass
records why it was skipped (`stats["skipped"]`, shown in the report).
"""
from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from graphopt.onnx.ir import STANDARD_DOMAINS, OnnxModel
from graphopt.engine.pass_manager import Pass, PassResult, RewriteLog
from graphopt.engine.rules import Reason, Reject


class OnnxPass(Pass):
    name = "onnx_pass"
    min_opset = 1

    def run(self, model: OnnxModel) -> PassResult:
        log = RewriteLog()
        if model.opset < self.min_opset:
            upgraded, reason = upgrade_opset(model, self.min_opset)
            if upgraded is None:
                log.rejected("opset upgrade", f"opset {model.opset}", Reject(Reason.OPSET, reason))
                return log.result(model, skipped=f"{self.name}: {reason}")
            model = upgraded
            log.matched(f"opset upgrade to {self.min_opset}")
        extra = self.rewrite(model, log) or {}
        return log.result(model, **extra)

    def rewrite(self, model: OnnxModel, log: RewriteLog) -> dict[str, Any] | None:
        """Rewrite `model` in place, logging matches and rejections; may return extra stats."""
        raise NotImplementedError


def upgrade_opset(model: OnnxModel, target: int) -> tuple[OnnxModel | None, str]:
    """The model converted to opset `target`, or (None, why not)."""
    try:
        converted = version_converter.convert_version(model.to_proto(), target)
        onnx.checker.check_model(converted)
    except Exception as exc:  # the converter raises RuntimeError/ValidationError/…
        text = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        return None, f"cannot upgrade opset {model.opset} → {target}: {text}"
    return OnnxModel.from_proto(converted), ""


def is_standard(node: gs.Node) -> bool:
    return (node.domain or "") in STANDARD_DOMAINS


def constant(tensor: Any) -> np.ndarray | None:
    """The value of `tensor` if it is an initializer or a `Constant` node's output, else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if isinstance(tensor, gs.Variable) and len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        return value.values if isinstance(value, gs.Constant) else None
    return None


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    for i, tensor in enumerate(node.inputs):
        if tensor is old:
            node.inputs[i] = new
