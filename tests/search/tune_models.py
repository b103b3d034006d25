"""Small models and evaluate functions for the tune tests (importable by worker processes and the CLI)."""
from __future__ import annotations

import torch

from graphopt.engine.speed import SpeedCheck

#: Few rounds per comparison: the tests check the search, not figures (the timer is the real one).
QUICK_TIMING = {"min_rounds": 3, "max_rounds": 5, "max_seconds": 2.0}


class MLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(32, 64)
        self.fc2 = torch.nn.Linear(64, 64)
        self.out = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def mlp() -> tuple[MLP, tuple[torch.Tensor]]:
    torch.manual_seed(0)
    return MLP().eval(), (torch.randn(16, 32, generator=torch.Generator().manual_seed(1)),)


_DATA = torch.randn(256, 32, generator=torch.Generator().manual_seed(2))
_LABELS = mlp()[0](_DATA).argmax(-1)


def agreement(module: torch.nn.Module) -> float:
    """Top-1 agreement with the original MLP in percent, on 256 fixed random rows (deterministic)."""
    with torch.no_grad():
        return (module(_DATA).argmax(-1) == _LABELS).float().mean().item() * 100


def quick() -> SpeedCheck:
    return SpeedCheck(**QUICK_TIMING)
