"""Calibration: run the graph on calibration batches and observe chosen activations.

`calibrate(gm, batches, watch)` interprets the graph node by node
(torch.fx.Interpreter) and hands the value of every watched node to its
callbacks (observers, SmoothQuant statistics). Inputs holding NaN/inf are
rejected (bad calibration data). Intermediates may hold them on purpose
(T5's relative-position buckets take log(0) = −inf and discard it with
`where`), so a non-finite intermediate is an error only when a watched value
holds one: then the message names the layer where NaN/inf first appeared on
its path, rather than leaving an unexplained scale of inf.

Calibration items are normalized by `as_inputs` (see config.py for the forms
accepted).
"""
from __future__ import annotations

import inspect
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx
import torch.fx._pytree as fx_pytree

from graphopt.errors import InputError
from graphopt.frontend.inputs import batch_as_inputs

Inputs = tuple[tuple, dict]
Callback = Callable[[torch.Tensor], None]


def positional_count(gm: fx.GraphModule) -> int:
    """How many positional arguments the captured model's forward() takes."""
    return _in_spec(gm).child(0).num_children


def as_inputs(gm: fx.GraphModule, item: Any) -> Inputs:
    """One calibration item as (args, kwargs) for the captured model."""
    return batch_as_inputs(item, positional_count(gm))


def run_batches(module: Callable, batches: Sequence[Inputs]) -> list[Any]:
    with torch.no_grad():
        return [module(*args, **kwargs) for args, kwargs in batches]


def layer_name(gm: fx.GraphModule, node: fx.Node) -> str:
    """A readable name for the layer a node belongs to: its module path (e.g. "encoder.layer.0.output.dense"),
    else the path of its weight, else the node's name."""
    stack = node.meta.get("nn_module_stack") or {}
    path = list(stack.values())[-1][0] if stack else ""
    if path:
        return path
    if len(node.args) > 1 and isinstance(node.args[1], fx.Node) and node.args[1].op == "get_attr":
        return str(node.args[1].target).removesuffix(".weight")
    return node.name


def calibrate(gm: fx.GraphModule, batches: Sequence[Inputs], watch: Mapping[str, list[Callback]],
              progress: bool = True, desc: str = "calibrating") -> None:
    """Run `gm` on each batch; call `watch[node.name]` callbacks with that node's value."""
    from tqdm.auto import tqdm
    interpreter = _Observing(gm, watch)
    for index, (args, kwargs) in enumerate(tqdm(batches, desc=desc, unit="batch", leave=False,
                                                disable=None if progress else True)):
        interpreter.batch = index
        with torch.no_grad():
            interpreter.run(*flat_inputs(gm, args, kwargs))


def flat_inputs(gm: fx.GraphModule, args: tuple, kwargs: dict) -> list[Any]:
    """The graph's placeholder values for a call `gm(*args, **kwargs)`."""
    spec = _in_spec(gm)
    try:
        bound = inspect.signature(gm.forward).bind(*args, **kwargs)
    except TypeError as exc:
        raise InputError(f"a calibration batch does not fit the model's inputs: {exc}") from exc
    bound.apply_defaults()
    values = list(bound.arguments.values())
    n = positional_count(gm)
    keys = spec.child(1).context
    return fx_pytree.tree_flatten_spec((list(values[:n]), dict(zip(keys, values[n:]))), spec)


def _in_spec(gm: fx.GraphModule) -> Any:
    return gm.graph._codegen.pytree_info.in_spec


class _Observing(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: Mapping[str, list[Callback]]) -> None:
        super().__init__(gm)
        self.watch = watch
        self.batch = 0
        self.origin: dict[fx.Node, fx.Node] = {}   # node holding NaN/inf -> where they first appeared on its path

    def run(self, *args: Any, **kwargs: Any) -> Any:
        self.origin = {}
        return super().run(*args, **kwargs)

    def run_node(self, node: fx.Node) -> Any:
        value = super().run_node(node)
        if isinstance(value, torch.Tensor) and value.is_floating_point() and not torch.isfinite(value).all():
            if node.op == "placeholder":
                raise InputError(f"calibration batch {self.batch} holds NaN/inf in input {node.name!r}; "
                                 "clean the calibration data")
            self.origin[node] = next((self.origin[a] for a in node.all_input_nodes if a in self.origin), node)
            if self.watch.get(node.name):
                first = self.origin[node]
                raise InputError(
                    f"calibration batch {self.batch}: the value observed at node {node.name} holds NaN/inf, "
                    f"which first appear in layer {layer_name(self.module, first)!r} (node {first.name}) on "
                    "finite inputs: the model overflows there on this data; check the calibration data's scale")
        for callback in self.watch.get(node.name, ()):
            callback(value)
        return value
