"""The int4 weight format of ``graphopt::w4a16_linear``: two 4-bit codes a byte, group-wise asymmetric scales.

    W[n, k] ≈ (q[n, k] − z[n, g]) · s[n, g]        g = k // group_size,  q, z ∈ [0, 15]

``w_packed[n, j]`` (uint8 [N, ceil(K / 2)]) holds code ``q[n, 2j]`` in its low
nibble and ``q[n, 2j + 1]`` in its high nibble; for odd K the last high
nibble is 0 (padding, never read as a weight). ``scales`` (float32) and
``zeros`` (uint8, integer zero points) are [N, ceil(K / group_size)]; the last
group may be partial. Integer zero points keep ``q − z`` an integer in
[−15, 15], exact in float16, bfloat16 and float32, so the Triton kernel can
multiply the raw differences and apply the scale once per group.
"""

from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K] codes in [0, 15] -> uint8 [N, ceil(K / 2)], low nibble first."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be 2-D [N, K], got shape {tuple(codes.shape)}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("int4 codes must lie in [0, 15]")
    c = codes.to(torch.uint8)
    if c.shape[1] % 2:
        c = torch.nn.functional.pad(c, (0, 1))
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


def _check_packed(packed: torch.Tensor, k: int) -> None:
    if packed.dim() != 2 or packed.shape[1] != (k + 1) // 2:
        raise ValueError(f"packed must be [N, ceil({k} / 2)], got shape {tuple(packed.shape)}")


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K / 2)] -> uint8 [N, K] codes (inverse of ``pack_int4``)."""
    _check_packed(packed, k)
    both = torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)
    return both[:, :k]


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight ``(q − z) · s`` as ``dtype`` [N, K], computed in ``dtype`` (float64 for a reference).

    In place in one ``dtype`` buffer: the nibbles are written to their columns, then every group subtracts its
    zero point and multiplies by its scale (broadcast over the group, no weight-sized copies of ``z`` and
    ``s``): three passes over the weight, the same values as ``(q − z) · s`` computed element by element."""
    _check_packed(packed, k)
    n, groups = scales.shape
    half = packed.shape[1]
    width = groups * group_size
    q = torch.empty(n, max(width, 2 * half), dtype=dtype, device=packed.device)
    pairs = q[:, :2 * half].view(n, half, 2)
    pairs[..., 0] = packed & 0xF
    pairs[..., 1] = packed >> 4
    q[:, 2 * half:] = 0
    grouped = q[:, :width].view(n, groups, group_size)
    grouped.sub_(zeros.to(dtype)[..., None]).mul_(scales.to(dtype)[..., None])
    return q[:, :k]
