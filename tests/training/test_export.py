"""ONNX export: checks, self-describing metadata, atomic writes, INT8, re-export."""

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from service.metadata import ModelMetadata
from training.architectures import create_model
from training.export import (
    ExportError,
    _module_name,
    atomic_write_bytes,
    to_onnx,
)
from training.pipeline import export_checkpoint, export_trained
from training.train import normalize


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    r = trained_run
    result = export_trained(r.model, r.config, r.bundle, r.history, root=root, name="digits")
    return root, result


def test_exported_file_is_self_describing_and_matches_pytorch(exported, trained_run):
    root, result = exported
    assert result.path == root / "digits" / "1" / "model.onnx"
    proto = onnx.load(str(result.path))
    onnx.checker.check_model(proto, full_check=True)
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert meta.labels == [str(i) for i in range(10)]
    assert meta.preprocessing.height == 8
    assert meta.preprocessing.channels == 1
    assert meta.preprocessing.background == "dark"  # digits: light ink on black
    mean, std = trained_run.bundle.mean_std()
    assert meta.preprocessing.mean == pytest.approx(mean)
    assert [layer.kind for layer in meta.activations] == ["relu"] * 5
    assert [layer.channels for layer in meta.activations] == [32, 32, 64, 64, 128]
    graph_outputs = {o for node in proto.graph.node for o in node.output}
    assert all(layer.tensor in graph_outputs for layer in meta.activations)
    assert set(meta.reference.layers) == {layer.name for layer in meta.activations}
    assert meta.training["held_out_samples"] == len(trained_run.bundle.val_x)
    assert result.max_abs_diff <= 1e-4

    # Parity on held-out data, run here independently of the exporter's own check.
    x = normalize(trained_run.bundle.val_x, mean, std)
    session = ort.InferenceSession(str(result.path), providers=["CPUExecutionProvider"])
    for n in (1, 7, 64):  # the batch axis is dynamic
        logits = session.run(["logits"], {"input": x[:n].numpy()})[0]
        with torch.no_grad():
            expected = trained_run.model.eval()(x[:n]).numpy()
        assert logits.shape == (n, 10)
        assert np.abs(logits - expected).max() <= 1e-4


def test_reference_profile_is_the_held_out_activity(exported, trained_run):
    _, result = exported
    proto = onnx.load(str(result.path))
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    layer = meta.activations[0]
    proto.graph.output.append(onnx.helper.make_empty_tensor_value_info(layer.tensor))
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    mean, std = trained_run.bundle.mean_std()
    x = normalize(trained_run.bundle.val_x, mean, std)[: meta.reference.samples].numpy()
    act = session.run([layer.tensor], {"input": x})[0]  # (N, C, H, W)
    rates = (act > 0).mean(axis=(0, 2, 3))
    profile = meta.reference.layers[layer.name]
    assert profile.channel_activity == pytest.approx(rates.tolist(), abs=1e-6)
    assert profile.inactive_fraction == pytest.approx(1 - (act > 0).mean(), abs=1e-6)


def test_existing_version_is_not_overwritten_unless_asked(exported, trained_run):
    root, result = exported
    before = result.path.read_bytes()
    r = trained_run
    with pytest.raises(ExportError, match="exists; pass overwrite"):
        export_trained(r.model, r.config, r.bundle, r.history, root=root, name="digits", version=1)
    assert result.path.read_bytes() == before
    again = export_trained(r.model, r.config, r.bundle, r.history, root=root, name="digits")
    assert again.version == 2  # the next free version


def test_failed_write_leaves_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "m" / "1" / "model.onnx"

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", crash)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"x" * 1000)
    assert list(target.parent.iterdir()) == []


def test_parity_failure_aborts_the_export(trained_run, tmp_path, monkeypatch):
    import training.export as export

    monkeypatch.setattr(export, "PARITY_TOLERANCE", 0.0)  # no real export is bit-exact
    r = trained_run
    with pytest.raises(ExportError, match="differ by"):
        export_trained(r.model, r.config, r.bundle, r.history, root=tmp_path, name="digits")
    assert not (tmp_path / "digits" / "1" / "model.onnx").exists()


def test_reexport_from_checkpoint_without_retraining(trained_run, exported, tmp_path):
    _, first = exported
    result = export_checkpoint(trained_run.run_dir, root=tmp_path, name="again")
    assert result.accuracy == pytest.approx(first.accuracy)
    a, b = onnx.load(str(first.path)), onnx.load(str(result.path))
    weights = lambda m: [onnx.numpy_helper.to_array(t) for t in m.graph.initializer]  # noqa: E731
    for wa, wb in zip(weights(a), weights(b), strict=True):
        np.testing.assert_array_equal(wa, wb)


@pytest.mark.slow
def test_int8_quantization_reports_the_accuracy_change(trained_run, tmp_path):
    r = trained_run
    result = export_trained(
        r.model, r.config, r.bundle, r.history, root=tmp_path, name="digits", quantize=True
    )
    assert result.quantized_path == tmp_path / "digits-int8" / "1" / "model.onnx"
    proto = onnx.load(str(result.quantized_path))
    assert any(n.op_type == "QuantizeLinear" for n in proto.graph.node)
    meta = ModelMetadata.from_props({p.key: p.value for p in proto.metadata_props})
    assert meta.quantized
    assert meta.name == "digits-int8"
    change = meta.training["accuracy_change"]
    assert change == pytest.approx(result.quantized_accuracy - result.accuracy)
    assert abs(change) < 0.05  # INT8 costs little on this model
    nodes = {n.output[0] for n in proto.graph.node}
    assert all(layer.tensor in nodes for layer in meta.activations)  # still observable


@pytest.mark.parametrize(
    ("arch", "activation"), [("resnet20", "relu"), ("vgg", "prelu"), ("small_cnn", "relu6")]
)
def test_every_activation_node_maps_back_to_its_layer(arch, activation):
    from training.export import describe_activations

    channels, size = (1, (8, 8)) if arch == "small_cnn" else (3, (32, 32))
    model = create_model(arch, activation=activation, in_channels=channels, image_size=size).eval()
    proto = to_onnx(model, torch.randn(2, channels, *size))
    layers = describe_activations(model, proto)
    assert len(layers) == {"resnet20": 19, "vgg": 7, "small_cnn": 5}[arch]
    assert len({layer.tensor for layer in layers}) == len(layers)


def test_module_name_from_node_name():
    assert _module_name("/stages/stages.0/stages.0.1/act2/Relu") == "stages.0.1.act2"
    assert _module_name("/classifier/classifier.3/Relu") == "classifier.3"
