"""The benchmark's model repository: the shipped default model and a ResNet-20 (3x32x32).

The ResNet-20 is ``training.architectures.create_model("resnet20", ...)`` with random weights,
exported by ``training.export.export_model`` (dynamic batch axis, parity check, metadata) on
random held-out data: it is not accurate, only the right shape and cost. Needs torch (the
bench may import it; the service never does).

    python bench/make_models.py bench/.models
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = ROOT / "models" / "digits" / "1" / "model.onnx"


def build_repository(dest: Path) -> Path:
    """``dest/digits/1`` (a copy of the default model) and ``dest/resnet20/1``; kept if there."""
    digits = dest / "digits" / "1" / "model.onnx"
    if not digits.is_file():
        digits.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEFAULT_MODEL, digits)
    if not (dest / "resnet20" / "1" / "model.onnx").is_file():
        export_resnet20(dest)
    return dest


def export_resnet20(root: Path) -> Path:
    """Random-weight ResNet-20 for 3x32x32 images, exported with its metadata."""
    import torch

    from service.metadata import Preprocessing
    from training.architectures import create_model
    from training.export import export_model

    torch.manual_seed(0)
    model = create_model("resnet20", in_channels=3, image_size=(32, 32)).eval()
    val_x = torch.randn(64, 3, 32, 32)
    val_y = torch.randint(0, 10, (64,))
    result = export_model(
        model,
        name="resnet20",
        root=root,
        val_x=val_x,
        val_y=val_y,
        labels=[f"class{i}" for i in range(10)],
        preprocessing=Preprocessing(
            height=32, width=32, channels=3, mean=[0.5] * 3, std=[0.25] * 3
        ),
        architecture="resnet20",
        activation="relu",
        training={"note": "random weights, for benchmarks only"},
        version=1,
        overwrite=True,
        stats_samples=64,
    )
    return result.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder for the model repository")
    args = parser.parse_args()
    print(build_repository(args.dest))


if __name__ == "__main__":
    main()
