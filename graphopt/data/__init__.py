"""Bundled models: `zoo` (the digits CNN and its trained weights, `digits_resnet.pt`, used by the demo, the
tests and the benchmarks)."""
