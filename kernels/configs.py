"""Block configurations for the Triton kernels: a table per shape class, and an
optional autotune whose results are cached on disk.

A GEMM launch is tiled into ``BLOCK_M x BLOCK_N`` output tiles, each reducing
K in steps of ``BLOCK_K``; ``GROUP_M`` is the height (in tiles) of the band of
consecutive programs that walk N together so their A rows stay in L2;
``SPLIT_K`` splits the K loop across programs (W8A16 only). The shape class is
the bucket of M (the token count), which is what changes between prefill and
decode; N and K only enter through the split-K heuristic and the autotune key.

The table entries are for Hopper-class GPUs. The int8 ones were measured on
an NVIDIA H100 80GB HBM3 (torch 2.11, Triton 3.6) on 2026-11-23 with
``GRAPHOPT_AUTOTUNE=1 python -m bench.kernels --gpu-only`` (bench/results/
kernels_gpu_autotuned.md): each class's entry and the search space below
timed on (K, N) in {(4096, 4096), (4096, 11008), (8192, 8192)} at the first M
of the class the benchmark runs (M = 1 for <= 16, 33 for <= 64, 100 and 128
for <= 256, 1024 for the unbounded class). Two classes took the winner (by
geometric mean over the shapes), confirmed afterwards by the CUDA-graph
timings of bench/results/kernels_gpu.md: <= 16 is 16x32x256 (at M = 1, K = N
= 4096: 4.0 -> 5.5 TOPS) and <= 256 is 64x64x128 with 4 warps (at M = 128:
227 -> 469, 421 -> 533, 383 -> 532 TOPS; the previous 128x128x128 left most
SMs idle). <= 64 and the unbounded class were already the winners. The W8A16
entries are unchanged: the autotune's plain do_bench timings of its split-K
launches (tens of microseconds, several launches each) did not hold up under
CUDA-graph timing. Its winner at M = 128 (128x128x64, 4 warps, 4 stages;
1.18x by do_bench) gave 178 -> 167, 230 -> 232, 277 -> 278 TOPS; its <= 64
winner (64x128x64, 8 % on one shape) was not confirmed.
With ``GRAPHOPT_AUTOTUNE=1`` and a CUDA device,
``pick`` times every candidate once per (kernel, device, Triton version,
shape class, N, K, dtype) and stores the winner in a JSON file
(``$GRAPHOPT_CACHE_DIR/autotune.json``, default ``~/.cache/graphopt``), so
later processes reuse it instead of retuning. The autotune times the table's
entries and a wider search space (``INT8_LINEAR_SEARCH``, ``W8A16_SEARCH``);
``GRAPHOPT_AUTOTUNE_LOG=path`` appends every candidate's time to ``path``.
"""

from __future__ import annotations

import functools
import json
import os
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import triton
from triton.runtime.errors import OutOfResources


@dataclass(frozen=True)
class BlockConfig:
    """Tile sizes and launch options of one kernel launch.

    ``group_m`` is read by the int8 GEMM (program ordering) and ``split_k`` by
    W8A16 (K slices); each kernel ignores the other field.
    """

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3


# (largest M of the class, config); the last class has no upper bound.
# Measured on H100 (see the module docstring).
INT8_LINEAR_TABLE: tuple[tuple[Optional[int], BlockConfig], ...] = (
    (16, BlockConfig(16, 32, 256, group_m=1, num_warps=4, num_stages=4)),
    (64, BlockConfig(64, 64, 128, num_warps=4, num_stages=4)),
    (256, BlockConfig(64, 64, 128, num_warps=4, num_stages=4)),
    (None, BlockConfig(128, 256, 128, num_warps=8, num_stages=3)),
)

W8A16_TABLE: tuple[tuple[Optional[int], BlockConfig], ...] = (
    (16, BlockConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4)),
    (64, BlockConfig(64, 64, 64, num_warps=4, num_stages=4)),
    (None, BlockConfig(128, 128, 64, num_warps=8, num_stages=3)),
)

# W4A16 (int4 weights, group-wise): not yet measured on a GPU. The <= 16 class is a GEMV shape
# (one 16-row tile, wide K blocks, split-K for occupancy); its block_k is capped at the group size.
W4A16_TABLE: tuple[tuple[Optional[int], BlockConfig], ...] = (
    (16, BlockConfig(16, 64, 128, group_m=1, num_warps=4, num_stages=4)),
    (64, BlockConfig(64, 64, 64, num_warps=4, num_stages=4)),
    (None, BlockConfig(128, 128, 64, num_warps=8, num_stages=3)),
)

