"""A factory for the CLI's `package.module:factory` form: a small float MLP and its example input."""
from __future__ import annotations

import torch


def small_mlp() -> tuple[torch.nn.Module, tuple]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    return model.eval(), (torch.randn(4, 16),)
