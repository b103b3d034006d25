"""Per-layer speed selection for the int8 rewrite: a layer whose int8 form is not faster here stays float.

For each distinct layer signature (rows M of the example inputs, or those `timed_rows` sets, K, N, bias,
dtype, scheme) the float
layer, ``linear(x, W, b)``, is timed against its int8 form on random data of that shape, interleaved
by the speed check (graphopt/engine/speed.py):

    W8A8 (dynamic and static)   quantize_per_token(x) → int8_linear(x_q, W_q, s_x, s_W, b)
    weight-only                 w8a16_linear(x, W_q, s_W, b)
    int4 weight-only            w4a16_linear(x, P, s, z, group_size, b)   (the output head is timed so too)

(static scales quantize with a multiply, round and clamp instead of a per-row reduction; the dynamic
form is the dearer of the two, so a layer that pays dynamically pays statically.) A signature whose
int8 form is measurably slower keeps its layers float, with the measured ratio as the reason. Small
layers often lose: quantizing the activation is a pass over M × K that a small product does not repay.
The decision is local; the pass manager still times the whole rewritten graph.

Inside `shared_verdicts()` each signature is timed once and its verdict reused by every later int8 pass in
the block: graphopt.tune's trials then agree on which layers pay, instead of each trial drawing its own noise,
and only the first trial pays for the timing.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

try:
    from torch.fx.experimental.symbolic_shapes import optimization_hint
except ImportError:   # torch < 2.13 (e.g. the GPU machines' 2.11) names it hint_int
    from torch.fx.experimental.symbolic_shapes import hint_int as optimization_hint

import graphopt.kernels  # noqa: F401  (registers torch.ops.graphopt.*)
from graphopt.engine import ir
from graphopt.engine.speed import SpeedCheck

from .int4 import quantize_int4
from .observers import quantize_weight
from .sites import Site

ops = torch.ops.graphopt


_SHARED: ContextVar[dict[tuple, str | None] | None] = ContextVar("graphopt_layer_verdicts", default=None)
_ROWS: ContextVar[int | None] = ContextVar("graphopt_timed_rows", default=None)


@contextmanager
def timed_rows(rows: int) -> Iterator[None]:
    """Time every layer at `rows` rows within this block, whatever the example's shapes: for a caller that
    knows which calls matter. A generation module's graph is captured on a prompt (M = batch × prompt
    length), but generating is mostly decode steps (M = batch), where weight-only layers pay and a prompt's
    M would keep them float."""
    token = _ROWS.set(rows)
    try:
        yield
    finally:
        _ROWS.reset(token)


@contextmanager
def shared_verdicts() -> Iterator[None]:
    """Time each layer signature once within this block (see the module docstring)."""
    token = _SHARED.set({})
    try:
        yield
    finally:
        _SHARED.reset(token)


def slower_layers(gm: torch.fx.GraphModule, sites: list[Site], scheme: str, bits_of: Callable[[torch.Tensor], int],
                  check: SpeedCheck, group_size: int = 128) -> dict[str, str]:
    """{linear node name: why it stays float} for the sites whose int8 form is measurably slower here."""
    shared = _SHARED.get()
    verdicts: dict[tuple, str | None] = shared if shared is not None else {}
    slower: dict[str, str] = {}
    for site in sites:
        weight = site.weight(gm)
        rows = _rows(site)
        if rows is None or weight.device.type != "cpu":
            continue
        bits = bits_of(weight)
        key = (rows, *weight.shape, site.bias is not None, weight.dtype, scheme, bits, group_size)
        if key not in verdicts:
            verdicts[key] = _time(rows, weight, site.bias is not None, scheme, bits, check, group_size)
        if verdicts[key] is not None:
            slower[site.node.name] = verdicts[key]
    return slower


def _rows(site: Site) -> int | None:
    """Rows M of the layer's input: `timed_rows`'s, else on the example inputs (leading dims multiplied;
    symbolic ones by hint)."""
    if _ROWS.get() is not None:
        return _ROWS.get()
    shape = ir.shape(site.x)
    if shape is None:
        return None
    try:
        return math.prod(int(optimization_hint(d)) if isinstance(d, torch.SymInt) else int(d) for d in shape[:-1])
    except Exception:   # noqa: BLE001  (no hint for a symbolic size: the layer is not judged, it stays int8)
        return None


def _time(rows: int, weight: torch.Tensor, has_bias: bool, scheme: str, bits: int, check: SpeedCheck,
          group_size: int) -> str | None:
    n, k = weight.shape
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(rows, k, generator=generator).to(weight.dtype)
    w = weight.detach().clone()
    b = torch.randn(n, generator=generator).to(weight.dtype) if has_bias else None
    w_q, w_scale = quantize_weight(w, bits=bits)
    if scheme == "int4-weight-only":
        packed, scales, zeros = quantize_int4(w, group_size)

        def int8() -> object:
            return ops.w4a16_linear(x, packed, scales, zeros, group_size, b)
    elif scheme == "int8-weight-only":
        def int8() -> object:
            return ops.w8a16_linear(x, w_q, w_scale, b)
    else:
        def int8() -> object:
            x_q, x_scale = ops.quantize_per_token(x)
            return ops.int8_linear(x_q, w_q, x_scale, w_scale, b, out_dtype=x.dtype)
    verdict = check.compare(lambda: F.linear(x, w, b), int8)
    if verdict.kind != "slower":
        return None
    return f"float is faster on this target at {rows}×{k}→{n}: int8 measured {verdict.describe()}"
