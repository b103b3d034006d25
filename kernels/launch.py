"""Compile-or-interpret choice for Triton kernels, made at launch, not at import.

``@triton.jit`` decides between a compiled ``JITFunction`` and the CPU
interpreter when the decorator runs, that is when the module is imported,
from ``TRITON_INTERPRET`` at that moment. In a test session where something
imported ``graphopt.kernels`` before the variable was set, every kernel would
stay compiled-only and fail on CPU tensors. ``triton_kernel`` wraps the
undecorated kernel function instead and picks per launch:

- tensors on the CPU -> Triton's interpreter (Triton has no CPU backend here,
  so the interpreter is the only way to run the kernel on them);
- ``TRITON_INTERPRET=1`` (read through ``triton.knobs`` at launch) -> the
  interpreter on any device, for debugging;
- otherwise -> the compiled kernel.

Nothing is compiled or launched at import.

The same import-time choice applies to ``triton.language``'s own helpers
(``tl.cdiv``, ``tl.max``, ``tl.sigmoid``, ``tl.zeros`` in 3.9, ...): imported
without ``TRITON_INTERPRET`` they are compiled-only ``JITFunction``s, whose
``__call__`` raises when interpreted code calls them. For the duration of an
interpreted launch, ``JITFunction.__call__`` runs the helper's Python body
the way the interpreter runs device functions (``InterpretedFunction``);
compiled launches never go through ``__call__``, so they are unaffected.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator, Optional

import torch
import triton
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction


def interpreting(device: torch.device) -> bool:
    """Whether a launch on ``device`` runs in Triton's interpreter."""
    return device.type == "cpu" or bool(triton.knobs.runtime.interpret)


_interpreted_helpers: dict[Callable[..., Any], InterpretedFunction] = {}
_patch_lock = threading.RLock()


def _call_interpreted(self: JITFunction, *args: Any, **kwargs: Any) -> Any:
    helper = _interpreted_helpers.get(self.fn)
    if helper is None:
        helper = _interpreted_helpers[self.fn] = InterpretedFunction(self.fn)
    return helper(*args, **kwargs)


@contextlib.contextmanager
def _helpers_interpretable() -> Iterator[None]:
    with _patch_lock:
        original = JITFunction.__call__
        JITFunction.__call__ = _call_interpreted
        try:
            yield
        finally:
            JITFunction.__call__ = original


class _InterpretedLaunch:
    def __init__(self, fn: InterpretedFunction) -> None:
        self.fn = fn

    def __getitem__(self, grid: tuple[int, ...]) -> Callable[..., None]:
        def launch(*args: Any, **kwargs: Any) -> None:
            with _helpers_interpretable():
                self.fn[grid](*args, **kwargs)

        return launch


class TritonKernel:
    """A Triton kernel function launched as ``kernel.on(device)[grid](*args)``."""

    def __init__(self, fn: Callable[..., Any]) -> None:
        self.fn = fn
        self._compiled: Optional[JITFunction] = None
        self._interpreted: Optional[_InterpretedLaunch] = None

    def on(self, device: torch.device) -> Any:
        if interpreting(device):
            if self._interpreted is None:
                self._interpreted = _InterpretedLaunch(InterpretedFunction(self.fn))
            return self._interpreted
        if self._compiled is None:
            self._compiled = JITFunction(self.fn)
        return self._compiled


def triton_kernel(fn: Callable[..., Any]) -> TritonKernel:
    """Decorator used in place of ``@triton.jit`` for the graphopt kernels."""
    return TritonKernel(fn)


def dot_dtype(x: torch.Tensor) -> Any:
    """The ``tl.dot`` operand type for activations ``x`` in the weight-only kernels.

    float16 and (compiled) bfloat16 multiply natively; float32, and bfloat16 in
    Triton 3.9's interpreter (which multiplies bfloat16 tiles as raw uint16 bit
    patterns), multiply in float32. A bfloat16 x small-integer product has at
    most 16 significant bits, exact in float32, so the values are the same.
    """
    import triton.language as tl

    if x.dtype == torch.float16:
        return tl.float16
    if x.dtype == torch.bfloat16 and not interpreting(x.device):
        return tl.bfloat16
    return tl.float32
