"""Peak memory while optimizing for generation stays under 2.5× the fp32 model (no stack of deep copies)."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

#: The issue's bound: peak RSS while optimizing ≤ 2.5× the fp32 model's size (the model itself included).
MAX_RATIO = 2.5


#: int8-weight-only measured 6.1-6.7× before its whole-weight float temporaries (the grid check, the int8 codes,
#: the int8-weight CPU matmul, on the 32000-row head and embedding table) went a block of rows at a time: 2.2×.
#: With an accuracy budget the int8 pass's sensitivity copies were deep copies (one per layer quantized alone):
#: 14.5× on a 4-layer 1.2 GB Llama, before they shared the graph's weights.
@pytest.mark.parametrize("quantize", ["none", "int8-weight-only", "int8-weight-only+budget",
                                      "int4-weight-only+budget"])
def test_peak_rss_while_optimizing(quantize):
    script = Path(__file__).with_name("memory_probe.py")
    done = subprocess.run([sys.executable, str(script), quantize], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ratio = float(re.search(r"ratio=([0-9.]+)", done.stdout).group(1))
    assert ratio <= MAX_RATIO, done.stdout


#: Exporting the O1 generation module to ONNX: the model, torch.onnx's proto, the graph's arrays (once: copies,
#: ONNX Runtime sessions and onnx_ir share them) and one session's repacked weights, with allocator slack:
#: measured 5.5×. Before the weights were shared, every session, pass and check held its own copy: 9.5× here,
#: and a 1.1B-parameter decoder's export was killed for memory at 24 GB.
MAX_EXPORT_RATIO = 6.5


def test_peak_rss_while_exporting_a_decoder_to_onnx():
    script = Path(__file__).with_name("memory_probe.py")
    done = subprocess.run([sys.executable, str(script), "export"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    ratio = float(re.search(r"ratio=([0-9.]+)", done.stdout).group(1))
    assert ratio <= MAX_EXPORT_RATIO, done.stdout
