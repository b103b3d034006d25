"""The quantization schemes: one table for their names.

A scheme has one user-facing name (`quantize="int8-dynamic"`), a short name
(the command line's `--int8 dynamic`, the ONNX int8 pass's argument) and the
names of the passes that apply it (`int8_dynamic` on FX graphs,
`onnx_int8_dynamic` on ONNX graphs). Every translation between them reads
this table.
"""
from __future__ import annotations

from enum import Enum

from ..errors import OptionError


class Scheme(str, Enum):
    DYNAMIC = "int8-dynamic"          # W8A8, activations quantized per token at run time
    STATIC = "int8-static"            # W8A8, one activation scale per layer from calibration
    WEIGHT_ONLY = "int8-weight-only"  # W8A16: int8 weights, float activations
    INT4_WEIGHT_ONLY = "int4-weight-only"  # W4A16: group-wise int4 weights, float activations

    @property
    def short(self) -> str:
        """The name without its `int8-` prefix: `dynamic`, `static`, `weight-only` (`int4-weight-only` stays)."""
        return self.value.removeprefix("int8-")

    @property
    def pass_name(self) -> str:
        """The FX int8 pass's name (`int8_dynamic`)."""
        return self.value.replace("-", "_")

    @property
    def onnx_pass_name(self) -> str:
        """The ONNX int8 pass's name (`onnx_int8_dynamic`)."""
        return f"onnx_{self.pass_name}"

    @classmethod
    def parse(cls, name: str) -> "Scheme":
        """The scheme spelled `name` (`int8-dynamic` or `dynamic`); `OptionError` otherwise."""
        for scheme in cls:
            if name in (scheme.value, scheme.short):
                return scheme
        raise OptionError(f"int8 scheme {name!r}: choose one of {', '.join(NAMES)}")


#: The user-facing names, in order.
NAMES: tuple[str, ...] = tuple(s.value for s in Scheme)
#: The short names (command line), in order.
SHORT_NAMES: tuple[str, ...] = tuple(s.short for s in Scheme)
