"""service/model_config.py: config.json beside a model, its preprocessing against a numpy/PIL
oracle, over the metadata, the opt-in default, and ``python -m service describe``."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest
from fastapi.testclient import TestClient
from onnx import helper
from PIL import Image

from service.app import create_app
from service.core.repository import ModelLoadError, ModelRepository
from service.model_config import ModelConfig, read_model_config
from tests.server_helpers import REPO_ROOT, uvicorn_server
from tests.service.conftest import make_onnx_cnn, save_model
from tests.service.http_helpers import make_settings

MEAN = [0.485, 0.456, 0.406]
STD = [0.229, 0.224, 0.225]
LABELS = ["cat", "dog", "emu", "fox", "gnu"]


def _foreign(in_channels: int = 3, size: int = 16) -> onnx.ModelProto:
    """No metadata: input "x" (N, C, size, size), 5 classes."""
    return make_onnx_cnn(
        activations=("leaky_relu", "sigmoid"),
        channels=(6, 5),
        in_channels=in_channels,
        image_size=(size, size),
        num_classes=5,
        input_name="x",
        output_name="output",
        seed=7,
        with_metadata=False,
    )


def _nhwc(model: onnx.ModelProto) -> onnx.ModelProto:
    """The same model taking (N, H, W, C): a Transpose in front of it."""
    graph = model.graph
    old = graph.input[0]
    dims = [d.dim_param or d.dim_value for d in old.type.tensor_type.shape.dim]
    for node in graph.node:
        node.input[:] = ["x_nchw" if i == old.name else i for i in node.input]
    graph.node.insert(0, helper.make_node("Transpose", ["x"], ["x_nchw"], perm=[0, 3, 1, 2]))
    new = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [dims[0], *dims[2:], dims[1]])
    graph.input.remove(old)
    graph.input.insert(0, new)
    return model


def _image(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _oracle_crop(image: Image.Image) -> np.ndarray:
    """A 30x40 (W x H) image, shorter side to 20 (torchvision: 20 x int(20 * 40 / 30) = 26),
    centre crop 16x16 at left round(4 / 2) = 2, top round(10 / 2) = 5: (16, 16, 3) in [0, 1]."""
    assert image.size == (30, 40)
    resized = np.asarray(image.resize((20, 26), Image.Resampling.BILINEAR), dtype=np.float64)
    return resized[5:21, 2:18] / 255.0


def _write(path: Path, data: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return path


@pytest.fixture(scope="module")
def config_repo(tmp_path_factory: pytest.TempPathFactory, tiny_cnn_path: Path) -> Path:
    """cropped/1 (labels file, shorter side + crop + mean/std), nhwc/1 (NHWC, BGR),
    tiny/1 (our metadata, overridden), bare/1 (neither)."""
    root = tmp_path_factory.mktemp("config") / "models"
    save_model(_foreign(), root / "cropped" / "1" / "model.onnx")
    (root / "cropped" / "labels.txt").write_text("\n".join(LABELS) + "\n")
    prep = {"resize_mode": "shorter_side", "resize_size": 20, "mean": MEAN, "std": STD}
    _write(root / "cropped" / "config.json", {"labels": "labels.txt", "preprocessing": prep})
    save_model(_nhwc(_foreign()), root / "nhwc" / "1" / "model.onnx")
    _write(
        root / "nhwc" / "config.json",
        {"preprocessing": {"layout": "NHWC", "channel_order": "BGR", "scale": 1.0}},
    )
    shutil.copytree(tiny_cnn_path.parent, root / "tiny" / "1")
    _write(
        root / "tiny" / "config.json",
        {"labels": [f"digit {i}" for i in range(10)], "preprocessing": {"mean": [0.1]}},
    )
    save_model(_foreign(), root / "bare" / "1" / "model.onnx")
    return root


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"preprocessing": {"channels": 2}}, "preprocessing.channels"),
        ({"preprocessing": {"layout": "NWHC"}}, "preprocessing.layout"),
        ({"preprocessing": {"scale": 0}}, "preprocessing.scale"),
        ({"labels": []}, "labels"),
        ({"colour": True}, "colour"),
        ({"batching": {"max_size": 0}}, "batching.max_size"),
    ],
)
def test_config_errors_name_the_field(tmp_path: Path, config: dict, field: str) -> None:
    _write(tmp_path / "m" / "config.json", config)
    with pytest.raises(ValueError, match=rf"config.json: {field}: "):
        read_model_config(tmp_path / "m" / "1" / "model.onnx")


def test_version_config_overrides_the_model_config_field_by_field(tmp_path: Path) -> None:
    _write(tmp_path / "m" / "config.json", {"labels": ["a"], "preprocessing": {"height": 8}})
    _write(tmp_path / "m" / "2" / "config.json", {"preprocessing": {"width": 9}})
    config = read_model_config(tmp_path / "m" / "2" / "model.onnx")
    assert config is not None
    assert config.labels == ["a"]
    assert config.preprocessing is not None
    assert (config.preprocessing.height, config.preprocessing.width) == (8, 9)
    assert read_model_config(tmp_path / "m" / "1" / "model.onnx") == ModelConfig.model_validate(
        {"labels": ["a"], "preprocessing": {"height": 8}}
    )


def test_a_bad_config_fails_its_model_only(tmp_path: Path) -> None:
    save_model(_foreign(), tmp_path / "good" / "1" / "model.onnx")
    save_model(_foreign(), tmp_path / "broken" / "1" / "model.onnx")
    _write(tmp_path / "broken" / "config.json", {"preprocessing": {"channels": 2}})
    repository = ModelRepository(tmp_path, skip_broken=True)
    repository.load_all()
    assert repository.available() == {"good": ["1"]}
    reason = repository.failures[str(tmp_path / "broken" / "1" / "model.onnx")]
    assert "preprocessing.channels" in reason
    entry = next(e for e in repository.index() if e["name"] == "broken")
    assert "preprocessing.channels" in json.dumps(entry)
    # a server's sync (the poller, the management API) keeps the good model and lists it
    save_model(_foreign(), tmp_path / "broken" / "2" / "model.onnx")
    changes = repository.sync()
    assert changes["failed"] == ["broken/1", "broken/2"]  # both retried, both fail
    assert "good" in repository.available()


def test_a_changed_config_is_followed_by_the_repository(tmp_path: Path) -> None:
    # The poller's fingerprint sees a config.json written, changed or removed (the model's
    # or the version's), and a sync loads the version again with it.
    save_model(_foreign(), tmp_path / "m" / "1" / "model.onnx")
    repository = ModelRepository(tmp_path)
    repository.load_all()
    assert repository.sync()["loaded"] == []
    for config in (tmp_path / "m" / "config.json", tmp_path / "m" / "1" / "config.json"):
        before = repository.fingerprint()
        _write(config, {"labels": [f"{config.parent.name} {i}" for i in range(5)]})
        assert repository.fingerprint() != before
        assert repository.sync()["loaded"] == ["m/1"]
        assert repository.get("m").labels[0] == f"{config.parent.name} 0"
        assert repository.sync()["loaded"] == []  # nothing changed since: kept
    (tmp_path / "m" / "1" / "config.json").unlink()
    assert repository.sync()["loaded"] == ["m/1"]
    assert repository.get("m").labels[0] == "m 0"  # the model folder's config again


def test_config_over_embedded_metadata(config_repo: Path) -> None:
    repository = ModelRepository(config_repo, skip_broken=True)
    repository.load_all()
    tiny = repository.get("tiny")
    assert tiny.labels == [f"digit {i}" for i in range(10)]
    assert tiny.preprocessing is not None
    assert tiny.preprocessing.mean == [0.1]  # the config's
    assert tiny.preprocessing.std == [0.25]  # the metadata's
    assert tiny.metadata is not None
    assert tiny.preprocessing.height == tiny.metadata.preprocessing.height


def test_observe_picks_layers(tmp_path: Path) -> None:
    save_model(_foreign(), tmp_path / "m" / "1" / "model.onnx")
    _write(tmp_path / "m" / "config.json", {"observe": ["sigmoid"]})
    repository = ModelRepository(tmp_path)
    repository.load_all()
    assert [layer.kind for layer in repository.get("m").layers] == ["sigmoid"]
    _write(tmp_path / "m" / "config.json", {"observe": ["nope"]})
    with pytest.raises(ModelLoadError, match="observe: \\['nope'\\] match no activation layer"):
        ModelRepository(tmp_path).load_all()


def test_batching_precedence(tmp_path: Path) -> None:
    config = ModelConfig.model_validate({"batching": {"max_size": 8, "max_delay_ms": 4}})
    settings = make_settings(tmp_path, model_batching={"m": {"max_size": 2}})
    assert settings.batching_for("m", config) == (2, 0.004)  # the setting's size wins
    assert settings.batching_for("other", config) == (8, 0.004)
    assert settings.batching_for("other") == (settings.batch_max_size, 0.0)


@pytest.fixture(scope="module")
def client(config_repo: Path) -> TestClient:
    with TestClient(create_app(make_settings(config_repo))) as c:
        yield c


def _top(response: httpx.Response) -> list[dict]:
    assert response.status_code == 200, response.text
    return response.json()["predictions"][0]["top_k"]


def test_labels_file_and_shorter_side_crop_mean_std(client: TestClient) -> None:
    image = _image((30, 40))
    x = (_oracle_crop(image) - MEAN) / STD  # (16, 16, 3)
    tensor = x.transpose(2, 0, 1)[None].astype(np.float32)  # (1, 3, 16, 16)
    url = "/v1/models/cropped/predict"
    by_image = _top(client.post(url, files={"file": ("a.png", _png(image))}))
    by_tensor = _top(client.post(url, json={"tensor": {"data": tensor.tolist()}}))
    assert [p["label"] for p in by_image] == [p["label"] for p in by_tensor]
    assert {p["label"] for p in by_image} == set(LABELS)
    for a, b in zip(by_image, by_tensor, strict=True):
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)
    info = client.get("/v1/models/cropped").json()
    assert info["labels"] == LABELS
    assert info["preprocessing"]["resize_mode"] == "shorter_side"


def test_nhwc_bgr_unscaled(client: TestClient) -> None:
    image = _image((16, 16), seed=3)
    rgb = np.asarray(image, dtype=np.float32)  # (16, 16, 3), scale 1: 0..255
    tensor = rgb[None, :, :, ::-1]  # (1, 16, 16, 3) BGR
    url = "/v1/models/nhwc/predict"
    by_image = _top(client.post(url, files={"file": ("a.png", _png(image))}))
    by_tensor = _top(client.post(url, json={"tensor": {"data": tensor.tolist()}}))
    for a, b in zip(by_image, by_tensor, strict=True):
        assert a["index"] == b["index"]
        assert a["probability"] == pytest.approx(b["probability"], abs=1e-5)


def test_default_image_preprocessing_is_opt_in(config_repo: Path, client: TestClient) -> None:
    png = _png(_image((20, 20)))
    refused = client.post("/v1/models/bare/predict", files={"file": ("a.png", png)})
    assert refused.status_code == 422, refused.text
    error = refused.json()["error"]
    assert error["code"] == "preprocessing_unknown"
    assert "models/bare/config.json" in error["message"]
    assert "python -m service describe" in error["message"]
    settings = make_settings(config_repo, default_image_preprocessing=True)
    with TestClient(create_app(settings)) as opted_in:
        response = opted_in.post("/v1/models/bare/predict", files={"file": ("a.png", png)})
    assert len(_top(response)) == 5


def test_describe_writes_an_imagenet_config(tmp_path: Path) -> None:
    model = save_model(_foreign(size=224), tmp_path / "models" / "net" / "1" / "model.onnx")
    labels = _write(tmp_path / "labels.txt", "\n".join(LABELS) + "\n")
    command = [sys.executable, "-m", "service", "describe", str(model), "--preset", "imagenet"]
    done = subprocess.run(
        [*command, "--labels", str(labels)],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = tmp_path / "models" / "net" / "config.json"
    assert f"wrote {out}" in done.stdout
    written = json.loads(out.read_text())
    prep = written["preprocessing"]
    assert (prep["resize_mode"], prep["resize_size"], prep["height"], prep["width"]) == (
        "shorter_side",
        256,
        224,
        224,
    )
    assert (prep["mean"], prep["std"], prep["layout"]) == (MEAN, STD, "NCHW")
    repository = ModelRepository(tmp_path / "models")
    repository.load_all()  # the file it wrote loads
    assert repository.get("net").labels == LABELS


def test_real_server_serves_a_configured_model(config_repo: Path) -> None:
    """Over a real socket, per process settings: the configured model takes images with its
    labels, the bare one refuses them."""
    png = _png(_image((30, 40)))
    with uvicorn_server(config_repo) as (url, _):
        ok = httpx.post(f"{url}/v1/models/cropped/predict", files={"file": ("a.png", png)})
        bare = httpx.post(f"{url}/v1/models/bare/predict", files={"file": ("a.png", png)})
    assert {p["label"] for p in _top(ok)} == set(LABELS)
    assert bare.status_code == 422
    assert bare.json()["error"]["code"] == "preprocessing_unknown"
