"""Route 2 of graphopt with torch.compile: `GraphoptBackend`, a dynamo backend that lowers each subgraph
dynamo hands it to ATen and runs graphopt's passes on it (see __init__.py for the options and limits)."""
from __future__ import annotations

import functools
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from ..api import OptimizedModule
from ..engine import ir
from ..engine.config import parse_options
from ..engine.pipeline import build_passes
from ..errors import GraphoptError, OptionError
from ..report import Report
from .runner import InductorRunner


UNSUPPORTED_UNDER_BACKEND = {
    "calibration_data": "calibration batches are model inputs, but a dynamo subgraph's inputs are whatever "
                        "dynamo cut at a graph break",
    "example_kwargs": "dynamo supplies the inputs",
}


@dataclass
class Subgraph:
    """One subgraph dynamo handed to the backend, and what became of it."""
    index: int
    nodes: int
    module: Any = None                 # the graphopt OptimizedModule, or None when inductor ran alone
    skipped: str | None = None         # why graphopt did not optimize it
    notes: list[str] = field(default_factory=list)

    @property
    def report(self) -> Report | None:
        return self.module.report if self.module is not None and self.module.captured else None


@dataclass
class _Plan:
    """How dynamo's flat argument list maps onto the lowered module's inputs."""
    inputs: list[int]                               # positions of user tensors
    state: dict[int, torch.Tensor]                  # position -> parameter/buffer value
    sizes: dict[int, tuple[int, int]]               # position of a SymInt -> (input position, dim)
    numbers: dict[int, float | int] = field(default_factory=dict)   # position -> value of a Python number


class GraphoptBackend:
    """A dynamo backend: graphopt's passes on each captured subgraph, then inductor.

        backend = GraphoptBackend({"level": "O2"})
        compiled = torch.compile(model, backend=backend)
        compiled(x); backend.reports          # one Report per subgraph
    """

    def __init__(self, options: Mapping[str, Any] | None = None,
                 subgraphs: list[Subgraph] | None = None) -> None:
        options = dict(options or {})
        for name, why in UNSUPPORTED_UNDER_BACKEND.items():
            if options.get(name) is not None:
                raise OptionError(f"{name}= does not work under torch.compile(backend='graphopt'): {why}; "
                                  "use graphopt.optimize(model, ..., backend='inductor') instead")
        options.setdefault("backend", "inductor")
        options.setdefault("progress", False)
        if options["backend"] not in ("inductor", "eager"):
            raise OptionError(f"backend={options['backend']!r}: the graphopt dynamo backend hands its graph "
                              "to 'inductor' (default) or runs it 'eager'")
        self._options = parse_options(**options)
        build_passes(self._options)   # validates the pass options now, not at the first call
        self.subgraphs: list[Subgraph] = subgraphs if subgraphs is not None else []

    @property
    def reports(self) -> list[Report]:
        """The reports of the subgraphs optimized so far (each after its first call)."""
        return [s.report for s in self.subgraphs if s.report is not None]

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Any]:
        record = Subgraph(len(self.subgraphs), sum(n.op == "call_function" or n.op == "call_method"
                                                    for n in gm.graph.nodes))
        self.subgraphs.append(record)
        plan = _plan(gm, example_inputs)
        if isinstance(plan, str):
            record.skipped = plan
            return _inductor_alone(gm, example_inputs, self._options.backend)
        record.module = OptimizedModule(_freeze(gm, plan), self._options)
        if plan.numbers:
            record.notes.append("optimized for " + ", ".join(f"{_placeholders(gm)[i].name} = {value!r}"
                                                             for i, value in plan.numbers.items()))
        return self._runner(record, plan, gm)

    def _runner(self, record: Subgraph, plan: _Plan, gm: fx.GraphModule) -> Callable[..., Any]:
        eager = self._options.backend == "eager"
        alone = functools.cache(lambda: gm if eager else InductorRunner(gm, dynamic_batch=False))

        def run(*args: Any) -> Any:
            user = [args[i] for i in plan.inputs]
            with torch.no_grad():
                if record.module is None or any(args[i].item() != value for i, value in plan.numbers.items()):
                    return alone()(*args)     # graphopt could not take it, or a number it was optimized for changed
                if not record.module.captured:
                    start = time.perf_counter()
                    try:
                        record.module._optimize(tuple(user), {})
                    except GraphoptError as exc:   # e.g. export fails on this subgraph: inductor alone
                        record.skipped, record.module = f"{type(exc).__name__}: {exc}", None
                        warnings.warn(f"graphopt: subgraph {record.index} runs without graphopt: {exc}")
                        return alone()(*args)
                    record.notes.append(f"optimized on the first call in {time.perf_counter() - start:.1f} s")
                return record.module(*user)
        return run


def _placeholders(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "placeholder"]


