"""Example inputs: validation, and random look-alikes for verification.

Verification runs the original and each rewritten graph on the example inputs
and on `n` random inputs of the same structure, shapes and dtypes: floats
drawn with the example's mean and spread, integers (token ids, indices)
drawn from the example's own range, booleans copied. A rewrite that happens
to be right on one input is rarely right on three different ones.

Where capture kept dimensions symbolic, one more input has other sizes
(`Captured.other_shape`: a second batch size, and sequence length for token
models), so that a rewrite that only works at the example's shapes fails
verification. Latency is timed on the first input (the example's shapes).
"""
from __future__ import annotations

import warnings
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

Inputs = list[tuple[tuple, dict]]


def has_non_finite(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
               for t in pytree.tree_leaves((args, kwargs)))


def batch_as_inputs(item: Any, positional: int) -> tuple[tuple, dict]:
    """One calibration/training item as (args, kwargs) for a forward() taking `positional` args.

    Accepted: a tensor (the one positional input), a dict of keyword inputs, or a
    tuple/list of positional inputs; a longer tuple is an (inputs, labels) pair as a
    DataLoader yields it, cut to the positional inputs.
    """
    if isinstance(item, torch.Tensor):
        return (item,), {}
    if isinstance(item, Mapping):
        return (), dict(item)
    if isinstance(item, (tuple, list)):
        return tuple(item[:positional]) if len(item) > positional else tuple(item), {}
    from ..errors import InputError
    raise InputError(f"a calibration batch must be a tensor, a tuple/list of inputs or a dict of keyword "
                     f"inputs, got {type(item).__name__}")


def verification_inputs(args: tuple, kwargs: dict, n: int, seed: int = 0,
                        calibration: Iterable[Any] | None = None, dynamic_batch: bool = False,
                        other_shape: tuple[tuple, dict] | None = None) -> Inputs:
    """The example inputs (when finite) followed by `n` look-alikes, then `other_shape` if given.

    With calibration data the look-alikes are its first `n` batches that fit the
    captured shapes (real data: a lossy pass such as static int8 is judged on the
    distribution it was calibrated for), and `other_shape` (the example resized)
    is used as it is; otherwise random tensors shaped like the example, and a
    random look-alike of `other_shape`.
    """
    generator = torch.Generator().manual_seed(seed)
    finite = not has_non_finite(args, kwargs)
    if calibration is not None:
        batches = (batch_as_inputs(item, len(args)) for item in calibration)
        real = [b for _, b in zip(range(n), (b for b in batches if _fits(b, (args, kwargs), dynamic_batch)))]
        if real:
            other = [] if other_shape is None else [other_shape if finite else _look_alikes(other_shape, generator)]
            return ([(args, kwargs)] if finite else []) + real + other
    randoms = [_look_alikes((args, kwargs), generator) for _ in range(n)]
    if not finite:
        warnings.warn("graphopt: the example inputs hold NaN or inf, so verification cannot compare "
                      "outputs on them; it uses random finite inputs of the same shapes instead")
        randoms = randoms or [_look_alikes((args, kwargs), generator)]
    other = [] if other_shape is None else [_look_alikes(other_shape, generator)]
    return ([(args, kwargs)] if finite else []) + randoms + other


def _look_alikes(inputs: tuple[tuple, dict], generator: torch.Generator) -> tuple[tuple, dict]:
    return pytree.tree_map(lambda leaf: look_alike(leaf, generator), inputs)


def _fits(candidate: tuple[tuple, dict], example: tuple[tuple, dict], dynamic_batch: bool) -> bool:
    """Same structure, dtypes and shapes as the example (dimension 0 free when the batch is dynamic)."""
    leaves, spec = pytree.tree_flatten(candidate)
    want, want_spec = pytree.tree_flatten(example)
    if spec != want_spec:
        return False
    for a, b in zip(leaves, want):
        if isinstance(b, torch.Tensor):
            if not isinstance(a, torch.Tensor) or a.dtype != b.dtype or a.dim() != b.dim():
                return False
            if a.shape[int(dynamic_batch):] != b.shape[int(dynamic_batch):]:
                return False
    return True


def look_alike(leaf: Any, generator: torch.Generator) -> Any:
    """A random tensor like `leaf` (same shape and dtype): floats normal with the mean and spread of its finite
    values, integers uniform in its own [min, max], booleans (and complex) copied; non-tensors unchanged.
    The one look-alike of both IRs (graphopt.onnx.ir.random_inputs draws ONNX feeds with it)."""
    if not isinstance(leaf, torch.Tensor) or leaf.numel() == 0:
        return leaf
    if leaf.is_floating_point():
        finite = leaf[torch.isfinite(leaf)].double()
        mean = finite.mean().item() if finite.numel() else 0.0
        std = finite.std().item() if finite.numel() > 1 else 1.0
        noise = torch.randn(leaf.shape, generator=generator, dtype=torch.float64)
        return (noise * (std if std > 0 else 1.0) + mean).to(leaf.dtype)
    if leaf.dtype == torch.bool or leaf.is_complex():
        return leaf.clone()
    low, high = int(leaf.min()), int(leaf.max())
    return torch.randint(low, high + 1, leaf.shape, generator=generator, dtype=leaf.dtype)


def resize(tensor: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`tensor` at `shape` (same rank): each dimension cut, or extended by repeating its elements from
    the start (index i reads i mod size), so masks, ids and images keep the example's own values."""
    out = tensor
    for dim, (have, want) in enumerate(zip(tensor.shape, shape)):
        if have != want:
            out = out.index_select(dim, torch.arange(want, device=tensor.device) % have)
    return out
