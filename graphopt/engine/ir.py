"""Small helpers over the captured IR (a `torch.fx.GraphModule` of ATen ops).

Every pass uses these instead of poking at fx directly, so that matching,
rewiring, constants and metadata work the same way everywhere:

- matching: `is_op`, `find_nodes`, `single_user`, `const_value`
- rewriting: `replace_all_uses`, `erase_unused`, `add_constant`
- housekeeping: `refresh_meta` (shape/dtype after a rewrite), `lint`,
  `drop_unused_attributes`, `count_nodes`, `live_tensors`, `param_count`,
  `param_bytes`
"""
from __future__ import annotations

import operator
from typing import Any, Iterable, Iterator

import torch
import torch.fx as fx
from torch._dispatch.python import enable_python_dispatcher
from torch._guards import detect_fake_mode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp

aten = torch.ops.aten

#: call_module targets that torch.export inserts and that are not computation.
GUARD_MODULES = ("_guards_fn",)


def overload_packet(target: object) -> object:
    """`aten.add.Tensor` -> `aten.add`; other targets unchanged."""
    return getattr(target, "overloadpacket", target)


def is_op(node: fx.Node, *targets: object) -> bool:
    """True if `node` calls one of `targets` (an overload such as `aten.add.Tensor`
    or a whole packet such as `aten.add`)."""
    if node.op != "call_function":
        return False
    return node.target in targets or overload_packet(node.target) in targets


def find_nodes(gm: fx.GraphModule, *targets: object) -> list[fx.Node]:
    """All call_function nodes calling one of `targets`, in graph order."""
    return [n for n in gm.graph.nodes if is_op(n, *targets)]


def compute_nodes(gm: fx.GraphModule) -> Iterator[fx.Node]:
    """Nodes that compute something (not inputs, outputs, attributes or export guards)."""
    for node in gm.graph.nodes:
        if node.op == "call_function" or node.op == "call_method":
            yield node
        elif node.op == "call_module" and node.target not in GUARD_MODULES:
            yield node


def single_user(node: fx.Node) -> bool:
    return len(node.users) == 1


def only_user(node: fx.Node) -> fx.Node | None:
    """The one node that uses `node`, or None if it has zero or several users."""
    return next(iter(node.users)) if len(node.users) == 1 else None


def val(node: object) -> object:
    """The fake value torch.export recorded for `node` (None for literals/unknown)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def shape(node: object) -> tuple | None:
    value = val(node)
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def dtype(node: object) -> torch.dtype | None:
    value = val(node)
    return value.dtype if isinstance(value, torch.Tensor) else None


def has_static_shape(node: object) -> bool:
    s = shape(node)
    return s is not None and all(isinstance(d, int) for d in s)


def is_symbolic(size: object) -> bool:
    """Whether a size is symbolic: a SymInt over free symbols. A graph exported from a static one (a dynamo
    subgraph) carries SymInts specialised to constants, which are sizes like ints."""
    return isinstance(size, torch.SymInt) and bool(size.node.expr.free_symbols)


def shape_hint(env: Any, expr: Any, fallback: int = 1) -> int:
    """The example's value of a shape expression, without adding a guard.

    ShapeEnv.optimization_hint (torch >= 2.13; `size_hint` before it, deprecated there): the one place graphopt
    reads a symbol's example value, instead of the environment's private `var_to_val` tables."""
    if hasattr(env, "optimization_hint"):
        return int(env.optimization_hint(expr, fallback=fallback))
    hint = env.size_hint(expr, allow_none=True)
    return fallback if hint is None else int(hint)


def attr_path(root: object, target: str) -> Any:
    """The object at the dotted path `target` under `root` ("layers.0.weight"): what a get_attr node reads.
    Raises AttributeError when a step of the path is missing."""
    return operator.attrgetter(target)(root)


def get_attr_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor:
    """The tensor a get_attr node refers to."""
    value = attr_path(gm, str(node.target))
    assert isinstance(value, torch.Tensor), f"{node.target} is not a tensor"
    return value


def const_value(gm: fx.GraphModule, arg: object) -> torch.Tensor | float | int | bool | None:
    """The constant behind `arg`: a Python scalar, or the tensor of a get_attr node.
    None when `arg` is computed at run time."""
    if isinstance(arg, (int, float, bool)):
        return arg
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        return get_attr_value(gm, arg)
    return None


def replace_all_uses(old: fx.Node, new: fx.Node) -> None:
    """Point every user of `old` at `new`, keeping `new`'s metadata if it has none."""
    if "val" not in new.meta and "val" in old.meta:
        new.meta["val"] = old.meta["val"]
    old.replace_all_uses_with(new)


