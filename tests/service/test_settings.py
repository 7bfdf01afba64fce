"""ServiceSettings: defaults, the RELU_SERVE_ environment, start-up errors naming the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from service.settings import ENV_PREFIX, ServiceSettings, SettingsError, load_settings


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No RELU_SERVE_ variable from the caller's shell leaks into these tests."""
    import os

    for key in list(os.environ):
        if key.upper().startswith(ENV_PREFIX):
            monkeypatch.delenv(key)


def test_defaults_are_sane() -> None:
    settings = load_settings()
    assert settings.model_root == Path(__file__).resolve().parents[2] / "models"
    assert settings.providers == ["cpu"]
    assert settings.strict_providers is False
    assert settings.intra_op_threads >= 1
    assert settings.monitor_sampling == "requested"
    assert (settings.monitor_window_s, settings.monitor_bucket_s) == (300, 10)
    assert settings.monitor_min_samples == 512
    assert settings.max_batch_size >= 1
    assert settings.log_level == "info"


def test_every_field_is_documented() -> None:
    """STYLE: a docstring on each field (pydantic reads it as the field's description)."""
    undocumented = [n for n, f in ServiceSettings.model_fields.items() if not f.description]
    assert undocumented == []


def test_environment_with_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RELU_SERVE_MODEL_ROOT", str(tmp_path))
    monkeypatch.setenv("RELU_SERVE_PROVIDERS", "cuda, cpu")
    monkeypatch.setenv("RELU_SERVE_MODEL_PROVIDERS", '{"digits": ["cpu"]}')
    monkeypatch.setenv("RELU_SERVE_MAX_BATCH_SIZE", "8")
    monkeypatch.setenv("RELU_SERVE_MONITOR_SAMPLING", "0.25")
    monkeypatch.setenv("RELU_SERVE_LOG_LEVEL", "DEBUG")
    monkeypatch.setenv("RELU_SERVE_STRICT_PROVIDERS", "true")
    settings = load_settings()
    assert settings.model_root == tmp_path
    assert settings.providers == ["cuda", "cpu"]
    assert settings.providers_for("digits") == ["cpu"]
    assert settings.providers_for("other") == ["cuda", "cpu"]
    assert settings.max_batch_size == 8
    assert settings.monitor_sampling == 0.25
    assert settings.log_level == "debug"
    assert settings.strict_providers is True


def test_providers_accept_json_list(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELU_SERVE_PROVIDERS", '["CUDAExecutionProvider", "cpu"]')
    assert load_settings().providers == ["CUDAExecutionProvider", "cpu"]


def test_overrides_win_over_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RELU_SERVE_MAX_TOP_K", "3")
    assert load_settings(max_top_k=7).max_top_k == 7


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("RELU_SERVE_MAX_BATCH_SIZE", "0", "RELU_SERVE_MAX_BATCH_SIZE (max_batch_size)"),
        ("RELU_SERVE_MAX_BATCH_SIZE", "many", "RELU_SERVE_MAX_BATCH_SIZE"),
        ("RELU_SERVE_MONITOR_SAMPLING", "often", "'requested' or a fraction between 0 and 1"),
        ("RELU_SERVE_MONITOR_SAMPLING", "1.5", "RELU_SERVE_MONITOR_SAMPLING"),
        ("RELU_SERVE_LOG_LEVEL", "loud", "RELU_SERVE_LOG_LEVEL"),
        ("RELU_SERVE_PROVIDERS", " , ", "at least one provider"),
        ("RELU_SERVE_MODEL_PROVIDERS", "{not json", "RELU_SERVE_MODEL_PROVIDERS"),
        ("RELU_SERVE_MODEL_PROVIDERS", '{"digits": []}', "'digits' needs at least one"),
        ("RELU_SERVE_REQUEST_TIMEOUT_S", "-1", "RELU_SERVE_REQUEST_TIMEOUT_S"),
        ("RELU_SERVE_INTRA_OP_THREADS", "0", "RELU_SERVE_INTRA_OP_THREADS"),
        ("RELU_SERVE_MONITOR_BUCKET_S", "7", "monitor_window_s (300) must hold a whole number"),
        ("RELU_SERVE_MONITOR_BUCKET_S", "0.05", "RELU_SERVE_MONITOR_BUCKET_S (monitor_bucket_s)"),
        ("RELU_SERVE_MONITOR_MIN_SAMPLES", "0", "RELU_SERVE_MONITOR_MIN_SAMPLES"),
    ],
)
def test_bad_values_fail_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, expected: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match="invalid setting") as info:
        load_settings()
    assert expected in str(info.value)
