"""The two towers of a CLIP model as separate ONNX graphs, each ending in L2 normalisation.

The TorchScript-based exporter (`dynamo=False`) is used: it needs nothing beyond torch and onnx,
and traces open_clip's timm and Hugging Face towers as they are; the torch.export-based exporter
needs onnxscript and does not add anything these static-shape graphs need.
"""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from clipforge.export.errors import ExportError

if TYPE_CHECKING:
    from clipforge.models.towers import OpenClipModel

IMAGE_INPUT, IMAGE_OUTPUT = "pixel_values", "image_embeds"
TEXT_INPUT, TEXT_OUTPUT = "input_ids", "text_embeds"
DEFAULT_OPSET = 17


class ImageEncoder(nn.Module):
    """[N, 3, H, W] normalised pixels -> [N, D] unit-length embeddings."""

    def __init__(self, model: OpenClipModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_image(pixel_values), dim=-1)


class TextEncoder(nn.Module):
    """[N, context_length] int64 token ids -> [N, D] unit-length embeddings (padding is masked in the graph)."""

    def __init__(self, model: OpenClipModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.model.encode_text(input_ids), dim=-1)


def export_graph(module: nn.Module, example: torch.Tensor, path: str | Path, input_name: str, output_name: str,
                 opset: int = DEFAULT_OPSET) -> Path:
    """Trace `module` on `example` into an ONNX file whose batch axis is dynamic."""
    # The exporter restores the wrapper's own train/eval flag afterwards, and a fresh wrapper is in
    # training mode: set eval here, or the model would be left with BatchNorm and dropout training.
    module.eval()
    path = Path(path)
    # nn.MultiheadAttention's fused inference kernel has no ONNX translation; the exporter needs the
    # plain operator path, which the fast path skips in eval mode without gradients.
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    with warnings.catch_warnings():
        # The legacy exporter announces its deprecation, and tracing warns about Python-level shape
        # arithmetic in the towers, which is constant for the fixed image size and context length.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # open_clip pools text at argmax positions, which are never negative.
        warnings.filterwarnings("ignore", message="Exporting aten::index operator", category=UserWarning)
        try:
            with torch.no_grad():
                torch.onnx.export(
                    module, (example,), str(path), dynamo=False, opset_version=opset, do_constant_folding=True,
                    input_names=[input_name], output_names=[output_name],
                    dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                )
        except torch.onnx.errors.OnnxExporterError as e:
            raise ExportError(f"{type(module).__name__} of this model cannot be exported to ONNX opset {opset}: "
                              f"{e}") from e
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    return path