def _plan(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> _Plan | str:
    """Classify dynamo's placeholders, or say why graphopt cannot take this subgraph."""
    placeholders = _placeholders(gm)
    plan = _Plan([], {}, {})
    symbols: list[tuple[int, fx.Node]] = []
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        fake = node.meta.get("example_value")
        if isinstance(value, torch.SymInt) or isinstance(fake, torch.SymInt):
            symbols.append((i, node))
        elif not isinstance(value, torch.Tensor):
            return f"input {node.name} is a {type(value).__name__}, not a tensor"
        elif _is_python_number(node, value):
            plan.numbers[i] = value.item()
        elif _is_state(node, value):
            plan.state[i] = value.detach()
        else:
            plan.inputs.append(i)
            for dim, size in enumerate(getattr(fake, "shape", ())):
                if dim > 0 and isinstance(size, torch.SymInt):
                    return (f"dimension {dim} of input {node.name} is dynamic ({size}); graphopt captures "
                            "with a dynamic batch dimension (0) only")
    for i, node in symbols:
        where = _find_size(node.meta.get("example_value"), placeholders, plan.inputs)
        if where is None:
            return f"the size {node.name} is not dimension 0 of an input of this subgraph"
        plan.sizes[i] = where
    return plan


def _is_python_number(node: fx.Node, value: torch.Tensor) -> bool:
    """A Python float or int that dynamo passes as a 0-d tensor and reads back with `.item()`: it does so once
    the number changed between calls of the same code (automatic dynamic), e.g. an attention `scale` attribute
    that differs between two models of one class. torch.export cannot capture a graph whose values depend
    on `.item()`, so graphopt optimizes the subgraph for this call's value (`_freeze`) and runs the others
    without graphopt."""
    grapharg = node.meta.get("grapharg")
    return bool(getattr(grapharg, "pass_arg_as_tensor", False)) and value.dim() == 0 and \
        all(_reads_number(user, node) for user in node.users)


def _reads_number(node: fx.Node, number: fx.Node) -> bool:
    """`node` is `number.item()`."""
    if node.op == "call_method":
        return node.target == "item" and node.args[0] is number
    return node.op == "call_function" and node.target in (torch.ops.aten.item.default,
                                                          torch.ops.aten._local_scalar_dense.default)


def _is_state(node: fx.Node, value: torch.Tensor) -> bool:
    """A parameter or buffer of the compiled module (dynamo lifts them as placeholders)."""
    if isinstance(value, torch.nn.Parameter):
        return True
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    from torch._dynamo.source import ParamBufferSource, UnspecializedParamBufferSource
    if isinstance(source, (ParamBufferSource, UnspecializedParamBufferSource)):
        return True
    return getattr(getattr(source, "base", None), "member", None) in ("_parameters", "_buffers")


def _find_size(symbol: Any, placeholders: list[fx.Node], inputs: list[int]) -> tuple[int, int] | None:
    if not isinstance(symbol, torch.SymInt):
        return None
    for i in inputs:
        shape = getattr(placeholders[i].meta.get("example_value"), "shape", ())
        if shape and isinstance(shape[0], torch.SymInt) and shape[0].node.expr == symbol.node.expr:
            return i, 0
    return None


def _freeze(gm: fx.GraphModule, plan: _Plan) -> fx.GraphModule:
    """Dynamo's subgraph with parameters and buffers as buffers, sizes read from the inputs, and Python numbers
    passed as tensors replaced by their values."""
    placeholders = _placeholders(gm)
    numbers = {placeholders[i]: value for i, value in plan.numbers.items()}
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for i in plan.inputs:
        env[placeholders[i]] = graph.placeholder(placeholders[i].name)
    attrs: dict[str, Any] = {}
    for i, value in plan.state.items():
        name = f"state_{placeholders[i].name}"
        attrs[name] = value
        env[placeholders[i]] = graph.get_attr(name)
    for i, (source, dim) in plan.sizes.items():
        env[placeholders[i]] = graph.call_function(torch.ops.aten.sym_size.int, (env[placeholders[source]], dim))
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.args and node.args[0] in numbers and _reads_number(node, node.args[0]):
            env[node] = numbers[node.args[0]]
            continue
        if node.op in ("get_attr", "call_module"):
            attrs[node.target] = ir.attr_path(gm, node.target)
        env[node] = graph.node_copy(node, lambda n: env[n])
    module = fx.GraphModule(attrs, graph, class_name="DynamoSubgraph")
    for i in plan.state:   # buffers, so that capture's deep copy and export see module state
        name = f"state_{placeholders[i].name}"
        value = getattr(module, name)
        delattr(module, name)
        module.register_buffer(name, value)
    return module.eval()


def _inductor_alone(gm: fx.GraphModule, example_inputs: Sequence[Any], backend: str) -> Callable[..., Any]:
    if backend == "eager":
        return gm.forward
    from torch._inductor.compile_fx import compile_fx
    return compile_fx(gm, list(example_inputs))
