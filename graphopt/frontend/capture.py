"""Capture: nn.Module -> fx.GraphModule of ATen ops, via torch.export (non-strict).

The model is deep-copied and put in eval mode first, so the caller's module,
its parameters, buffers and training flag are never touched. Dimension 0 of
every tensor input is marked `Dim.AUTO`, and dimension 1 of integer inputs
of rank ≥ 2 too (token ids and masks: the sequence length): export keeps a
dimension symbolic when the model allows (the optimized module then accepts
other batch sizes and sequence lengths) and specialises it otherwise,
without failing. If export fails with the sequence dimension marked, it is
retried with the batch dimension alone.

`Captured.other_shape` is the example resized to a second value of every
dimension the graph kept symbolic (batch B → B+1, sequence S → S+1, within
the range export inferred), checked to run on the captured graph; the
verification inputs include it, so a rewrite that bakes the example's batch
into the graph fails verification instead of failing the user's next call.
"""
from __future__ import annotations

import copy
import inspect
import types
import warnings
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree
import torch.utils._pytree as pytree
from torch.export import Dim

from ..engine import ir
from ..errors import CaptureError, InputError, first_line
from .inputs import resize

_HINTS = (
    (("data-dependent", "guardonunbacked", "could not guard", "could not extract specialized integer"),
     "the model branches on tensor values (data-dependent control flow); rewrite the branch with "
     "torch.where / torch.cond, or move it out of forward()"),
    (("dynamiccache", "cache", "pytree", "not a tensor", "unsupported output", "treespec"),
     "the model returns a value torch.export cannot flatten; for Hugging Face models pass "
     "use_cache=False (a DynamicCache is not a tensor) and return_dict works either way"),
    (("unsupported", "not supported"),
     "an operation in forward() is not supported by torch.export; see the message above for which"),
)


@dataclass
class Captured:
    module: fx.GraphModule
    original: torch.nn.Module   # the eval-mode deep copy that was exported (a reference to compare with)
    dynamic_batch: bool
    notes: list[str]
    other_shape: tuple[tuple, dict] | None = None   # the example at a second size of each symbolic dimension


def capture(model: torch.nn.Module, args: tuple, kwargs: dict | None = None) -> Captured:
    """Export a deep copy of `model` in eval mode on the example (args, kwargs)."""
    if not isinstance(model, torch.nn.Module):
        raise InputError(f"graphopt optimizes torch.nn.Module objects, got {type(model).__name__}")
    if not isinstance(args, tuple):
        raise InputError(f"example_inputs must be a tuple of positional arguments, got {type(args).__name__}; "
                         "wrap a single tensor as (x,)")
    kwargs = dict(kwargs or {})
    if not any(isinstance(leaf, torch.Tensor) for leaf in pytree.tree_leaves((args, kwargs))):
        raise InputError("example inputs hold no tensor: pass the tensors the model's forward() takes")
    work = copy.deepcopy(model).eval()
    _name_var_keywords(work, kwargs)
    notes: list[str] = []
    with_sequence = _dynamic_dims(work, args, kwargs, True)    # also checks the inputs fit forward()
    try:  # a model that does not run on its inputs is the caller's problem, not an export failure
        with torch.no_grad():
            work(*args, **kwargs)
    except Exception as exc:
        raise InputError(f"the model fails on the example inputs: {_first_line(exc)}") from exc
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            exported = torch.export.export(work, args, kwargs, dynamic_shapes=with_sequence, strict=False)
        except Exception as first:  # torch raises many types; all become CaptureError
            batch_only = _dynamic_dims(work, args, kwargs, False)
            if batch_only == with_sequence:     # no sequence dimension was marked: nothing else to try
                raise CaptureError(_first_line(first), _hint(first)) from first
            try:                                # the sequence dimension may be what fails: the batch alone
                exported = torch.export.export(work, args, kwargs, dynamic_shapes=batch_only, strict=False)
            except Exception as exc:
                raise CaptureError(_first_line(exc), _hint(exc)) from exc
    unlifted = exported.module()
    module = fx.GraphModule(unlifted, unlifted.graph)   # a plain GraphModule: train()/eval() work
    module.meta.update(getattr(unlifted, "meta", {}))
    dynamic = _has_symbolic_batch(module)
    if not dynamic:
        notes.append("batch dimension specialised: the optimized module accepts only the example batch size")
    other = _other_shape(module.eval(), args, kwargs, notes)
    return Captured(module, work, dynamic, notes, other)


