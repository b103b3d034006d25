"""Hypothesis strategies for random but valid models and their inputs.

`models()` draws one of three families, each with random widths, depths,
activations and seeds:

- "mlp":   Linear → activation (→ LayerNorm) (→ Dropout) blocks on (B, F) inputs
- "cnn":   Conv → BatchNorm → activation stems, residual blocks, concat and
           split branches, pooling and a Linear head on (B, C, H, W) inputs
- "attn":  transformer blocks with self-attention written by hand (view +
           transpose heads, scaled matmul, optional additive mask, softmax),
           LayerNorm and an MLP on (B, S, D) inputs

`masked_encoder_cases()` (not among `models()`: its inputs are token ids and a
padding mask) draws "attn" blocks under an embedding and a key-padding mask,
with a head that ignores padded tokens (masked mean-pool, or the first token),
or that returns every token's state (padded ones included).

Weights, BatchNorm statistics and LayerNorm affines are random (fresh BN
statistics are 0/1, which would hide folding bugs). A drawn case is a
`ModelCase(model, make_inputs)`: `make_inputs(batch, seed)` builds inputs of
any batch size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from hypothesis import strategies as st

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU, "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity,
}


@dataclass
class ModelCase:
    family: str
    model: nn.Module
    make_inputs: Callable[[int, int], tuple[torch.Tensor, ...]]
    description: str

    def __repr__(self) -> str:
        return f"ModelCase({self.family}: {self.description})"


def randomize_(model: nn.Module, seed: int) -> nn.Module:
    """Random weights and normalization statistics, so no rewrite is trivially exact."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.running_mean.copy_(torch.randn(module.num_features, generator=generator) * 0.5)
                module.running_var.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                if module.affine:
                    module.weight.copy_(torch.rand(module.num_features, generator=generator) + 0.5)
                    module.bias.copy_(torch.randn(module.num_features, generator=generator) * 0.2)
            elif isinstance(module, nn.LayerNorm) and module.elementwise_affine:
                module.weight.copy_(torch.rand(module.weight.shape, generator=generator) + 0.5)
                module.bias.copy_(torch.randn(module.bias.shape, generator=generator) * 0.2)
    return model.eval()


class MLP(nn.Module):
    def __init__(self, widths: list[int], activation: str, layer_norm: bool, dropout: bool) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths, widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(widths) - 2:
                layers.append(ACTIVATIONS[activation]())
                if layer_norm:
                    layers.append(nn.LayerNorm(b))
                if dropout:
                    layers.append(nn.Dropout(0.1))
        self.body = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, activation: str, bias: bool, groups: int = 1) -> None:
        super().__init__(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=bias, groups=groups),
                         nn.BatchNorm2d(cout), ACTIVATIONS[activation]())


class Residual(nn.Module):
    def __init__(self, channels: int, activation: str, depthwise: bool) -> None:
        super().__init__()
        self.a = ConvBN(channels, channels, 3, activation, bias=False, groups=channels if depthwise else 1)
        self.b = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.BatchNorm2d(channels))
        self.act = ACTIVATIONS[activation]()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.b(self.a(x)))


class ConcatBranches(nn.Module):
    """Two parallel conv branches concatenated on channels (inception-style)."""

    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        half = channels // 2
        self.left = ConvBN(channels, half, 1, activation, bias=True)
        self.right = ConvBN(channels, channels - half, 3, activation, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.left(x), self.right(x)], dim=1)


