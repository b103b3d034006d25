"""Real model code: Hugging Face BERT (hand-written "eager" attention), ViT and ResNet
from small configs, random weights, optimized at O1 and compared on fresh inputs."""
from __future__ import annotations

import pytest
import torch

from .helpers import count, fuse, randn

transformers = pytest.importorskip("transformers")


def bert():
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, attn_implementation="eager")
    torch.manual_seed(0)

    def make_inputs(seed: int):
        ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(seed))
        mask = torch.ones(2, 8, dtype=torch.long)
        mask[0, 5 + seed % 3:] = 0
        return ids, mask
    return transformers.BertModel(config).eval(), make_inputs


def vit():
    config = transformers.ViTConfig(image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=1,
                                    num_attention_heads=4, intermediate_size=64, attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.ViTModel(config).eval(), lambda s: (randn(2, 3, 16, 16, seed=s),)


def resnet():
    config = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1])
    torch.manual_seed(0)
    model = transformers.ResNetModel(config).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():   # non-trivial statistics, so a wrong fold would show
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model, lambda s: (randn(2, 3, 32, 32, seed=s),)


def test_bert_attention_becomes_sdpa_and_qkv_merge():
    opt = fuse(*bert())
    assert count(opt, "scaled_dot_product_attention") == 1   # one layer
    assert opt.report.matches().get("merged 3× linear") == 1   # Q/K/V


def test_vit_attention_becomes_sdpa_and_qkv_merge():
    opt = fuse(*vit())
    assert count(opt, "scaled_dot_product_attention") == 1
    assert opt.report.matches().get("merged 3× linear") == 1


def test_resnet_batchnorms_fold():
    model, make_inputs = resnet()
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    opt = fuse(model, make_inputs)
    assert count(opt, "batchnorm→conv2d") == n_bn
