"""Deployment export: CLIP checkpoints as ONNX image and text graphs (fp32 and int8), and prediction from them.

An export directory holds `image.onnx` and `text.onnx` (plus `*.int8.onnx` when quantized), the
tokenizer files and `export.json`, which says how to feed the graphs. Everything needed to run an
export (`clipforge.export.onnx_runtime`, `.preprocess`, `.text`, `.manifest`) depends only on
onnxruntime, numpy, Pillow and tokenizers, so that a deployment image needs no PyTorch; this package
therefore imports nothing at import time.
"""
