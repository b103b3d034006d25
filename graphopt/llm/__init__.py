"""Large language models: capture a Hugging Face causal LM for generation with a static KV cache.

    lm = graphopt.optimize(model, example_kwargs={"input_ids": ids}, generation=True, max_cache_len=128)
    lm.generate(ids, max_new_tokens=32)

decoder: the decoder step as a pure function · capture: export it once for prefill and decode ·
generate: the generation loop · metrics: tokens and perplexity · module: optimize and the returned module ·
onnx: the ONNX Runtime step and its generation loop.
"""
from .module import GenerationModule, optimize_for_generation

__all__ = ["GenerationModule", "optimize_for_generation"]
