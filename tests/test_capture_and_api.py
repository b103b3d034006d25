"""Capture and the public `optimize` entry point: both forms, structures, bad input."""
import inspect
import warnings

import pytest
import torch
import torch.nn as nn

import graphopt
from graphopt.errors import CaptureError, InputError, OptionError, UnsupportedError
from tests.strategies import CNN, randomize_, same_digest, tensor_digest


def small_cnn():
    torch.manual_seed(0)
    return randomize_(CNN(1, 8, ["residual", "concat"], "relu", 10, "flatten"), 0)


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3)

    def forward(self, x, *, scale):
        y = self.lin(x)
        return {"logits": y * scale, "pair": (y, y.sum(-1))}


def test_eager_and_lazy_forms_agree_and_keep_the_model_untouched():
    model = small_cnn().train()   # a training flag the caller chose must survive
    digest = tensor_digest(model)
    x = torch.randn(4, 1, 8, 8)
    eager = graphopt.optimize(model, (x,), progress=False)
    lazy = graphopt.optimize(model, progress=False)
    assert not lazy.captured
    y_lazy = lazy(x)
    assert lazy.captured and lazy.report.records
    assert same_digest(digest, tensor_digest(model)) and model.training
    with torch.no_grad():
        expected = model.eval()(x)
    assert torch.allclose(eager(x), expected, rtol=1e-4, atol=1e-5)
    assert torch.allclose(y_lazy, expected, rtol=1e-4, atol=1e-5)


def test_dynamic_batch_accepts_other_batch_sizes():
    model = small_cnn()
    opt = graphopt.optimize(model, (torch.randn(4, 1, 8, 8),), progress=False)
    assert opt.report.meta["dynamic_batch"]
    for batch in (1, 7):
        x = torch.randn(batch, 1, 8, 8)
        with torch.no_grad():
            assert torch.allclose(opt(x), model(x), rtol=1e-4, atol=1e-5)


def test_kwargs_and_nested_output_structure_survive():
    model = DictOut().eval()
    x = torch.randn(3, 4)
    opt = graphopt.optimize(model, (x,), example_kwargs={"scale": torch.tensor(2.0)}, progress=False)
    out = opt(x, scale=torch.tensor(2.0))
    assert set(out) == {"logits", "pair"} and isinstance(out["pair"], tuple)
    assert torch.allclose(out["logits"], model(x, scale=torch.tensor(2.0))["logits"])
    with pytest.raises(InputError, match="structure"):
        opt(x, torch.tensor(2.0))