class SplitBranches(nn.Module):
    """Channels split in two, processed apart, summed back after a 1×1 projection."""

    def __init__(self, channels: int, activation: str) -> None:
        super().__init__()
        self.half = channels // 2
        self.left = ConvBN(self.half, self.half, 3, activation, bias=True)
        self.right = nn.Conv2d(channels - self.half, channels - self.half, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = torch.split(x, [self.half, x.shape[1] - self.half], dim=1)
        return torch.cat([self.left(a), self.right(b)], dim=1)


class CNN(nn.Module):
    def __init__(self, in_channels: int, channels: int, blocks: list[str], activation: str,
                 classes: int, head: str) -> None:
        super().__init__()
        self.stem = ConvBN(in_channels, channels, 3, activation, bias=True)
        makers = {"residual": lambda: Residual(channels, activation, depthwise=False),
                  "depthwise": lambda: Residual(channels, activation, depthwise=True),
                  "concat": lambda: ConcatBranches(channels, activation),
                  "split": lambda: SplitBranches(channels, activation)}
        self.blocks = nn.Sequential(*[makers[b]() for b in blocks])
        self.head_kind = head
        self.pool = nn.AdaptiveAvgPool2d(2 if head == "flatten" else 1)
        self.fc = nn.Linear(channels * (4 if head == "flatten" else 1), classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.pool(self.blocks(self.stem(x)))
        return self.fc(torch.flatten(y, 1))


class HandAttention(nn.Module):
    """Multi-head self-attention written out the way many research repos do."""

    def __init__(self, dim: int, heads: int, scale_first: bool) -> None:
        super().__init__()
        self.heads, self.head_dim, self.scale_first = heads, dim // heads, scale_first
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        return x.view(b, s, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        q, k, v = self.split(self.q(x)), self.split(self.k(x)), self.split(self.v(x))
        if self.scale_first:
            scores = (q / math.sqrt(self.head_dim)) @ k.transpose(-2, -1)
        else:
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.head_dim)
        if mask is not None:
            scores = scores + mask
        out = torch.softmax(scores, dim=-1) @ v
        b, _, s, _ = out.shape
        return self.o(out.transpose(1, 2).reshape(b, s, self.heads * self.head_dim))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, activation: str, scale_first: bool) -> None:
        super().__init__()
        self.attn = HandAttention(dim, heads, scale_first)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), ACTIVATIONS[activation](), nn.Linear(hidden, dim))
        self.drop = nn.Dropout(0.1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, mask)))
        return self.norm2(x + self.drop(self.mlp(x)))