def erase_unused(graph: fx.Graph, nodes: Iterable[fx.Node]) -> None:
    """Erase the given nodes that are no longer used, users before producers."""
    pending = list(nodes)
    changed = True
    while changed:
        changed = False
        for node in list(pending):
            if not node.users:
                graph.erase_node(node)
                pending.remove(node)
                changed = True


def unique_attr_name(gm: fx.GraphModule, hint: str) -> str:
    """A free attribute path for `hint`. A dotted hint (`stage1.conv1.weight_bn`) stays under its owner module
    when that module exists, so a constant derived from a layer's weight keeps the layer's module path (pruning
    patterns, per-layer labels and state_dict keys still name it); any other hint becomes one top-level name."""
    owner, _, leaf = hint.rpartition(".")
    if not owner or not _is_submodule(gm, owner):
        owner, leaf = "", hint
    module = gm.get_submodule(owner) if owner else gm
    base = "".join(c if c.isalnum() or c == "_" else "_" for c in leaf) or "const"
    name, i = base, 0
    while hasattr(module, name):
        i += 1
        name = f"{base}_{i}"
    return f"{owner}.{name}" if owner else name


def _is_submodule(gm: fx.GraphModule, path: str) -> bool:
    try:
        return isinstance(gm.get_submodule(path), torch.nn.Module)
    except AttributeError:
        return False


def owned_name(weight: Any, leaf: str) -> str:
    """A hint for a constant derived from `weight`: `leaf` under the module owning it when `weight` is an
    attribute (`stage1.conv1.weight` → `stage1.conv1.<leaf>`), else `leaf` alone."""
    if isinstance(weight, fx.Node) and weight.op == "get_attr" and "." in str(weight.target):
        return f"{str(weight.target).rpartition('.')[0]}.{leaf}"
    return leaf


def add_constant(gm: fx.GraphModule, hint: str, value: torch.Tensor,
                 before: fx.Node | None = None, parameter: bool | None = None) -> fx.Node:
    """Register `value` on `gm` under a fresh name (see `unique_attr_name`) and return a get_attr node for it.

    Floating tensors become parameters (so they count as weights and can be
    fine-tuned) unless `parameter=False`; others become buffers.
    """
    name = unique_attr_name(gm, hint)
    owner, _, leaf = name.rpartition(".")
    module = gm.get_submodule(owner) if owner else gm
    value = value.detach().contiguous()
    as_parameter = value.is_floating_point() if parameter is None else parameter
    if as_parameter:
        module.register_parameter(leaf, torch.nn.Parameter(value, requires_grad=value.is_floating_point()))
    else:
        module.register_buffer(leaf, value)
    graph = gm.graph
    anchor = before if before is not None else _first_compute_node(graph)
    with graph.inserting_before(anchor):
        node = graph.get_attr(name)
    node.meta["val"] = _fake_like(graph, value)
    return node


def _first_compute_node(graph: fx.Graph) -> fx.Node:
    for node in graph.nodes:
        if node.op not in ("placeholder", "get_attr"):
            return node
    raise AssertionError("graph has no output node")


def _fake_like(graph: fx.Graph, value: torch.Tensor) -> object:
    mode = fake_mode(graph)
    return mode.from_tensor(value, static_shapes=True) if mode is not None else value


def fake_mode(graph: fx.Graph):  # -> FakeTensorMode | None
    return detect_fake_mode([n.meta.get("val") for n in graph.nodes if n.op == "placeholder"])


def refresh_meta(gm: fx.GraphModule) -> None:
    """Recompute every node's `meta["val"]` (shape, dtype) after a rewrite.

    Runs fake-tensor propagation with the capture's own fake mode, so symbolic
    dimensions such as a dynamic batch stay symbolic. It runs under the Python
    dispatcher, as torch.export's tracing does: without it, composite ops such
    as `aten.pad` reach C++ kernels that read concrete sizes, which specialises
    the batch and sequence symbols on the capture's (shared) shape environment
    to the example's values, and every shape a later pass reads from the
    metadata (the int8 rewrite's reshapes) then bakes in the example's batch.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    values = [n.meta.get("val") for n in placeholders]
    mode = detect_fake_mode(values)
    if mode is None or any(v is None for v in values):
        return
    with enable_python_dispatcher():
        FakeTensorProp(gm, mode).propagate_dont_convert_inputs(*values)


def drop_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete parameters and buffers no get_attr node refers to; returns how many."""
    used = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    dropped = 0
    for name, _ in list(gm.named_parameters(remove_duplicate=False)) + list(gm.named_buffers(remove_duplicate=False)):
        if name in used:
            continue
        owner_path, _, attr = name.rpartition(".")
        owner = gm.get_submodule(owner_path) if owner_path else gm
        if attr in owner._parameters:
            del owner._parameters[attr]
        elif attr in owner._buffers:
            del owner._buffers[attr]
        else:
            continue
        dropped += 1
    return dropped


