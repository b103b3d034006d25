"""MODEL forms and calibration data read from tiny files: a .safetensors beside its config, image folders."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from graphopt import InputError
from graphopt.cli import main
from graphopt.frontend.datasets import read_batches
from graphopt.frontend.loaders import LoadedModel, load

transformers = pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")


@pytest.fixture(scope="module")
def bert_weights(tmp_path_factory) -> Path:
    """A 1-layer BERT (hidden 16, 12 positions) saved as config.json + model.safetensors."""
    folder = tmp_path_factory.mktemp("st")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, max_position_embeddings=12)
    transformers.BertModel(config).save_pretrained(folder)
    assert (folder / "model.safetensors").is_file()
    return folder


def test_safetensors_beside_its_config_optimizes_to_the_same_function(bert_weights, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "st.onnx"
    assert main(["optimize", str(bert_weights / "model.safetensors"), "-o", str(out), "--level", "O1",
                 "--quiet", "--no-speed-check"]) == 0
    reference = transformers.BertModel.from_pretrained(bert_weights).eval()
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["last_hidden_state", "pooler_output"]
    ids = torch.randint(0, 40, (3, 12), generator=torch.Generator().manual_seed(1))   # inputs from the config
    feeds = {"input_ids": ids.numpy(), "attention_mask": np.ones((3, 12), np.int64),
             "token_type_ids": np.zeros((3, 12), np.int64)}
    got = session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})
    want = reference(**{k: torch.from_numpy(feeds[k]) for k in ("input_ids", "attention_mask", "token_type_ids")})
    np.testing.assert_allclose(got[0], want.last_hidden_state.detach().numpy(), rtol=1e-4, atol=1e-5)  # fp32 sums


def test_safetensors_base_weights_load_into_a_task_model_and_say_what_is_missing(bert_weights):
    with pytest.warns(UserWarning, match=r"lacks 2 tensor\(s\) of BertForSequenceClassification"):
        loaded = load(str(bert_weights / "model.safetensors"), task="text-classification")
    base = transformers.BertModel.from_pretrained(bert_weights)
    assert loaded.kind == "safetensors" and loaded.hf_config.vocab_size == 40
    assert torch.equal(loaded.module.bert.embeddings.word_embeddings.weight, base.embeddings.word_embeddings.weight)


def test_safetensors_without_a_config_says_where_it_must_be(bert_weights, tmp_path):
    lone = tmp_path / "model.safetensors"
    os.link(bert_weights / "model.safetensors", lone)
    with pytest.raises(InputError, match="config.json must be beside it"):
        load(str(lone))


def _images(folder: Path, count: int) -> list[np.ndarray]:
    """`count` random RGB images of different sizes, saved as PNG (lossless) and returned as arrays."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = []
    for i in range(count):
        array = rng.integers(0, 256, (10 + i, 12, 3), dtype=np.uint8)
        PIL.fromarray(array).save(folder / f"{i}.png")
        arrays.append(array)
    return arrays


def test_an_image_folder_becomes_resized_batches_of_full_size(tmp_path):
    arrays = _images(tmp_path / "images", 5)
    loaded = LoadedModel("net.py:build", "factory", "Net")
    batches = read_batches(str(tmp_path / "images"), loaded, ["x"], {None: (3, 8, 8)}, batch_size=2)
    assert [tuple(b["x"].shape) for b in batches] == [(2, 3, 8, 8), (2, 3, 8, 8)]   # the 5th: no full batch
    expected = np.asarray(PIL.fromarray(arrays[1]).resize((8, 8)), np.float32).transpose(2, 0, 1) / 255
    np.testing.assert_array_equal(batches[0]["x"][1].numpy(), expected)
    with pytest.raises(Exception, match="--input-shape C,H,W"):
        read_batches(str(tmp_path / "images"), loaded, ["x"], {}, batch_size=2)


def test_an_image_folder_uses_the_hugging_face_image_processor(tmp_path):
    folder = tmp_path / "vit"
    folder.mkdir()
    processor = transformers.ViTImageProcessor(size={"height": 8, "width": 8})
    processor.save_pretrained(folder)
    arrays = _images(tmp_path / "images", 2)
    loaded = LoadedModel(str(folder), "hf-folder", "vit", folder=folder)
    (batch,) = read_batches(str(tmp_path / "images"), loaded, ["pixel_values"], {}, batch_size=2)
    want = processor(images=[PIL.fromarray(a) for a in arrays], return_tensors="pt")["pixel_values"]
    assert batch["pixel_values"].shape == (2, 3, 8, 8)
    torch.testing.assert_close(batch["pixel_values"], want)


NET = """
import torch

class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.head = torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))

def build():
    torch.manual_seed(0)
    return Net().eval()
"""


def test_images_as_calibration_for_a_factory_on_the_command_line(tmp_path, monkeypatch, capsys):
    _images(tmp_path / "images", 4)
    (tmp_path / "net.py").write_text(NET)
    monkeypatch.chdir(tmp_path)
    assert main(["optimize", "net.py:build", "-o", "net.onnx", "--calibration", "images", "--input-shape", "3,8,8",
                 "--batch-size", "2", "--level", "O1", "--no-speed-check", "--output-names", "scores"]) == 0
    assert "2 calibration batch(es) from images" in capsys.readouterr().err
    graph = onnx.load(str(tmp_path / "net.onnx")).graph
    assert [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim] == ["batch", 3, 8, 8]
    assert [o.name for o in graph.output] == ["scores"]
