"""int8 versions of the exported graphs.

Matrix products (transformer and projection weights) and embedding tables: onnxruntime's dynamic
quantization, int8 weights per output channel and activations quantized per batch at run time
(MatMulInteger). Weights use 7 bits of range (`reduce_range`): on x86 CPUs without VNNI,
onnxruntime's u8 x s8 kernels add pairs of products in 16 bits, which full-range weights overflow;
on this kind of CPU the MiniLM text tower's mean cosine to fp32 drops from 0.99 to 0.96 without it.

Convolutions: int8 weights per output channel, dequantized inside the graph, so the convolution runs
in fp32. Dynamic quantization of convolutions (ConvInteger) ran EfficientNet-Lite0 8x slower than
fp32 on onnxruntime's CPU kernels, and static (calibrated QDQ) quantization either overflows as above
(mean cosine 0.82) or, with u8 weights, is slower than fp32. The int8 file is 4x smaller; for fp32
speed onnxruntime must fold the weight dequantization into constants when it loads the graph, which
it does with its QDQ fusions disabled (SESSION_CONFIG, recorded in export.json and applied by
OnnxClip; without it the convolutions lose weight prepacking and run about 3x slower).
"""
from __future__ import annotations

import contextlib
import io
import logging
import tempfile
from pathlib import Path

import numpy as np

DYNAMIC_OPS = ("MatMul", "Gemm", "Gather")
SESSION_CONFIG = {"session.disable_quant_qdq": "1"}


def _conv_weight_names(graph) -> dict[str, int]:
    """Initializers used only as the weight input of Conv nodes -> how many Conv nodes use them."""
    uses: dict[str, list[str]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            uses.setdefault(name, []).append(node.op_type if (node.op_type == "Conv" and i == 1) else "other")
    initializers = {init.name for init in graph.initializer}
    return {name: len(kinds) for name, kinds in uses.items()
            if name in initializers and kinds and all(k == "Conv" for k in kinds)}


def int8_conv_weights(model) -> int:
    """Replace each fp32 Conv weight by int8 values, per-output-channel scales and a DequantizeLinear node.

    Symmetric quantization (zero point 0, range -127..127) per output channel. Returns how many
    weights were replaced. The model is changed in place.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    targets = _conv_weight_names(graph)
    replaced, new_nodes = 0, []
    for init in list(graph.initializer):
        if init.name not in targets:
            continue
        w = numpy_helper.to_array(init)
        if w.dtype != np.float32 or w.ndim < 2:
            continue
        absmax = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
        scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
        q = np.clip(np.round(w / scale.reshape(-1, *([1] * (w.ndim - 1)))), -127, 127).astype(np.int8)
        base = init.name
        graph.initializer.remove(init)
        graph.initializer.extend([
            numpy_helper.from_array(q, f"{base}__int8"),
            numpy_helper.from_array(scale, f"{base}__scale"),
            numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), f"{base}__zero_point"),
        ])
        # The node's output takes the weight's old name, so the Conv nodes need no change.
        inputs = [f"{base}__int8", f"{base}__scale", f"{base}__zero_point"]
        new_nodes.append(helper.make_node("DequantizeLinear", inputs, [base], name=f"{base}__dequantize", axis=0))
        replaced += 1
    # Inputs of the new nodes are initializers, so they may come first in topological order.
    for node in reversed(new_nodes):
        graph.node.insert(0, node)
    return replaced


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizer prints shape-inference notes (whole tensor protos) to stdout, and warns on the
    root logger that static-quantization pre-processing was not run (it does not apply to dynamic quantization)."""
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def quantize_graph(src: str | Path, dst: str | Path) -> dict:
    """Write the int8 version of the fp32 graph `src` to `dst`; returns what was quantized."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        dynamic_path = Path(tmp) / "dynamic.onnx"
        with _quiet():
            quantize_dynamic(
                str(src), str(dynamic_path), weight_type=QuantType.QInt8, per_channel=True, reduce_range=True,
                op_types_to_quantize=list(DYNAMIC_OPS),
                extra_options={"MatMulConstBOnly": True},
            )
        model = onnx.load(str(dynamic_path))
    conv_weights = int8_conv_weights(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(dst))
    return {"method": describe(model, conv_weights), "conv_weights_int8": conv_weights}


def describe(model, conv_weights: int) -> str:
    """What the int8 graph quantizes, in words (for export.json and the report)."""
    ops = [node.op_type for node in model.graph.node]
    parts = []
    if ops.count("MatMulInteger"):
        parts.append(f"{ops.count('MatMulInteger')} matrix products dynamic int8 (per-channel 7-bit weights)")
    quantized_tables = sum(1 for node in model.graph.node
                           if node.op_type == "Gather" and node.input[0].endswith("_quantized"))
    if quantized_tables:
        parts.append(f"{quantized_tables} embedding table(s) int8")
    if conv_weights:
        parts.append(f"{conv_weights} convolution weights int8, computed in fp32")
    return "; ".join(parts) or "nothing quantizable"
