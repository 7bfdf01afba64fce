"""deploy/ validated offline: the core kinds against Kubernetes' own schemas
(kubernetes-validate, strict: unknown fields are errors), the KServe InferenceService against
a schema written from KServe's API types plus its PodSpec part against Kubernetes' Pod
schema; and the manifests agree with the service: probes on real routes, ports, user, image,
settings that the service accepts, a grace period that covers the graceful shutdown.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import DEFAULT_MODEL_ROOT, ENV_PREFIX, ServiceSettings, load_settings
from tests.service.http_helpers import make_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
KUBERNETES_VERSION = "1.30.0"  # the oldest minor we claim; every field used exists there
ISVC_SCHEMA = Path(__file__).parent / "schemas" / "kserve-inferenceservice-v1beta1.json"
# ComponentExtensionSpec's fields (KServe pkg/apis/serving/v1beta1/component.go): the rest of
# a custom predictor is a PodSpec, inline.
KSERVE_EXTENSION_KEYS = {
    "minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "containerConcurrency",
    "timeout", "canaryTrafficPercent", "logger", "batcher", "labels", "annotations",
    "deploymentStrategy",
}  # fmt: skip
IMAGE_NAME = "relu-serve"
PORT = 8000


def load_documents() -> dict[str, dict[str, Any]]:
    """Every manifest under deploy/ by kind (one object of each kind)."""
    documents: dict[str, dict[str, Any]] = {}
    for path in sorted(DEPLOY.rglob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if document:
                assert document["kind"] not in documents, f"two {document['kind']} manifests"
                documents[document["kind"]] = document
    return documents


DOCS = load_documents()
CORE_KINDS = [
    "ConfigMap",
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "PersistentVolumeClaim",
]


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", path.read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1] if " " in line else "")
        for line in lines
        if line and not line.startswith("#")
    ]


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    return DOCS["Deployment"]


@pytest.fixture(scope="module")
def container(deployment) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


@pytest.fixture(scope="module")
def isvc_container() -> dict[str, Any]:
    return DOCS["InferenceService"]["spec"]["predictor"]["containers"][0]


def test_every_manifest_is_known() -> None:
    assert set(DOCS) == {*CORE_KINDS, "InferenceService", "Kustomization"}
    kustomization = DOCS["Kustomization"]
    listed = {DEPLOY / name for name in kustomization["resources"]}
    assert all(path.is_file() for path in listed)
    assert [image["name"] for image in kustomization["images"]] == [IMAGE_NAME]


@pytest.mark.parametrize("kind", CORE_KINDS)
def test_core_kinds_pass_kubernetes_schema_strict(kind: str) -> None:
    for version in (KUBERNETES_VERSION, kubernetes_validate.latest_version()):
        kubernetes_validate.validate(DOCS[kind], version, strict=True)


def test_strict_validation_catches_a_misspelt_field(deployment) -> None:
    """The check above is not vacuous: an unknown field fails it."""
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def validate_inference_service(isvc: dict[str, Any]) -> None:
    """KServe's fields against our schema; the rest of the predictor, a PodSpec, against
    Kubernetes' own Pod schema, strict."""
    jsonschema.validate(isvc, json.loads(ISVC_SCHEMA.read_text()))
    predictor = isvc["spec"]["predictor"]
    pod_spec = {k: v for k, v in predictor.items() if k not in KSERVE_EXTENSION_KEYS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"}, "spec": pod_spec}
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


def test_inference_service_matches_kserve_schema() -> None:
    isvc = DOCS["InferenceService"]
    validate_inference_service(isvc)
    predictor = isvc["spec"]["predictor"]
    assert predictor["minReplicas"] <= predictor["maxReplicas"]


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda p: p["containers"][0]["env"].clear(), jsonschema.ValidationError),
        (lambda p: p["containers"][0].update(name="server"), jsonschema.ValidationError),
        (lambda p: p.update(scaleMetric="gpu"), jsonschema.ValidationError),
        # protocolVersion belongs to predictor.model; beside containers it is no PodSpec field.
        (lambda p: p.update(protocolVersion="v2"), kubernetes_validate.ValidationError),
    ],
    ids=["no-protocol", "container-name", "scale-metric", "protocolVersion-misplaced"],
)
def test_inference_service_checks_catch_mistakes(change, error) -> None:
    isvc = json.loads(json.dumps(DOCS["InferenceService"]))
    change(isvc["spec"]["predictor"])
    with pytest.raises(error):
        validate_inference_service(isvc)


def test_inference_service_is_a_v2_predictor_on_our_port(isvc_container) -> None:
    env = {item["name"]: item.get("value") for item in isvc_container["env"]}
    assert env["PROTOCOL"] == "v2"  # KServe's CustomSpecProtocolEnvVarKey
    assert [port["containerPort"] for port in isvc_container["ports"]] == [PORT]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert isvc_container[probe]["httpGet"]["port"] == PORT
        assert isvc_container[probe]["httpGet"]["path"].startswith("/v2/health/")


def probe_paths() -> list[str]:
    paths = []
    containers = [
        DOCS["Deployment"]["spec"]["template"]["spec"]["containers"][0],
        DOCS["InferenceService"]["spec"]["predictor"]["containers"][0],
    ]
    for item in containers:
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            paths.append(item[probe]["httpGet"]["path"])
    return sorted(set(paths))


