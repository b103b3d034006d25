"""graphopt.kernels: int8 kernels for the quantized matmul hot path.

Importing this package registers the ``torch.ops.graphopt`` ops
(``quantize_per_token``, ``int8_linear``, ``w8a16_linear``, ``w4a16_linear``, ``layer_norm_quantize``;
see ``ops.py``).
Nothing is compiled or launched at import, and no GPU is needed.

- ``triton_*``: the Triton implementations, callable directly (CPU tensors run
  in Triton's interpreter), with an optional ``out=`` and block ``config=``.
- ``reference_*``: float64 references with the ops' signatures.
- ``SCALE_FLOOR``: the smallest scale ``quantize_per_token`` emits.
"""

from . import ops
from .checks import SCALE_FLOOR
from .configs import BlockConfig
from .int8_linear import triton_int8_linear
from .quantize import triton_layer_norm_quantize, triton_quantize_per_token
from .int4pack import dequantize_int4, pack_int4, unpack_int4
from .reference import (
    reference_int8_linear,
    reference_layer_norm,
    reference_quantize_per_token,
    reference_w4a16_linear,
    reference_w8a16_linear,
)
from .w4a16 import triton_w4a16_linear
from .w8a16 import triton_w8a16_linear

__all__ = [
    "BlockConfig",
    "SCALE_FLOOR",
    "dequantize_int4",
    "ops",
    "pack_int4",
    "reference_int8_linear",
    "reference_layer_norm",
    "reference_quantize_per_token",
    "reference_w4a16_linear",
    "reference_w8a16_linear",
    "triton_int8_linear",
    "triton_layer_norm_quantize",
    "triton_quantize_per_token",
    "triton_w4a16_linear",
    "triton_w8a16_linear",
    "unpack_int4",
]
