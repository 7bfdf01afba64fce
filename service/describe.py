"""``python -m service describe MODEL.onnx``: write the model's ``config.json``.

For a classifier exported without our metadata (docs/models.md): the input size and channels
are read from the model's input shape where they are fixed, ``--preset imagenet`` fills in
ImageNet's standard preprocessing (torchvision's ``Resize(256)``, ``CenterCrop(224)``, RGB,
NCHW, [0, 1], ImageNet mean and std), ``--labels FILE`` names a labels file (one per line).
Written beside the model: ``<name>/config.json`` when the file is at
``<name>/<version>/model.onnx`` (the configuration of every version), else ``config.json`` in
its folder; ``--out`` says where instead. Prints what it wrote.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import onnx

from service.model_config import CONFIG_FILENAME, ModelConfig

# torchvision's ImageNet evaluation transforms (e.g. ResNet50_Weights.IMAGENET1K_V1.transforms).
IMAGENET_PRESET: dict[str, Any] = {
    "resize_mode": "shorter_side",
    "resize_size": 256,
    "height": 224,
    "width": 224,
    "channels": 3,
    "channel_order": "RGB",
    "layout": "NCHW",
    "scale": 1.0 / 255.0,
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "resize": "bilinear",
}
PRESETS = {"imagenet": IMAGENET_PRESET}


def get_args_parser() -> argparse.ArgumentParser:
    """The command line of ``python -m service describe``."""
    parser = argparse.ArgumentParser(
        prog="python -m service describe",
        description="Write a model's config.json (labels, preprocessing) for the service.",
    )
    parser.add_argument("model", type=Path, help="the ONNX model file")
    parser.add_argument("--labels", type=Path, help="a text file of the class labels, one per line")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="standard preprocessing to fill in (imagenet: resize 256, centre-crop 224, "
        "mean/std of ImageNet)",
    )
    parser.add_argument(
        "--out",
        type=Path,
        help="where to write (default: <name>/config.json for <name>/<version>/model.onnx, "
        "else config.json beside the model)",
    )
    return parser


def default_out(model: Path) -> Path:
    """``<name>/config.json`` for ``<name>/<version>/model.onnx``, else beside the model."""
    folder = model.resolve().parent
    if folder.name.isdigit() and int(folder.name) >= 1:
        return folder.parent / CONFIG_FILENAME
    return folder / CONFIG_FILENAME


def input_preprocessing(model: onnx.ModelProto) -> dict[str, Any]:
    """Channels, height, width and layout read from the graph's input where fixed."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if len(inputs) != 1:
        return {}
    dims: list[int | None] = [
        d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
        for d in inputs[0].type.tensor_type.shape.dim
    ]
    if len(dims) != 4:
        return {}
    if dims[1] in (1, 3):
        found = {"layout": "NCHW", "channels": dims[1], "height": dims[2], "width": dims[3]}
    elif dims[3] in (1, 3):
        found = {"layout": "NHWC", "channels": dims[3], "height": dims[1], "width": dims[2]}
    else:
        return {}
    return {k: v for k, v in found.items() if v is not None}


def describe(
    model_path: Path, labels: Path | None = None, preset: str | None = None
) -> dict[str, Any]:
    """The configuration for ``model_path``: the preset, then what the input shape fixes."""
    model = onnx.load(str(model_path), load_external_data=False)
    prep: dict[str, Any] = dict(PRESETS[preset]) if preset else {}
    from_shape = input_preprocessing(model)
    prep.update(from_shape)
    if preset and from_shape.get("channels") == 1:  # a grayscale model: one mean and std
        prep["mean"], prep["std"] = prep["mean"][:1], prep["std"][:1]
    if prep.get("resize_size") and min(prep.get("height", 1), prep.get("width", 1)) > int(
        prep["resize_size"]
    ):  # a bigger input than the preset's crop: keep the preset's ratio 256/224
        prep["resize_size"] = round(min(prep["height"], prep["width"]) * 256 / 224)
    config: dict[str, Any] = {}
    if labels is not None:
        config["labels"] = str(labels)
    if prep:
        config["preprocessing"] = prep
    return config


def main(argv: list[str]) -> int:
    """Write the config.json and print it; 2 on a bad command line or model file."""
    args = get_args_parser().parse_args(argv)
    if not args.model.is_file():
        sys.stderr.write(f"error: {args.model} is not a file\n")
        return 2
    out: Path = args.out or default_out(args.model)
    labels = args.labels
    if labels is not None:  # written relative to the config's folder, as it is read
        labels = Path(os.path.relpath(labels.resolve(), out.resolve().parent))
    try:
        config = describe(args.model, labels, args.preset)
    except Exception as exc:  # noqa: BLE001 - onnx's decode errors have no common base
        sys.stderr.write(f"error: cannot read {args.model} as an ONNX model ({exc})\n")
        return 2
    ModelConfig.model_validate(config)  # what we write, the service reads
    text = json.dumps(config, indent=2) + "\n"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text, encoding="utf-8")
    sys.stdout.write(f"wrote {out}:\n{text}")
    if "preprocessing" not in config:
        sys.stdout.write(
            "note: no preprocessing: the input shape is not an image's; images will be refused "
            "(send tensors, or add preprocessing to the file: docs/models.md)\n"
        )
    return 0
