"""Structured pruning benchmark: graphopt O3 pruning + finetune vs Torch-Pruning, digits ResNet-style CNN.

For FLOPs kept = 0.75, 0.5, 0.25: FLOPs, parameters, CPU latency (batch 64) and
test accuracy right after pruning and after the same fine-tune budget
(graphopt.finetune: 3 epochs of distillation from the unpruned model, the
same loop for both), against Torch-Pruning (L2 group magnitude, global
ranking, DepGraph) pruned to the same FLOPs in the same run.

    python -m bench.pruning
"""
from __future__ import annotations

import copy
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from sklearn.datasets import load_digits

import graphopt
from bench.harness import time_call, write_results
from graphopt.passes.pruning.allocate import count_flops

EPOCHS_TRAIN, EPOCHS_TUNE, BATCH = 8, 3, 64


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.c2, self.b2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.b2(self.c2(F.relu(self.b1(self.c1(x))))))


class DigitsResNet(nn.Module):
    def __init__(self, c: int = 64) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.layer1 = nn.Sequential(Block(c), Block(c))
        self.down = nn.Sequential(nn.Conv2d(c, 2 * c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(2 * c),
                                  nn.ReLU())
        self.layer2 = Block(2 * c)
        self.fc = nn.Linear(2 * c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layer2(self.down(self.layer1(self.stem(x))))
        return self.fc(y.mean((2, 3)))


def data():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    x, y = x[order], y[order]
    train = [(x[i:i + BATCH], y[i:i + BATCH]) for i in range(0, 1400, BATCH)]
    return train, (x[1400:], y[1400:])


def accuracy(module, test) -> float:
    with torch.no_grad():
        return 100.0 * (module(test[0]).argmax(1) == test[1]).float().mean().item()


def train_model(train) -> nn.Module:
    torch.manual_seed(0)
    model = DigitsResNet()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    for _ in range(EPOCHS_TRAIN):
        for xb, yb in train:
            optimizer.zero_grad()
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
    return model.eval()


def torch_pruning(model: nn.Module, example: torch.Tensor, keep: float) -> nn.Module:
    """Torch-Pruning's global L2 group-magnitude pruner, stepped until FLOPs <= keep · original."""
    pruned = copy.deepcopy(model)
    base, _ = tp.utils.count_ops_and_params(pruned, example)
    pruner = tp.pruner.MagnitudePruner(pruned, example, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                       global_pruning=True, pruning_ratio=0.95, iterative_steps=200,
                                       ignored_layers=[pruned.fc], round_to=8)
    for _ in range(200):
        macs, _ = tp.utils.count_ops_and_params(pruned, example)
        if macs <= keep * base:
            break
        pruner.step()
    return pruned.eval()


def row(name: str, keep: float, module, flops: float, base_flops: float, params: int, latency_ms: float,
        base_latency: float, acc_pruned: float, acc_tuned: float) -> dict:
    return {"method": name, "target FLOPs kept": keep, "FLOPs (M)": flops / 1e6, "FLOPs kept": flops / base_flops,
            "params (k)": params / 1e3, "latency ms (b64)": latency_ms, "speed-up": base_latency / latency_ms,
            "acc pruned %": acc_pruned, "acc fine-tuned %": acc_tuned}


def main() -> None:
    warnings.simplefilter("ignore")
    train, test = data()
    model = train_model(train)
    example = test[0][:BATCH]
    base_gm = graphopt.optimize(model, (example,), level="O0", measure_latency=False, progress=False).graph_module
    base_flops = count_flops(base_gm) * BATCH
    base_latency = time_call(lambda: model(example)).median_ms
    base_acc = accuracy(model, test)
    tp_base, _ = tp.utils.count_ops_and_params(model, example)
    params = sum(p.numel() for p in model.parameters())
    rows = [row("unpruned", 1.0, model, base_flops, base_flops, params, base_latency, base_latency, base_acc, base_acc)]
    for keep in (0.75, 0.5, 0.25):
        opt = graphopt.optimize(model, (example,), prune=1 - keep, disable=["int8_dynamic"], progress=False)
        tuned = graphopt.finetune(opt, train, teacher=model, epochs=EPOCHS_TUNE)
        gm = tuned.graph_module
        base_latency = time_call(lambda: model(example)).median_ms   # re-timed next to each pruned model
        rows.append(row("graphopt", keep, gm, count_flops(gm) * BATCH, base_flops,
                        sum(p.numel() for p in gm.parameters() if p.is_floating_point()),
                        time_call(lambda: gm(example)).median_ms, base_latency, accuracy(opt, test),
                        accuracy(tuned, test)))
        anchor = torch_pruning(model, example, keep)
        anchor_tuned = graphopt.finetune(anchor, train, teacher=model, epochs=EPOCHS_TUNE)
        macs, n_params = tp.utils.count_ops_and_params(anchor_tuned, example)
        base_latency = time_call(lambda: model(example)).median_ms
        rows.append(row("Torch-Pruning", keep, anchor_tuned, macs, tp_base, n_params,
                        time_call(lambda: anchor_tuned(example)).median_ms, base_latency,
                        accuracy(anchor, test), accuracy(anchor_tuned, test)))
        print(rows[-2], rows[-1], flush=True)
    notes = (f"Digits (sklearn load_digits, 1400 train / {len(test[1])} test images), ResNet-style CNN "
             f"(64/128 channels, 5 residual convs), trained {EPOCHS_TRAIN} epochs. Both methods: L2 magnitude, "
             f"global ranking, channels rounded to 8, same fine-tune ({EPOCHS_TUNE} epochs of "
             "graphopt.finetune distillation from the unpruned model). FLOPs are multiply-accumulates for a "
             "batch of 64 (graphopt's own count for graphopt rows; Torch-Pruning's count_ops_and_params for "
             "its rows and for its own 'FLOPs kept'). Latency: eager fp32 CPU, batch 64, median.")
    print(write_results("pruning", "Structured pruning: graphopt vs Torch-Pruning on digits", rows, notes))


if __name__ == "__main__":
    main()
