"""Example inputs: validation, and random look-alikes for verification.

Verification runs the original and each rewritten graph on the example inputs
and on `n` random inputs of the same structure, shapes and dtypes: floats
drawn with the example's mean and spread, integers (token ids, indices)
drawn from the example's own range, booleans copied. A rewrite that happens
to be right on one input is rarely right on three different ones.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.utils._pytree as pytree

Inputs = list[tuple[tuple, dict]]


def has_non_finite(args: tuple, kwargs: dict) -> bool:
    return any(isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
               for t in pytree.tree_leaves((args, kwargs)))


def verification_inputs(args: tuple, kwargs: dict, n: int, seed: int = 0) -> Inputs:
    """The example inputs (when finite) followed by `n` random look-alikes."""
    generator = torch.Generator().manual_seed(seed)
    randoms = [pytree.tree_map(lambda leaf: _look_alike(leaf, generator), (args, kwargs)) for _ in range(n)]
    if has_non_finite(args, kwargs):
        warnings.warn("graphopt: the example inputs hold NaN or inf, so verification cannot compare "
                      "outputs on them; it uses random finite inputs of the same shapes instead")
        return randoms or [pytree.tree_map(lambda leaf: _look_alike(leaf, generator), (args, kwargs))]
    return [(args, kwargs)] + randoms


def _look_alike(leaf: Any, generator: torch.Generator) -> Any:
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