@pytest.mark.parametrize("path", probe_paths())
def test_probes_hit_real_routes_that_answer_200_when_ready(path: str) -> None:
    settings = make_settings(DEFAULT_MODEL_ROOT)
    with TestClient(create_app(settings)) as client:
        response = client.get(path)
    assert response.status_code == 200, (path, response.text)


def test_readiness_probe_is_readiness_and_liveness_is_liveness(container) -> None:
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    # Liveness must not restart a pod that is only loading: a startup probe guards it.
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 60


def test_ports_agree_with_the_image_and_the_service(container) -> None:
    instructions = dockerfile_instructions(REPO_ROOT / "Dockerfile")
    assert ("EXPOSE", str(PORT)) in instructions
    cmd = json.loads(next(args for name, args in instructions if name == "CMD"))
    assert cmd[cmd.index("--port") + 1] == str(PORT)
    (port,) = container["ports"]
    assert port["containerPort"] == PORT
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"]["port"] == port["name"]
    (service_port,) = DOCS["Service"]["spec"]["ports"]
    assert service_port["targetPort"] == port["name"]


def test_selectors_match_the_pods(deployment) -> None:
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    for selector in (
        deployment["spec"]["selector"]["matchLabels"],
        DOCS["Service"]["spec"]["selector"],
        DOCS["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ):
        assert selector.items() <= labels.items()


def test_hpa_scales_the_deployment_on_cpu(deployment, container) -> None:
    hpa = DOCS["HorizontalPodAutoscaler"]
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "relu-serve"}
    assert deployment["metadata"]["name"] == target["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["resource"]["name"] == "cpu"
    # Utilization is relative to the request: there must be one.
    assert "cpu" in container["resources"]["requests"]
    assert hpa["spec"]["minReplicas"] >= DOCS["PodDisruptionBudget"]["spec"]["minAvailable"] + 1


def test_runs_as_the_image_user_non_root_read_only(deployment, container) -> None:
    users = [
        args.split(":")[0]
        for name, args in dockerfile_instructions(REPO_ROOT / "Dockerfile")
        if name == "USER"
    ]
    pod_security = deployment["spec"]["template"]["spec"]["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert str(pod_security["runAsUser"]) == users[-1] != "0"
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    # The service writes temporary files (instrumented graphs at load): /tmp is a volume.
    assert any(mount["mountPath"] == "/tmp" for mount in container["volumeMounts"])
    isvc = DOCS["InferenceService"]["spec"]["predictor"]
    assert isvc["securityContext"]["runAsUser"] == pod_security["runAsUser"]


def test_every_pod_serves_the_one_shared_repository(deployment, container) -> None:
    # The repository is the truth that replicas converge on: one volume, writable by all.
    pod = deployment["spec"]["template"]["spec"]
    claim = DOCS["PersistentVolumeClaim"]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    (volume,) = [v for v in pod["volumes"] if "persistentVolumeClaim" in v]
    assert volume["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
    root = DOCS["ConfigMap"]["data"]["RELU_SERVE_MODEL_ROOT"]
    (seed,) = pod["initContainers"]
    for mounts in (container["volumeMounts"], seed["volumeMounts"]):
        assert {"name": volume["name"], "mountPath": root} in mounts
    # The seed copies the image's models in, from the image the service runs.
    assert seed["image"] == container["image"]
    assert "/app/models" in seed["command"][-1]


def test_same_image_everywhere(container, isvc_container) -> None:
    for image in (container["image"], isvc_container["image"]):
        assert image.rsplit(":", 1)[0].rsplit("/", 1)[-1] == IMAGE_NAME
    assert container["image"] == isvc_container["image"]


def test_settings_in_manifests_are_accepted_by_the_service(isvc_container) -> None:
    configmap = DOCS["ConfigMap"]["data"]
    isvc_env = {item["name"]: item["value"] for item in isvc_container["env"]}
    for env in (configmap, isvc_env):
        values = {
            key[len(ENV_PREFIX) :].lower(): value
            for key, value in env.items()
            if key.startswith(ENV_PREFIX)
        }
        unknown = set(values) - set(ServiceSettings.model_fields)
        assert not unknown, f"not service settings: {sorted(unknown)}"
        load_settings(**values)  # raises SettingsError naming a bad value


def test_grace_period_covers_the_graceful_shutdown(deployment, isvc_container) -> None:
    configmap = DOCS["ConfigMap"]["data"]
    needed = float(configmap["RELU_SERVE_SHUTDOWN_DELAY_S"]) + float(
        configmap["UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN"]
    )
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] > needed
    isvc_env = {item["name"]: item["value"] for item in isvc_container["env"]}
    isvc_needed = float(isvc_env["RELU_SERVE_SHUTDOWN_DELAY_S"]) + float(
        isvc_env["UVICORN_TIMEOUT_GRACEFUL_SHUTDOWN"]
    )
    predictor = DOCS["InferenceService"]["spec"]["predictor"]
    assert predictor["terminationGracePeriodSeconds"] > isvc_needed
    # The readiness probe notices the 503 within the delay.
    probe = deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    delay = float(configmap["RELU_SERVE_SHUTDOWN_DELAY_S"])
    assert probe["periodSeconds"] * probe["failureThreshold"] <= delay
