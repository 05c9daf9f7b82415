"""Export a trained model: ``.safetensors`` (weights + architecture) or ONNX (dynamic batch,
with the class names and the preprocessing in its metadata)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch

from .data.augment import IMAGENET_MEAN, IMAGENET_STD
from .data.decode import crop_label
from .errors import CvtLabError, check_creatable
from .inference import Predictor, load_predictor
from .models.pretrained import save_weights

FORMATS = {".safetensors": "safetensors", ".onnx": "onnx"}


def export(
    checkpoint: str | Path, out: str | Path, fmt: str | None = None, opset: int = 17
) -> Path:
    """Write ``checkpoint``'s model to ``out`` as ``fmt`` (``"safetensors"`` or ``"onnx"``; by
    default the one ``out``'s suffix names) and return the path written."""
    if fmt is None:
        fmt = FORMATS.get(Path(out).suffix.lower())
        if fmt is None:
            raise CvtLabError(f"--out {out}: name a .safetensors or .onnx file, or give --format")
    if fmt not in FORMATS.values():
        raise CvtLabError(f"--format must be safetensors or onnx, not {fmt!r}")
    if fmt == "onnx":
        try:
            import onnx  # noqa: F401  (PyTorch's exporter writes through it)
        except ImportError:
            raise CvtLabError(
                "--format onnx needs the onnx package (pip install 'cvtlab[onnx]')"
            ) from None
    predictor = load_predictor(checkpoint)
    model = predictor.model.eval()
    out = Path(out)
    if out.is_dir():
        raise CvtLabError(
            f"--out {out}: is a folder; name the file to write, e.g. {out}/model.{fmt}"
        )
    check_creatable(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "safetensors":
        return save_weights(model, out, predictor.class_names if predictor.names_known else None)
    example = torch.zeros(1, 3, predictor.img_size, predictor.img_size)
    tmp = out.with_name(out.name + ".tmp")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes about the input-size check
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    _write_onnx_metadata(tmp, predictor)
    tmp.replace(out)
    return out


def onnx_metadata(predictor: Predictor) -> dict[str, str]:
    """What a program running the ONNX file needs besides the graph: how to turn an image into
    the ``images`` input, and what the ``logits`` columns are (ONNX metadata holds strings)."""
    import cvtlab

    size = predictor.img_size
    meta = {
        "image_size": str(size),
        "mean": json.dumps(list(IMAGENET_MEAN)),
        "std": json.dumps(list(IMAGENET_STD)),
        "crop": str(predictor.crop),
        "preprocessing": (
            f"RGB; {crop_label(predictor.crop, size)} (antialiased resize); "
            "float32 pixels / 255, minus mean, divided by std, per channel; "
            f"(batch, 3, {size}, {size})"
        ),
        "output": "logits (batch, classes); softmax gives the class probabilities",
        "cvtlab_version": cvtlab.__version__,
    }
    if predictor.names_known:
        meta["class_names"] = json.dumps(predictor.class_names)
    name = getattr(predictor.model, "model_name", None)
    if name:
        meta["model"] = name
    return meta


def _write_onnx_metadata(path: Path, predictor: Predictor) -> None:
    import onnx

    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, onnx_metadata(predictor))
    onnx.save(model, str(path))
