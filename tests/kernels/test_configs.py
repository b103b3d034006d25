"""Block configuration tables, the split-K heuristic and the disk-cached autotune."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from graphopt.kernels import configs
from graphopt.kernels.configs import BlockConfig


def test_table_classes_by_m() -> None:
    table = configs.INT8_LINEAR_TABLE
    assert configs.from_table(table, 1) == configs.from_table(table, 16) == table[0][1]
    assert configs.from_table(table, 17) == table[1][1]
    assert configs.from_table(table, 10**6) == table[-1][1]


@settings(max_examples=200, deadline=None)
@given(m=st.integers(1, 16), n=st.integers(1, 20000), k=st.integers(1, 20000), sms=st.sampled_from([1, 80, 132]))
def test_split_k_keeps_slices_deep_and_bounded(m: int, n: int, k: int, sms: int) -> None:
    config = configs.from_table(configs.W8A16_TABLE, m)
    split = configs.split_k(m, n, k, config, 2 * sms)
    k_blocks = -(-k // config.block_k)
    assert 1 <= split <= configs.MAX_SPLIT_K
    if split > 1:
        assert k_blocks // split >= configs.MIN_K_BLOCKS_PER_SPLIT
        tiles = -(-n // config.block_n)
        assert tiles * split <= 2 * sms


def test_split_k_for_decode_shapes() -> None:
    config = configs.from_table(configs.W8A16_TABLE, 1)
    assert configs.split_k(1, 4096, 4096, config, 264) == 4  # 64 tiles, 32 K blocks
    assert configs.split_k(1, 64, 128, config, 264) == 1     # one K block: nothing to split


def test_pick_on_cpu_uses_the_table_even_with_autotune_requested(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GRAPHOPT_AUTOTUNE", "1")

    def never(config: BlockConfig) -> None:
        raise AssertionError("no timing on CPU")

    got = configs.pick("w8a16_linear", configs.W8A16_TABLE, 4, 64, 256, torch.float16, torch.device("cpu"), never, 2)
    assert got.block_m == configs.W8A16_TABLE[0][1].block_m and got.split_k == 1


def test_autotune_result_is_cached_on_disk(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(configs, "_memory", {})
    candidates = [BlockConfig(16, 64, 128), BlockConfig(64, 64, 128), BlockConfig(128, 128, 64)]
    timings = {candidates[0]: 3.0, candidates[1]: 1.0, candidates[2]: 2.0}
    runs: list[BlockConfig] = []

    def bench(fn) -> float:
        fn()
        return timings[runs[-1]]

    best = configs.autotune("int8_linear|gpu|k64", candidates, runs.append, bench)
    assert best == candidates[1] and len(runs) == 3
    assert json.loads((tmp_path / "autotune.json").read_text())["int8_linear|gpu|k64"]["block_m"] == 64

    monkeypatch.setattr(configs, "_memory", {})  # a new process: only the file remembers

    def must_not_bench(fn) -> float:
        raise AssertionError("retuned instead of reading the cache")

    assert configs.autotune("int8_linear|gpu|k64", candidates, runs.append, must_not_bench) == candidates[1]


def test_autotuned_winner_is_resplit_for_each_m(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    """A class's winner is cached with the split-K of the M it was tuned at; other Ms re-split it."""
    import triton.testing

    monkeypatch.setenv("GRAPHOPT_AUTOTUNE", "1")
    monkeypatch.setenv("GRAPHOPT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(configs, "_memory", {})
    monkeypatch.setattr(configs, "autotune_enabled", lambda device: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "fake GPU")
    winner = BlockConfig(128, 128, 64, num_warps=4, num_stages=4)
    runs: list[BlockConfig] = []

    def do_bench(fn, **kwargs) -> float:
        fn()
        last = runs[-1]
        return 1.0 if (last.block_m, last.block_n, last.block_k, last.num_warps) == (128, 128, 64, 4) else 2.0

    monkeypatch.setattr(triton.testing, "do_bench", do_bench)
    device = torch.device("cuda")

    def pick(m: int) -> BlockConfig:
        return configs.pick("w8a16_linear", configs.W8A16_TABLE, m, 4096, 4096, torch.float16, device,
                            runs.append, 264, search=configs.W8A16_SEARCH)

    tuned = pick(100)
    assert tuned == replace(winner, split_k=configs.split_k(100, 4096, 4096, winner, 264)) and tuned.split_k == 8
    timed = len(runs)
    again = pick(200)  # same class, N and K: no retuning, but this M's split
    assert len(runs) == timed
    assert again == replace(winner, split_k=configs.split_k(200, 4096, 4096, winner, 264)) and again.split_k == 4
