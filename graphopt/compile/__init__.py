"""graphopt with torch.compile: graphopt's graph rewrites, then inductor's code generation.

graphopt rewrites what inductor cannot (BN folding across layers, GEMM merges,
structured pruning, int8 with accuracy control, SmoothQuant); inductor then
generates fused kernels for what is left. Two routes lead there:

1. `graphopt.optimize(model, example_inputs, backend="inductor")`: the
   optimized GraphModule runs through `torch.compile(gm, backend="inductor")`
   (`InductorRunner`). Compilation happens on the first call. The
   `graphopt::*` custom ops have fake kernels, so dynamo traces them into one
   graph and inductor calls them as extern kernels (no graph break). When
   capture kept the batch dimension symbolic, dimension 0 of every tensor
   input is marked `maybe_mark_dynamic` on the first call, so other batch
   sizes reuse the compiled code instead of recompiling per size.

2. `torch.compile(model, backend="graphopt", options={"level": "O2", ...})`
   (`GraphoptBackend`; the name "graphopt" is a `torch_dynamo_backends` entry
   point (pyproject.toml), which torch loads when the name is first used:
   importing graphopt registers nothing). Dynamo hands the backend each captured subgraph (torch-level
   ops; parameters and buffers are placeholders). Lowering to ATen is done by
   the same capture as route 1, on the first call, with real inputs:

   - parameter and buffer placeholders become buffers of a new GraphModule
     (frozen at the first call, like inductor's `freezing=True`); a symbolic
     size placeholder becomes `aten.sym_size(input, dim)` of the user input
     whose dimension it is;
   - that module goes through `graphopt.optimize(..., backend="inductor")`:
     torch.export (non-strict) to ATen, the pass pipeline with verification on
     the first call's inputs, then route 1.

   Models with graph breaks work: each subgraph is optimized on its own and
   `GraphoptBackend.reports` (for the string name: `graphopt.compile.reports()`)
   holds one report per subgraph. A subgraph graphopt cannot take (a size that
   is not dimension 0 of an input, a non-tensor input, an export failure) is
   compiled by inductor alone and its report says why.

Options under the dynamo backend (what cannot work as in `graphopt.optimize`):

- verify: compares with the subgraph as dynamo captured it, on the first
  call's inputs and random look-alikes (there are no example inputs before).
- calibration_data (and so "int8-static", SmoothQuant and accuracy_budget,
  which need it): refused with an OptionError. Calibration batches are inputs
  of the model, but a subgraph's inputs are whatever dynamo cut at a graph
  break; use route 1, `graphopt.optimize(model, calibration_data=...,
  backend="inductor")`.
- example_kwargs: not an option (dynamo supplies the inputs).
- backend: "inductor" (default) or "eager" (graphopt's passes, no inductor).
- Parameters are read at the first call: retraining after it needs
  `torch._dynamo.reset()`. The backend serves inference: it runs under
  `torch.no_grad()` and its outputs carry no autograd history.
- Recompiles: dynamo itself recompiles a frame once when a batch size
  changes (automatic dynamic shapes) and calls the backend again; the new
  subgraph is optimized again, and later batch sizes reuse it.

Modules: `runner.py` (route 1's `InductorRunner`), `backend.py` (route 2's
`GraphoptBackend`: lowering dynamo's subgraphs), `registry.py` (the named
backend and the subgraphs it compiled). The names below load on first use, so
that `graphopt.api` can import the runner without loading the backend (which
imports `graphopt.api`).
"""
from __future__ import annotations

import importlib
from typing import Any

#: Public names loaded on first use, and the module each comes from.
_LAZY = {"InductorRunner": ".runner", "GraphoptBackend": ".backend", "Subgraph": ".backend",
         "graphopt_backend": ".registry", "subgraphs": ".registry", "reports": ".registry", "clear": ".registry"}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'graphopt.compile' has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
