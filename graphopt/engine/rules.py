"""Rewrite rules: why a candidate did not match, as a code a program can test.

Every rewrite in graphopt reports each candidate it looks at: it matched, or
it was rejected with a `Reject` — a `Reason` code (stable, for tests, tools
and the report's counts) and a message (for a person: which value, which
shape). `RewriteLog` collects both into a pass's statistics:

    stats["matches"]   {pattern: count}
    stats["rejected"]  ["pattern at node: message", …]     (shown in the report)
    stats["reasons"]   {Reason: count}                      (asserted by tests)

The FX rules themselves (pattern, check, rewrite) and the `RuleSet` pass
that applies them live in `graphopt.passes.rules`; ONNX rewrites are
onnxscript's rules run by `graphopt.passes.onnx.onnxscript_rules`.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Reason(str, Enum):
    """Why a candidate was not rewritten (or a pass's result not kept)."""
    OTHER_USERS = "other_users"            # an intermediate value is read outside the pattern
    MUTATED = "mutated"                    # a value is modified in place
    NOT_CONSTANT = "not_constant"          # a weight, bias, statistic or scale is computed at run time
    TRAINING_MODE = "training_mode"        # BatchNorm / Dropout in training mode
    WRONG_AXIS = "wrong_axis"              # reduces, normalizes or scales another axis than the rewrite needs
    SHAPE_MISMATCH = "shape_mismatch"      # shapes, ranks or broadcasts do not fit the fused op
    DTYPE_MISMATCH = "dtype_mismatch"      # dtypes differ where the fused op needs one
    UNKNOWN_SHAPE = "unknown_shape"        # no static shape (or rank) where the rewrite needs one
    NOT_THE_FORMULA = "not_the_formula"    # the expression is close to the pattern but computes something else
    UNSUPPORTED_FORM = "unsupported_form"  # a variant the rewrite does not cover (keyword args, groups, …)
    WRONG_PRODUCER = "wrong_producer"      # the input comes from another op than the pattern's
    NO_PARTNER = "no_partner"              # nothing to combine it with (no compatible sibling)
    CUSTOM_DOMAIN = "custom_domain"        # an ONNX node outside the standard domains
    SIZE_LIMIT = "size_limit"              # the result would grow the model past the pass's guard
    NOT_A_TENSOR = "not_a_tensor"          # a folded value is not a tensor
    OPSET = "opset"                        # the model's opset cannot be upgraded to what the pass needs
    NOT_ELIGIBLE = "not_eligible"          # a layer the int8 / pruning selection leaves alone (message says why)
    EXCLUDED = "excluded"                  # a layer the user's options keep as it is (quantize_options['exclude'])
    ACCURACY = "accuracy"                  # kept float: the accuracy budget needs it
    SLOWER = "slower"                      # kept as it was: the rewrite is measurably slower on this target
    NO_GAIN = "no_gain"                    # the rewrite would not improve what it is for
    ALREADY_DONE = "already_done"          # the graph already has the rewrite's form
    DEVICE = "device"                      # the rewrite pays only on another device (a CUDA kernel, a CPU graph)
    READS_PADDING = "reads_padding"        # the outputs read padded token rows (skipping padding would change them)
    OTHER = "other"                        # a rejection given as prose only (its message says why)
    # why the pass manager did not keep a pass's result (PassRecord.code)
    BUDGET_EXCEEDED = "budget_exceeded"    # the pass's error is outside its declared budget
    PASS_RAISED = "pass_raised"            # the pass raised (a reproducer was written)
    RESULT_SLOWER = "result_slower"        # the whole optimized graph was slower than the captured one


@dataclass(frozen=True)
class Reject:
    """A candidate that was not rewritten: the code, and what a person needs to know."""
    code: Reason
    message: str

    def __str__(self) -> str:
        return self.message