def test_hugging_face_bert_from_config_returns_its_model_output():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    ids = torch.randint(0, 120, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    opt = graphopt.optimize(model, example_kwargs={"input_ids": ids, "attention_mask": mask}, progress=False)
    assert not opt.report.rolled_back, opt.report
    ids3, mask3 = torch.randint(0, 120, (3, 9)), torch.ones(3, 9, dtype=torch.long)
    out = opt(input_ids=ids3, attention_mask=mask3)
    assert type(out).__name__ == "BaseModelOutputWithPoolingAndCrossAttentions"
    with torch.no_grad():
        ref = model(input_ids=ids3, attention_mask=mask3)
    assert torch.allclose(out.last_hidden_state, ref.last_hidden_state, rtol=1e-4, atol=1e-4)
    assert torch.allclose(out.pooler_output, ref.pooler_output, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("level", ["O1", "O2"])
def test_token_models_accept_other_sequence_lengths(level):
    """Integer inputs of rank ≥ 2 get a symbolic sequence dimension: captured at 9 tokens, run at 5 and 23."""
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    kwargs = {"input_ids": torch.randint(0, 120, (2, 9)), "attention_mask": torch.ones(2, 9, dtype=torch.long)}
    opt = graphopt.optimize(model, example_kwargs=kwargs, level=level, progress=False, measure_latency=False)
    for batch, seq in ((3, 5), (1, 23)):
        ids, mask = torch.randint(0, 120, (batch, seq)), torch.ones(batch, seq, dtype=torch.long)
        mask[0, seq // 2:] = 0
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).last_hidden_state
            got = opt(input_ids=ids, attention_mask=mask).last_hidden_state
        assert got.shape == want.shape
        cosine = torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert (torch.allclose(got, want, rtol=1e-4, atol=1e-4) if level == "O1" else cosine > 0.99), (level, seq)


def test_integer_inputs_whose_length_is_fixed_by_the_model_fall_back_to_a_dynamic_batch():
    """A model that needs exactly 6 tokens (a reshape into 2 × 3) is captured with a fixed sequence."""
    class FixedLength(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 4)

        def forward(self, ids):
            return self.embed(ids).reshape(ids.shape[0], 2, 3, 4).sum(2)

    model = FixedLength().eval()
    opt = graphopt.optimize(model, (torch.randint(0, 10, (2, 6)),), progress=False, measure_latency=False)
    ids = torch.randint(0, 10, (5, 6))
    assert torch.allclose(opt(ids), model(ids))


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:
            return x * 2
        return x - 1


def test_model_that_cannot_be_exported_raises_capture_error_with_hint():
    with pytest.raises(CaptureError) as info:
        graphopt.optimize(DataDependent(), (torch.randn(3, 4),), progress=False)
    assert info.value.reason and "data-dependent" in info.value.hint


@pytest.mark.parametrize("model, inputs, match", [
    ("not a module", (torch.randn(2),), "nn.Module"),
    (nn.Linear(4, 2), torch.randn(2, 4), "tuple of positional"),
    (nn.Linear(4, 2), ("text",), "no tensor"),
    (nn.Linear(4, 2), (torch.randn(2, 4), torch.randn(2, 4)), "do not fit"),
])
def test_bad_models_and_inputs_are_clear_errors(model, inputs, match):
    with pytest.raises(InputError, match=match):
        graphopt.optimize(model, inputs, progress=False)


def test_example_input_the_model_cannot_run_is_an_input_error():
    with pytest.raises(InputError, match="fails on the example inputs.*mat1 and mat2"):
        graphopt.optimize(nn.Linear(4, 2), (torch.randn(2, 5),), progress=False)


@pytest.mark.parametrize("options, match", [
    ({"level": "O7"}, "level="),
    ({"quantize": "int4"}, "not a scheme"),
    ({"prune": 1.5}, r"\[0, 1\)"),
    ({"level": "O1", "quantize": "int8-dynamic"}, "needs level O2"),
    ({"backend": "tvm"}, "backend="),
    ({"no_such_option": 1}, "unknown option"),
])
def test_bad_options_are_clear_errors(options, match):
    with pytest.raises(OptionError, match=match):
        graphopt.optimize(nn.Linear(4, 2), (torch.randn(2, 4),), **options)


def test_nan_in_example_inputs_warns_and_verifies_on_random_inputs():
    x = torch.randn(3, 4)
    x[0, 0] = float("nan")
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.2), nn.Linear(4, 2)).eval()
    with pytest.warns(UserWarning, match="NaN or inf"):
        opt = graphopt.optimize(model, (x,), progress=False)
    assert opt.report.final.max_rel_err is not None and opt.report.final.max_rel_err < 1e-4


def test_options_of_later_issues_are_clear_until_they_exist():
    # The families raise UnsupportedError until they land; once they exist this must not raise at all.
    for options in ({"quantize": "int8-dynamic"}, {"prune": 0.3}):
        try:
            graphopt.optimize(nn.Linear(32, 32), (torch.randn(4, 32),), progress=False, **options)
        except UnsupportedError as exc:
            assert "not available yet" in str(exc)


def test_a_shape_the_graph_was_not_captured_for_is_a_clear_input_error():
    model = nn.Sequential(nn.Linear(6, 3)).eval()
    opt = graphopt.optimize(model, (torch.randn(4, 6),), progress=False, measure_latency=False)
    with pytest.raises(InputError, match="shape the optimized graph accepts"):
        opt(torch.randn(4, 7))


class TakesKwargs(nn.Module):
    """A forward() with **kwargs, as Hugging Face models have (`use_cache=False` lands there)."""

    def __init__(self):
        super().__init__()
        self.embed, self.lin = nn.Embedding(20, 8), nn.Linear(8, 8)

    def forward(self, ids, mask=None, **kwargs):
        y = self.lin(self.embed(ids))
        return y * 2 if kwargs.get("double") else y


def test_keyword_inputs_that_land_in_var_kwargs_are_captured():
    """Regression: torch.export failed ("Must provide a tree_name …") on dynamic shapes for such keywords."""
    model = TakesKwargs().eval()
    ids = torch.randint(0, 20, (2, 5))
    opt = graphopt.optimize(model, (ids,), example_kwargs={"double": True}, progress=False, measure_latency=False)
    assert not opt.report.rolled_back, opt.report
    for batch, seq in ((2, 5), (3, 9)):
        ids = torch.randint(0, 20, (batch, seq))
        with torch.no_grad():
            assert torch.allclose(opt(ids, double=True), model(ids, double=True), rtol=1e-5, atol=1e-6)
    assert "kwargs" in inspect.signature(model.forward).parameters   # the caller's model keeps its signature
