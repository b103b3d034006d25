"""Model in: what the user has becomes a captured graph and the inputs to check it on.

`loaders` reads every MODEL form (Hugging Face folder, safetensors, TorchScript, `.pt2`, pickle,
`module:factory`, ONNX); `datasets` turns `--input-shape` and `--calibration` files (text, images, `.npz`,
`.pt`) into batches; `capture` exports an `nn.Module` with `torch.export` into an FX graph of ATen ops with a
symbolic batch; `inputs` builds the verification inputs every pass is checked on.
"""