def _name_var_keywords(model: torch.nn.Module, kwargs: dict) -> None:
    """Give `model` (the private copy) a forward() whose signature names the example's keyword inputs that
    would land in its **kwargs (Hugging Face's `use_cache=False`, …) as keyword-only parameters.

    torch.export 2.13 checks `dynamic_shapes` against forward()'s bound arguments ({…, "kwargs": {…}}) but
    later matches it against the call's own keywords ({…, "use_cache": …}) and fails ("Must provide a
    tree_name …"); with the keywords named, both views agree. The call itself is unchanged."""
    signature = inspect.signature(model.forward)
    params = list(signature.parameters.values())
    if not any(p.kind is p.VAR_KEYWORD for p in params):
        return
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY) for k in kwargs if k not in signature.parameters]
    if not extra:
        return
    forward = type(model).forward

    def named(self: torch.nn.Module, *args: object, **kw: object) -> object:
        return forward(self, *args, **kw)

    self_param = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
    named.__signature__ = signature.replace(   # type: ignore[attr-defined]
        parameters=[self_param] + [p for p in params if p.kind is not p.VAR_KEYWORD] + extra)
    model.forward = types.MethodType(named, model)


def _dynamic_dims(model: torch.nn.Module, args: tuple, kwargs: dict, sequence: bool) -> dict[str, object]:
    """`Dim.AUTO` on dimension 0 of every tensor input (and, with `sequence`, on dimension 1 of integer
    inputs of rank ≥ 2), keyed by forward()'s parameter names."""
    def spec(leaf: object) -> object:
        if not isinstance(leaf, torch.Tensor) or leaf.dim() == 0:
            return None
        if sequence and leaf.dim() >= 2 and not leaf.is_floating_point() and not leaf.is_complex():
            return {0: Dim.AUTO, 1: Dim.AUTO}
        return {0: Dim.AUTO}
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise InputError(f"the example inputs do not fit {type(model).__name__}.forward: {exc}") from exc
    return {name: pytree.tree_map(spec, value) for name, value in bound.arguments.items()}


def _other_shape(module: fx.GraphModule, args: tuple, kwargs: dict, notes: list[str]) -> tuple[tuple, dict] | None:
    """The example resized so that each symbol of the placeholders' shapes takes a second value
    (see `_second_value`); None when no dimension is symbolic or the graph rejects the sizes."""
    mode = ir.fake_mode(module.graph)
    if mode is None or mode.shape_env is None:
        return None
    env = mode.shape_env
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    shapes = [tuple(v.shape) if isinstance(v := n.meta.get("val"), torch.Tensor) else () for n in placeholders]
    symbols = {sym for shape in shapes for d in shape if not isinstance(d, int) for sym in d.node.expr.free_symbols}
    example = {sym: ir.shape_hint(env, sym) for sym in symbols}
    values = {sym: _second_value(value, env.var_to_range.get(sym)) or value for sym, value in example.items()}
    if values == example:
        return None
    leaves = fx_pytree.tree_flatten_spec((args, kwargs), module._in_spec)
    sizes = {id(leaf): [d if isinstance(d, int) else int(d.node.expr.xreplace(values)) for d in shape]
             for leaf, shape in zip(leaves, shapes) if isinstance(leaf, torch.Tensor)}
    other = pytree.tree_map(lambda leaf: resize(leaf, sizes[id(leaf)]) if id(leaf) in sizes else leaf, (args, kwargs))
    try:
        with torch.no_grad():
            module(*other[0], **other[1])
    except Exception as exc:   # a constraint export kept as a run-time check (e.g. an even length)
        notes.append(f"verification runs at the example's shapes only: the graph rejects a second size "
                     f"({_first_line(exc)})")
        return None
    resized = sorted({str(tuple(a.shape)) for a, b in zip(pytree.tree_leaves(other), pytree.tree_leaves((args, kwargs)))
                      if isinstance(a, torch.Tensor) and a.shape != b.shape})
    notes.append(f"verification also runs at a second size of each dynamic dimension: {', '.join(resized)}")
    return other


def _second_value(value: int, limits: object) -> int | None:
    """value + 1 where the symbol's range allows, else value − 1; never below 2 (export specialises 0 and 1)."""
    lower, upper = getattr(limits, "lower", 2), getattr(limits, "upper", value + 1)   # sympy numbers, maybe ±∞
    for candidate in (value + 1, value - 1):
        if max(2, lower) <= candidate <= upper:
            return candidate
    return None


def _has_symbolic_batch(module: fx.GraphModule) -> bool:
    for node in module.graph.nodes:
        value = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(value, torch.Tensor) and value.dim() >= 1 and ir.is_symbolic(value.shape[0]):
            return True
    return False


def _first_line(exc: Exception) -> str:
    """What an error message quotes of torch's exception: its type and first three lines (torch.export
    spreads one message over several)."""
    return f"{type(exc).__name__}: {first_line(exc, 600, lines=3)}"


def _hint(exc: Exception) -> str:
    text = f"{type(exc).__name__} {exc}".lower()
    for keys, hint in _HINTS:
        if any(k in text for k in keys):
            return hint
    return "run torch.export.export(model, args, strict=False) directly to see the full trace"
