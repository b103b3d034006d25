"""Epilogue activations shared by the int8 linear paths.

``ACTIVATIONS`` names the activations ``int8_linear`` accepts::

    none       y = z
    relu       y = max(z, 0)
    gelu       y = z * Phi(z) = 0.5 * z * (1 + erf(z / sqrt(2)))
    gelu_tanh  y = 0.5 * z * (1 + tanh(u)) = z * sigmoid(2u),  u = sqrt(2/pi) * (z + 0.044715 z^3)
    silu       y = z * sigmoid(z)

``apply_activation`` is the torch version (any float dtype) used by the CPU
path and the float64 reference; the Triton epilogue in ``int8_linear.py``
implements the same formulas (gelu_tanh through the sigmoid identity, which
avoids the cancellation of ``1 + tanh(u)`` for negative ``u``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = ("none", "relu", "gelu", "gelu_tanh", "silu")


def apply_activation(z: torch.Tensor, activation: str) -> torch.Tensor:
    """Return ``activation(z)`` computed in ``z``'s dtype."""
    if activation == "none":
        return z
    if activation == "relu":
        return torch.relu(z)
    if activation == "gelu":
        return F.gelu(z)
    if activation == "gelu_tanh":
        return F.gelu(z, approximate="tanh")
    if activation == "silu":
        return F.silu(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