# Autotune search space (besides the table's own entries). ``pick`` times the
# ones whose block_m fits the shape class (block_m <= max(16, the class's
# largest M); every one for the unbounded class).
INT8_LINEAR_SEARCH: tuple[BlockConfig, ...] = (
    BlockConfig(16, 32, 256, group_m=1, num_warps=4, num_stages=4),
    BlockConfig(16, 128, 256, group_m=1, num_warps=4, num_stages=4),
    BlockConfig(16, 64, 512, group_m=1, num_warps=4, num_stages=3),
    BlockConfig(32, 64, 256, num_warps=4, num_stages=4),
    BlockConfig(64, 64, 256, num_warps=4, num_stages=4),
    BlockConfig(64, 128, 128, num_warps=4, num_stages=4),
    BlockConfig(128, 64, 128, num_warps=4, num_stages=4),
    BlockConfig(128, 128, 128, num_warps=4, num_stages=4),
    BlockConfig(128, 128, 256, num_warps=8, num_stages=3),
    BlockConfig(128, 256, 128, num_warps=8, num_stages=4),
    BlockConfig(256, 128, 128, num_warps=8, num_stages=3),
    BlockConfig(256, 128, 128, num_warps=8, num_stages=4),
)

W8A16_SEARCH: tuple[BlockConfig, ...] = (
    BlockConfig(16, 32, 128, group_m=1, num_warps=4, num_stages=4),
    BlockConfig(16, 128, 128, group_m=1, num_warps=4, num_stages=4),
    BlockConfig(16, 64, 256, group_m=1, num_warps=4, num_stages=3),
    BlockConfig(32, 64, 128, num_warps=4, num_stages=4),
    BlockConfig(64, 128, 64, num_warps=4, num_stages=4),
    BlockConfig(64, 64, 128, num_warps=4, num_stages=3),
    BlockConfig(128, 64, 64, num_warps=4, num_stages=4),
    BlockConfig(128, 128, 64, num_warps=4, num_stages=4),
    BlockConfig(128, 128, 128, num_warps=8, num_stages=3),
    BlockConfig(128, 256, 64, num_warps=8, num_stages=3),
    BlockConfig(256, 128, 64, num_warps=8, num_stages=3),
)

#: W4A16 tiles: the W8A16 space (block_k is capped at the group size at launch).
W4A16_SEARCH = W8A16_SEARCH

MAX_SPLIT_K = 16
MIN_K_BLOCKS_PER_SPLIT = 4


def from_table(table: Sequence[tuple[Optional[int], BlockConfig]], m: int) -> BlockConfig:
    """The configuration of the shape class that ``m`` falls in."""
    for largest_m, config in table:
        if largest_m is None or m <= largest_m:
            return config
    raise ValueError("a config table must end with an unbounded class")