class Transformer(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int, depth: int, activation: str,
                 scale_first: bool, masked: bool) -> None:
        super().__init__()
        self.masked = masked
        self.layers = nn.ModuleList(TransformerBlock(dim, heads, hidden, activation, scale_first)
                                    for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask = None
        if self.masked:  # causal additive mask built from the input's length
            s = x.shape[1]
            mask = torch.triu(torch.full((s, s), -1e4, device=x.device), diagonal=1)
        for layer in self.layers:
            x = layer(x, mask)
        return x


class MaskedEncoder(nn.Module):
    """Token embeddings + learned positions → "attn" blocks with a key-padding mask → a head.

    head: "mean" (masked mean-pool), "first" (position 0's state), "tokens" (every token's state)."""

    def __init__(self, vocab: int, max_len: int, dim: int, heads: int, hidden: int, depth: int, activation: str,
                 scale_first: bool, head: str) -> None:
        super().__init__()
        self.head = head
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(max_len, dim))
        self.norm = nn.LayerNorm(dim)
        self.layers = nn.ModuleList(TransformerBlock(dim, heads, hidden, activation, scale_first)
                                    for _ in range(depth))

    def forward(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.norm(self.embed(ids) + self.position[: ids.shape[1]])
        keys = (1.0 - attention_mask[:, None, None, :].float()) * -1e4     # exp underflows to 0: keys ignored
        for layer in self.layers:
            x = layer(x, keys)
        if self.head == "tokens":
            return x
        if self.head == "first":
            return x[:, 0]
        weights = attention_mask.unsqueeze(-1).float()
        return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


def _float_inputs(*tail: int) -> Callable[[int, int], tuple[torch.Tensor, ...]]:
    def make(batch: int, seed: int) -> tuple[torch.Tensor, ...]:
        return (torch.randn((batch, *tail), generator=torch.Generator().manual_seed(seed)),)
    return make


@st.composite
def mlp_cases(draw: st.DrawFn) -> ModelCase:
    depth = draw(st.integers(1, 4))
    widths = [draw(st.integers(1, 48)) for _ in range(depth + 1)]
    activation = draw(st.sampled_from(sorted(ACTIVATIONS)))
    layer_norm, dropout = draw(st.booleans()), draw(st.booleans())
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = randomize_(MLP(widths, activation, layer_norm, dropout), seed)
    return ModelCase("mlp", model, _float_inputs(widths[0]),
                     f"widths={widths} act={activation} ln={layer_norm} dropout={dropout} seed={seed}")


@st.composite
def cnn_cases(draw: st.DrawFn) -> ModelCase:
    in_channels = draw(st.integers(1, 3))
    channels = draw(st.integers(2, 12))
    blocks = draw(st.lists(st.sampled_from(["residual", "depthwise", "concat", "split"]), max_size=3))
    activation = draw(st.sampled_from(["relu", "gelu", "silu", "identity"]))
    head = draw(st.sampled_from(["flatten", "global"]))
    size = draw(st.integers(4, 10))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = randomize_(CNN(in_channels, channels, blocks, activation, draw(st.integers(1, 10)), head), seed)
    return ModelCase("cnn", model, _float_inputs(in_channels, size, size),
                     f"cin={in_channels} c={channels} blocks={blocks} act={activation} head={head} "
                     f"size={size} seed={seed}")


@st.composite
def attention_cases(draw: st.DrawFn) -> ModelCase:
    heads = draw(st.integers(1, 4))
    dim = heads * draw(st.integers(2, 8))
    hidden = draw(st.integers(4, 48))
    depth = draw(st.integers(1, 2))
    activation = draw(st.sampled_from(["relu", "gelu", "gelu_tanh", "silu"]))
    scale_first, masked = draw(st.booleans()), draw(st.booleans())
    seq = draw(st.integers(1, 12))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = randomize_(Transformer(dim, heads, hidden, depth, activation, scale_first, masked), seed)
    return ModelCase("attn", model, _float_inputs(seq, dim),
                     f"dim={dim} heads={heads} hidden={hidden} depth={depth} act={activation} "
                     f"scale_first={scale_first} masked={masked} seq={seq} seed={seed}")


@st.composite
def masked_encoder_cases(draw: st.DrawFn, outputs: tuple[str, ...] = ("mean", "first")) -> MaskedEncoder:
    """A random `MaskedEncoder` (tiny: it is captured and checked once per example)."""
    heads = draw(st.integers(1, 2))
    dim = heads * draw(st.integers(2, 6))
    seed = draw(st.integers(0, 2**16))
    torch.manual_seed(seed)
    model = MaskedEncoder(vocab=20, max_len=16, dim=dim, heads=heads, hidden=draw(st.integers(4, 24)),
                          depth=draw(st.integers(1, 2)), activation=draw(st.sampled_from(["relu", "gelu", "silu"])),
                          scale_first=draw(st.booleans()), head=draw(st.sampled_from(outputs)))
    return randomize_(model, seed).eval()


def models() -> st.SearchStrategy[ModelCase]:
    """Any of the random model families."""
    return st.one_of(mlp_cases(), cnn_cases(), attention_cases())


def tensor_digest(model: nn.Module) -> dict[str, object]:
    """Everything about a module that optimize() must leave alone: tensors, flags, grads."""
    digest: dict[str, object] = {name: (t.detach().clone(), t.requires_grad)
                                 for name, t in list(model.named_parameters()) + list(model.named_buffers())}
    digest["__training__"] = tuple(m.training for m in model.modules())
    return digest


def same_digest(a: dict[str, object], b: dict[str, object]) -> bool:
    if a.keys() != b.keys():
        return False
    for key, value in a.items():
        other = b[key]
        if isinstance(value, tuple) and value and isinstance(value[0], torch.Tensor):
            if not (torch.equal(value[0], other[0]) and value[1] == other[1]):
                return False
        elif value != other:
            return False
    return True
