"""export_onnx on architectures the sweep (bench/sweep.py) found failing: tiny configs, random weights."""
from __future__ import annotations

import onnx
import pytest
import torch

import graphopt
from graphopt.engine.verify import LOSSLESS_REL_TOL

from .helpers import rel_err, run

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def rotary_decoder():
    """A one-layer Mistral (rotary embeddings, grouped-query attention), built from a config."""
    torch.manual_seed(0)
    config = transformers.MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.MistralModel(config).eval()


def test_rotary_decoder_exports_at_opset_23_and_runs_at_other_batches(tmp_path, rotary_decoder):
    """The exporter fuses the rotary pattern into RotaryEmbedding with caches of batch 1 (they come from
    position ids [1, S]), which ONNX Runtime refuses at any other batch; the export expands them."""
    ids = torch.randint(0, 64, (2, 8))
    path = graphopt.export_onnx(rotary_decoder, (), tmp_path / "mistral.onnx", opset=23,
                                example_kwargs={"input_ids": ids, "use_cache": False})
    ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    assert "RotaryEmbedding" in ops                       # the fused kernel is kept
    for batch, length in ((3, 8), (1, 5)):
        other = torch.randint(0, 64, (batch, length))
        want = rotary_decoder(input_ids=other, use_cache=False).last_hidden_state.detach().numpy()
        (got,) = run(path, {"input_ids": other.numpy()})
        assert rel_err(got, want) <= LOSSLESS_REL_TOL


def test_runtime_refusal_is_an_export_error_naming_the_operator(tmp_path, rotary_decoder, monkeypatch):
    """Without the cache fix, ONNX Runtime's refusal becomes an ExportError that names the RotaryEmbedding
    node and the runtime's reason, and no file is written."""
    from graphopt.passes.onnx import RotaryCachesAtBatch
    monkeypatch.setattr(RotaryCachesAtBatch, "rewrite", lambda self, model, log: None)
    ids = torch.randint(0, 64, (2, 8))
    with pytest.raises(graphopt.ExportError, match="RotaryEmbedding node .*cos_cache"):
        graphopt.export_onnx(rotary_decoder, (), tmp_path / "mistral.onnx", opset=23,
                             example_kwargs={"input_ids": ids, "use_cache": False})
    assert not list(tmp_path.iterdir())


def test_t5_attention_contiguity_survives_the_export(tmp_path):
    """T5's `transpose(attention).contiguous()` then reshape: torch.onnx's decomposition dropped the
    contiguous and refused the view after it ("Cannot view a tensor with shape [B, S, 4, 8]"). The export
    writes it as a clone on a copy of the graph; the optimized module keeps its own graph."""
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=64, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4)
    model = transformers.T5EncoderModel(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    opt = graphopt.optimize(model, (), example_kwargs={"input_ids": ids}, level="O1", measure_latency=False,
                            progress=False)
    contiguous = torch.ops.aten.contiguous.default
    before = sum(node.target is contiguous for node in opt.graph_module.graph.nodes)
    assert before                                         # the pattern under test is in the graph
    path = graphopt.export_onnx(opt, (), tmp_path / "t5.onnx", example_kwargs={"input_ids": ids})
    assert sum(node.target is contiguous for node in opt.graph_module.graph.nodes) == before
    other = torch.randint(0, 64, (3, 5))
    with torch.no_grad():
        want = model(input_ids=other).last_hidden_state.numpy()
    (got,) = run(path, {"input_ids": other.numpy()})
    assert rel_err(got, want) <= LOSSLESS_REL_TOL


def test_swin_window_attention_contiguity_survives_the_export_of_the_plain_model(tmp_path):
    """Swin's attention with several windows per image ([B·windows, 49, heads, D] transposed, contiguous, then
    reshaped): torch.onnx alone fails on the plain model ("Cannot view a tensor with shape [8, 49, 2, 12]");
    export_onnx captures it with the contiguity kept, and the file runs at another batch."""
    torch.manual_seed(0)
    config = transformers.SwinConfig(image_size=56, patch_size=4, embed_dim=24, depths=[1, 1], num_heads=[2, 4],
                                     window_size=7)
    model = transformers.SwinModel(config).eval()
    example = (torch.randn(2, 3, 56, 56),)
    with pytest.raises(Exception, match="Cannot view a tensor"):            # the failure this test is about
        torch.onnx.export(model, example, dynamo=True, verbose=False)
    path = graphopt.export_onnx(model, example, tmp_path / "swin.onnx")
    other = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        want = model(other).last_hidden_state.numpy()
    got = run(path, {"pixel_values": other.numpy()})[0]
    assert rel_err(got, want) <= LOSSLESS_REL_TOL


def test_a_rotary_form_the_default_runtime_refuses_is_written_without_rotary_embedding(tmp_path, rotary_decoder,
                                                                                        monkeypatch):
    """Where ONNX Runtime's default (full) optimizations refuse the opset-23 RotaryEmbedding form (the sweep saw
    it on Llama), the file is written at opset 22, whose rotation is plain ops; the outputs still match."""
    import graphopt.onnx.export as export
    refusals = []
    monkeypatch.setattr(export, "_refused_fully_optimized",
                        lambda model, feeds: refusals.append(1) or any(n.op == "RotaryEmbedding"
                                                                       for n in model.graph.nodes))
    opt = graphopt.optimize(rotary_decoder, example_kwargs={"input_ids": torch.randint(0, 64, (2, 8)),
                                                            "use_cache": False},
                            quantize="int8-weight-only", measure_latency=False, progress=False)   # opset 23
    ids = torch.randint(0, 64, (2, 8))
    path = graphopt.export_onnx(opt, (), tmp_path / "m.onnx", example_kwargs={"input_ids": ids, "use_cache": False})
    model = onnx.load(str(path))
    assert refusals and "RotaryEmbedding" not in [n.op_type for n in model.graph.node]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) == 22
    want = opt(input_ids=ids, use_cache=False).last_hidden_state.detach().numpy()
    (got,) = run(path, {"input_ids": ids.numpy()})
    # the int8 module's own distance to the float model widens the export's tolerance (export._budget)
    assert rel_err(got, want) <= export._budget(opt, "int8-weight-only").max_rel_err