def split_k(m: int, n: int, k: int, config: BlockConfig, programs_wanted: int) -> int:
    """How many K slices give about ``programs_wanted`` programs.

    Splitting pays when the output has fewer tiles than the device has
    compute units (small M, modest N); each slice keeps at least
    ``MIN_K_BLOCKS_PER_SPLIT`` K blocks so the partial sums stay worth their
    extra write and reduction.
    """
    tiles = triton.cdiv(m, config.block_m) * triton.cdiv(n, config.block_n)
    k_blocks = triton.cdiv(k, config.block_k)
    by_occupancy = max(1, programs_wanted // tiles)
    by_depth = max(1, k_blocks // MIN_K_BLOCKS_PER_SPLIT)
    return min(by_occupancy, by_depth, MAX_SPLIT_K)


def compute_units(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 elsewhere (the interpreter runs programs one by one)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 1


@functools.lru_cache(maxsize=None)
def device_name(device: torch.device) -> str:
    """The CUDA device's name, read once (the driver query costs tens of microseconds per launch)."""
    return torch.cuda.get_device_name(device)


def autotune_enabled(device: torch.device) -> bool:
    return device.type == "cuda" and os.environ.get("GRAPHOPT_AUTOTUNE", "0") == "1"


def cache_path() -> Path:
    root = os.environ.get("GRAPHOPT_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "graphopt")
    return Path(root) / "autotune.json"


_memory: dict[str, BlockConfig] = {}


def _read_cache(path: Path) -> dict[str, dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(path: Path, entries: dict[str, dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as f:
        json.dump(entries, f, indent=1, sort_keys=True)
    os.replace(f.name, path)


def autotune(
    key: str,
    candidates: Sequence[BlockConfig],
    run: Callable[[BlockConfig], object],
    bench: Callable[[Callable[[], object]], float],
) -> BlockConfig:
    """The fastest of ``candidates`` for ``key``: from memory, from the disk cache, or timed now.

    ``run(config)`` launches the kernel once; ``bench(fn)`` returns its time.
    A newly timed winner is merged into the cache file (re-read just before
    writing, then atomically replaced) so concurrent processes lose nothing
    but a duplicate measurement.
    """
    if key in _memory:
        return _memory[key]
    path = cache_path()
    stored = _read_cache(path).get(key)
    if stored is not None:
        _memory[key] = BlockConfig(**stored)
        return _memory[key]
    def timed(config: BlockConfig) -> float:
        try:
            return bench(lambda: run(config))
        except OutOfResources:  # too much shared memory or registers for this device
            return float("inf")

    times = [timed(config) for config in candidates]
    if min(times) == float("inf"):
        raise RuntimeError(f"autotune {key}: no candidate fits this device")
    best = candidates[times.index(min(times))]
    log = os.environ.get("GRAPHOPT_AUTOTUNE_LOG")
    if log:  # every candidate's time, one JSON line per key (for updating the tables)
        with open(log, "a") as f:
            f.write(json.dumps({"key": key, "ms": [[asdict(c), t] for c, t in zip(candidates, times)]}) + "\n")
    entries = _read_cache(path)
    entries[key] = asdict(best)
    _write_cache(path, entries)
    _memory[key] = best
    return best


def pick(
    kernel: str,
    table: Sequence[tuple[Optional[int], BlockConfig]],
    m: int,
    n: int,
    k: int,
    dtype: torch.dtype,
    device: torch.device,
    run: Callable[[BlockConfig], object],
    programs_wanted: Optional[int] = None,
    *,
    search: Sequence[BlockConfig] = (),
) -> BlockConfig:
    """Block configuration for one launch: autotuned (if enabled) or from ``table``.

    With ``programs_wanted`` the kernel supports split-K and the chosen
    configuration gets its ``split_k`` from ``split_k()``. The autotune times
    the table's entries and those of ``search`` whose ``block_m`` fits the
    shape class (at most ``max(16, largest M of the class)``).
    """
    def finish(config: BlockConfig) -> BlockConfig:
        if programs_wanted is None:
            return config
        return replace(config, split_k=split_k(m, n, k, config, programs_wanted))

    if not autotune_enabled(device):
        return finish(from_table(table, m))
    from triton.testing import do_bench

    shape_class = next(i for i, (largest_m, _) in enumerate(table) if largest_m is None or m <= largest_m)
    key = "|".join((kernel, device_name(device), triton.__version__, f"class{shape_class}", f"n{n}", f"k{k}", str(dtype)))
    largest_m = table[shape_class][0]
    fits = [config for config in [c for _, c in table] + list(search)
            if largest_m is None or config.block_m <= max(16, largest_m)]
    candidates = list(dict.fromkeys(finish(config) for config in fits))
    tuned = autotune(key, candidates, run, lambda fn: do_bench(fn, warmup=10, rep=40, return_mode="median"))
    # The tiles are tuned per class, but split-K belongs to this launch's M: a class's winner
    # (timed and cached with the split of the M it was tuned at) is re-split for this M.
    return finish(tuned)


# Row kernels (quantize_per_token, layer_norm_quantize): a program holds ``block_m`` whole rows of
# ``block_k`` = next_power_of_2(K) elements in registers. The heuristic gives each program about
# ROW_TILE elements and one warp per 256 of them (2 to 8); the autotune times ROW_SEARCH_ROWS x
# ROW_SEARCH_WARPS. Measured on an H200 (Triton 3.6, fp16, 2026-11-30, bench/results/quantize_gpu.md's
# autotune log): one row per program won at K = 768, 3072 and 4096 for both kernels (M = 4096 and 8),
# with 4 or 8 warps; eight rows per program (the former 8192-element tile) were 1.3-3.5x slower.
ROW_TILE = 2048
ROW_SEARCH_ROWS = (1, 2, 4, 8)
ROW_SEARCH_WARPS = (2, 4, 8)
ROW_MAX_ELEMENTS = 32768


def quantize_config(
    kernel: str, m: int, k: int, dtype: torch.dtype, device: torch.device, run: Callable[[BlockConfig], object]
) -> BlockConfig:
    """Rows per program and warps for a row kernel over ``[m, k]``: the heuristic, or autotuned if enabled.

    The autotune key holds K and M's power-of-two bucket (the grid is M / rows programs).
    """
    block_k = triton.next_power_of_2(k)
    rows = max(ROW_TILE // block_k, 1)
    heuristic = BlockConfig(rows, 1, block_k, num_warps=min(max(rows * block_k // 256, 2), 8))
    if not autotune_enabled(device):
        return heuristic
    from triton.testing import do_bench

    candidates = list(dict.fromkeys([heuristic] + [
        BlockConfig(r, 1, block_k, num_warps=w)
        for r in ROW_SEARCH_ROWS if r * block_k <= ROW_MAX_ELEMENTS
        for w in ROW_SEARCH_WARPS if w * 32 <= r * block_k
    ]))
    key = "|".join((kernel, device_name(device), triton.__version__,
                    f"m{triton.next_power_of_2(m)}", f"k{k}", str(dtype)))
    return autotune(key, candidates, run, lambda fn: do_bench(fn, warmup=10, rep=40, return_mode="median"))