def copy_sharing_tensors(gm: fx.GraphModule) -> fx.GraphModule:
    """A deep copy of `gm`'s graph and module tree whose parameters and buffers are `gm`'s own tensors (no
    weight copy). Safe for rewrites that make new tensors (add_constant) and never write into old ones."""
    import copy
    import warnings
    memo: dict[int, object] = {id(t): t for t in (*gm.parameters(), *gm.buffers())}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecation noise
        return copy.deepcopy(gm, memo)


def lint(gm: fx.GraphModule) -> None:
    """Check the graph is well formed and regenerate its code."""
    gm.graph.lint()
    gm.recompile()


def count_nodes(gm: fx.GraphModule) -> int:
    return sum(1 for _ in compute_nodes(gm))


def live_tensors(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters and buffers `module` computes with, by name, each storage once.

    For a GraphModule: those its get_attr nodes read (a get_attr with no user
    reads nothing) plus everything of the submodules it calls; attributes a
    rewrite left behind (a conv's weight after BatchNorm folding) do not count.
    For any other module: all its parameters and buffers.
    """
    if isinstance(module, fx.GraphModule):
        named: list[tuple[str, torch.Tensor]] = []
        for node in module.graph.nodes:
            if node.op == "get_attr" and node.users:
                value = get_attr_value(module, node) if _is_tensor_attr(module, str(node.target)) else None
                if value is not None:
                    named.append((str(node.target), value))
            elif node.op == "call_module" and node.target not in GUARD_MODULES:
                sub = module.get_submodule(str(node.target))
                named += [(f"{node.target}.{n}", t) for n, t in
                          list(sub.named_parameters()) + list(sub.named_buffers())]
    else:
        named = list(module.named_parameters()) + list(module.named_buffers())
    seen: set[object] = set()
    out: dict[str, torch.Tensor] = {}
    for name, tensor in named:
        key = tensor.untyped_storage().data_ptr() if tensor.device.type != "meta" else id(tensor)
        if key not in seen:
            seen.add(key)
            out[name] = tensor
    return out


def _is_tensor_attr(gm: fx.GraphModule, target: str) -> bool:
    try:
        return isinstance(attr_path(gm, target), torch.Tensor)
    except AttributeError:
        return False


def param_count(module: torch.nn.Module) -> int:
    """Elements of the floating-point parameters and buffers `module` computes with (`live_tensors`)."""
    return sum(t.numel() for t in live_tensors(module).values() if t.is_floating_point())


def param_bytes(module: torch.nn.Module) -> int:
    """Bytes of the parameters and buffers `module` computes with (`live_tensors`)."""
    return sum(t.numel() * t.element_size() for t in live_tensors(module).values())


def is_mutating(node: fx.Node) -> bool:
    """True if `node` writes into one of its inputs (e.g. `aten.add_`)."""
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def is_pure(node: fx.Node) -> bool:
    """A deterministic, side-effect-free call_function: safe to fold, dedupe or drop."""
    if node.op != "call_function" or node.is_impure() or is_mutating(node):
        return False
    tags = getattr(node.target, "tags", ())
    return torch.Tag.nondeterministic_seeded not in tags


def is_mutated(node: fx.Node) -> bool:
    """True if some node writes into `node`'s value in place, directly or through a view of it
    (`copy_` into a `slice` or `select` of it, as Hugging Face code fills index tables)."""
    pending, seen = [node], {node}
    while pending:
        current = pending.pop()
        for user in current.users:
            if is_mutating(user):
                return True
            if user not in seen and _is_view_of(user, current):
                seen.add(user)
                pending.append(user)
    return False


def _is_view_of(node: fx.Node, source: fx.Node) -> bool:
    """True if `node`'s output may alias `source` (its schema marks that argument as aliased)."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return False
    return any(arg.alias_info is not None and value is source
               for arg, value in zip(schema.arguments, node.args))
