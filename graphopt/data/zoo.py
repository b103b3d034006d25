"""Built-in models and data: the digits residual CNN used by the demo and the benchmarks, a sentence
encoder wrapper (mean pooling over real tokens, as sentence-transformers) for token models, and a
causal-LM wrapper (token ids → logits, no KV cache) for Hugging Face decoders.

scikit-learn's bundled `load_digits()` (1,797 real 8×8 handwritten digits)
trains `DigitsResNet` to ~98.7% test accuracy (6 epochs, about 30 s on 2
idle cores): big enough to show fusion, int8 and pruning at work, small
enough for CI. The weights trained with seed 0 ship in
`graphopt/data/digits_resnet.pt` (~200 KB), so the demo and the tests load
them instead of training; `python -m graphopt.data.zoo` retrains and rewrites them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Digits:
    x_train: torch.Tensor   # float32 [N, 1, 8, 8], scaled to [0, 1]
    y_train: torch.Tensor   # int64 [N]
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_data(test_fraction: float = 0.25, seed: int = 0) -> Digits:
    from sklearn.datasets import load_digits
    bunch = load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(bunch.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(len(y) * (1 - test_fraction))
    train, test = order[:cut], order[cut:]
    return Digits(x[train], y[train], x[test], y[test])


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(x + self.bn2(self.conv2(y)))


class DigitsResNet(nn.Module):
    """conv-BN stem, two residual stages, a 2×2-pooled head and a 2-layer classifier."""

    def __init__(self, width: int = 16, hidden: int = 64, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.stage1 = Block(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())
        self.stage2 = Block(2 * width)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(8 * width, hidden), nn.ReLU(), nn.Dropout(0.1),
                                  nn.Linear(hidden, classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.stage2(self.down(self.stage1(self.stem(x))))))


def batches(x: torch.Tensor, y: torch.Tensor, size: int, seed: int):
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for start in range(0, len(y), size):
        index = order[start:start + size]
        yield x[index], y[index]


def train_digits(model: nn.Module, data: Digits, epochs: int = 6, lr: float = 3e-3, seed: int = 0,
                 progress: bool = True) -> nn.Module:
    """Plain supervised training (Adam, cross-entropy); returns the model in eval mode."""
    from tqdm.auto import tqdm
    torch.manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for epoch in tqdm(range(epochs), desc="training digits CNN", unit="epoch", disable=None if progress else True):
        for xb, yb in batches(data.x_train, data.y_train, 64, seed + epoch):
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Top-1 accuracy in percent."""
    with torch.no_grad():
        return (model(x).argmax(-1) == y).float().mean().item() * 100


WEIGHTS = Path(__file__).resolve().with_name("digits_resnet.pt")


def trained_digits_resnet(seed: int = 0, retrain: bool = False, progress: bool = True) -> tuple[DigitsResNet, Digits]:
    """The digits CNN with its bundled weights (trained here if missing or asked) and its data split."""
    data = load_digits_data(seed=seed)
    torch.manual_seed(seed)
    model = DigitsResNet()
    if WEIGHTS.exists() and not retrain and seed == 0:
        model.load_state_dict(torch.load(WEIGHTS, weights_only=True))
        return model.eval(), data
    model = train_digits(model, data, seed=seed, progress=progress)
    if seed == 0:
        WEIGHTS.parent.mkdir(exist_ok=True)
        torch.save(model.state_dict(), WEIGHTS)
    return model, data


if __name__ == "__main__":
    trained, digits = trained_digits_resnet(retrain=True)
    print(f"retrained {WEIGHTS}: test accuracy {accuracy(trained, digits.x_test, digits.y_test):.2f}%")


class MeanPooledEncoder(nn.Module):
    """A transformer → mask-weighted mean pooling of its last hidden state (as sentence-transformers)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class CausalLMLogits(nn.Module):
    """A Hugging Face causal LM as token ids → logits, without a KV cache (a DynamicCache is not a tensor)."""

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm(input_ids=input_ids, use_cache=False).logits
