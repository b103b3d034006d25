"""Int8 rewriting (level O2).

    smoothquant      (W8A8 with calibration data) float-exact: activation outliers
                     migrated into the weights, see smoothquant.py
    int8_dynamic | int8_static | int8_weight_only
                     linears onto torch.ops.graphopt int8 kernels, with calibration,
                     accuracy-aware fallback and a per-layer report, see rewrite.py
    int8_embeddings  lookup tables stored as per-row int8 (any scheme), see embedding.py
    fuse_layer_norm_quantize
                     (CUDA graphs) a LayerNorm and the per-token quantization it feeds
                     as one kernel, see fuse_norm.py

The options (`quantize`, `calibration_data`, `accuracy_budget`,
`quantize_options`) are documented and validated in config.py.
"""
from __future__ import annotations

from typing import Any

from .config import QuantConfig, parse


def passes(options: Any) -> list[Any]:
    """The int8 passes for `options.quantize` (a scheme name) and `options.quantize_options`."""
    config: QuantConfig = parse(options)
    from .embedding import QuantizeEmbeddings
    from .fuse_norm import FuseLayerNormQuantize
    from .rewrite import QuantizeLinears          # imports graphopt.kernels (the custom ops)
    from .smoothquant import SmoothQuant
    return ([SmoothQuant(config)] if config.smoothquant else []) + [QuantizeLinears(config), QuantizeEmbeddings(config),
                                                              FuseLayerNormQuantize()]
