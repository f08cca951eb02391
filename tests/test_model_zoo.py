"""Real CNN architectures, exported as people export them, against torch autograd.

`tests/zoo/export.py` runs once per session in the zoo venv (torch, timm, torchvision, keras;
never the service's `.venv`): it builds each architecture with random weights, exports it to a
model repository and computes every method's reference map with torch on the same weights. The
service then serves that repository as a real process, and each (export, method) is one test:
its map must match the reference (relative error <= 1e-3 of the reference's largest magnitude,
or Pearson correlation >= 0.999). `make unit` sets ONNX_EXPLAIN_ZOO_PYTHON to the zoo venv's
python (`make .venv-zoo` builds it); without it these tests are skipped.
"""

import base64
import json
import os
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pytest

from engines.imaging.decode import preprocess
from engines.methods.registry import EXPLAINERS
from schemas.model_config import ModelConfig
from tests.images import encode
from tests.servers import free_port, start_service, wait_until_ready

ZOO_PYTHON = os.environ.get("ONNX_EXPLAIN_ZOO_PYTHON", "")
# For iterating on the engines: a folder tests/zoo/export.py already wrote, used instead of
# exporting again (never set by `make`; the suite exports afresh).
PREBUILT = os.environ.get("ONNX_EXPLAIN_ZOO_PREBUILT", "")
EXPORT_SCRIPT = Path(__file__).parent / "zoo" / "export.py"
EXPORT_TIMEOUT_SECONDS = 900
REQUEST_TIMEOUT_SECONDS = 300.0
RELATIVE_TOLERANCE = 1e-3
MIN_CORRELATION = 0.999
CONCURRENT_REQUESTS = 12

pytestmark = pytest.mark.skipif(
    not ZOO_PYTHON,
    reason="ONNX_EXPLAIN_ZOO_PYTHON is unset: the model-zoo tests need the zoo venv's python "
    "(`make unit` builds .venv-zoo and sets it)",
)

# What tests/zoo/export.py exports (test_the_zoo_exports_what_the_test_lists keeps them equal).
_TORCH_ARCHS = [
    "plain-cnn",
    "timm-resnet10t",
    "tv-mobilenet_v2",
    "tv-mobilenet_v3_small",
    "timm-lcnet_050",
    "tv-densenet-small",
    "tv-shufflenet_v2_x0_5",
    "tv-googlenet",
    "timm-convnext_atto",
    "upsample-cnn",
]
_DYNAMO_ONLY = ["timm-efficientnet_b0", "timm-mixnet_s", "timm-resnest14d"]
_LISTED = [
    *(f"{arch}-{exporter}" for arch in _TORCH_ARCHS for exporter in ("dynamo", "torchscript")),
    *(f"{arch}-dynamo" for arch in _DYNAMO_ONLY),
    "plain-cnn-torchscript-fixed-batch",
    "plain-cnn-torchscript-free-hw",
    "timm-resnet10t-dynamo-fixed-batch",
    "timm-resnet10t-dynamo-free-hw",
    "keras-small-cnn",
    "keras-mobilenet_v2",
    "keras-mobilenet_v2-tf2onnx",
]
# A prebuilt folder is checked whole, whatever it holds (e.g. `export.py OUT --extra`).
EXPORTS = (
    sorted(json.loads((Path(PREBUILT) / "manifest.json").read_text())["exports"])
    if PREBUILT
    else _LISTED
)
CAM_FAMILY = ["gradcam", "gradcam++", "xgradcam", "layercam", "hirescam", "guided_gradcam"]
# Gradient-free black-box methods only call the forward pass, whose agreement with torch
# test_prediction checks on every export; their own answers are checked on hand-built graphs
# and the default model in tests/test_perturbation.py.
BLACK_BOX = {"rise", "lime", "kernelshap"}
# Checked against the peers' own implementations on the default model instead
# (tests/test_peer_methods.py, references from tests/zoo/peer_references.py).
PEER_CHECKED = {"scorecam", "ablationcam", "eigencam", "eigengradcam", "gradientshap", "deeplift"}
# Every other method the service offers needs a torch reference here.
METHODS = [m for m in EXPLAINERS if m not in BLACK_BOX | PEER_CHECKED]
ARRAY_OUTPUT = {"format": "array", "normalize": "none", "size": "model"}


@dataclass
class Zoo:
    root: Path
    manifest: dict[str, Any]
    params: dict[str, dict[str, Any]]
    image: np.ndarray
    png_base64: str
    export_seconds: float
    base: str
    client: httpx2.Client
    activation_checks: dict[str, str | None]
    """export -> None when its default layer matches torch's feature map, else why not."""

    def entry(self, export: str) -> dict[str, Any]:
        entry: dict[str, Any] | None = self.manifest.get(export)
        if entry is None:
            pytest.fail(f"{export} is not in the exporter's manifest")
        if "error" in entry:
            pytest.fail(
                f"{export}: the export itself failed: {entry['error']}\n{entry.get('traceback')}"
            )
        return entry

    def reference(self, export: str) -> dict[str, np.ndarray]:
        with np.load(self.root / export / "reference.npz") as data:
            return {key: data[key] for key in data.files}

    def post(self, export: str, route: str, body: dict[str, Any]) -> httpx2.Response:
        response: httpx2.Response = self.client.post(
            f"{self.base}/v1/models/{export}/{route}",
            json={"image": self.png_base64, **body},
            timeout=REQUEST_TIMEOUT_SECONDS,
        )
        return response


def run_exporter(root: Path) -> tuple[dict[str, Any], float]:
    python = Path(ZOO_PYTHON)
    if not python.exists():
        pytest.fail(f"ONNX_EXPLAIN_ZOO_PYTHON={ZOO_PYTHON} does not exist (make .venv-zoo)")
    started = time.monotonic()
    done = subprocess.run(
        [str(python), str(EXPORT_SCRIPT), str(root)],
        capture_output=True,
        text=True,
        timeout=EXPORT_TIMEOUT_SECONDS,
        check=False,
    )
    seconds = time.monotonic() - started
    (root / "export.log").write_text(done.stdout + "\n" + done.stderr)
    if done.returncode != 0:
        pytest.fail(f"tests/zoo/export.py exited with {done.returncode}:\n{done.stderr[-6000:]}")
    manifest: dict[str, Any] = json.loads((root / "manifest.json").read_text())
    return manifest, seconds


def wait_for_models(base: str, names: list[str], seconds: float = 300) -> None:
    """Until no model is still loading (the service prepares each one at start-up)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        listed = httpx2.get(f"{base}/v1/models", timeout=10).json()["models"]
        states = {m["name"]: m["state"] for m in listed}
        if all(states.get(name, "loading") != "loading" for name in names):
            return
        time.sleep(0.2)
    raise AssertionError(f"models still loading after {seconds} s")


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Zoo]:
    if PREBUILT:
        root = Path(PREBUILT).resolve()
        manifest, seconds = json.loads((root / "manifest.json").read_text()), 0.0
    else:
        root = tmp_path_factory.mktemp("zoo-repository")
        manifest, seconds = run_exporter(root)
    exports: dict[str, Any] = manifest["exports"]
    image = np.load(root / "image.npy")
    port = free_port()
    log = tmp_path_factory.mktemp("zoo-server") / "server.log"
    process = start_service(
        root,
        port,
        log,
        CACHE_DIR=str(log.parent / "cache"),
        REQUEST_TIMEOUT_SECONDS=str(REQUEST_TIMEOUT_SECONDS),
    )
    base = f"http://127.0.0.1:{port}"
    try:
        # every model loads (normalised, its support table found) before /readyz: the wider
        # zoo's 84 exports take ~7 minutes on 2 cores
        wait_until_ready(base, process, log, seconds=120 + 10 * len(exports))
        wait_for_models(base, [name for name, e in exports.items() if "error" not in e])
        with httpx2.Client() as client:
            yield Zoo(
                root=root,
                manifest=exports,
                params=manifest["params"],
                image=image,
                png_base64=base64.b64encode(encode(image)).decode(),
                export_seconds=seconds,
                base=base,
                client=client,
                activation_checks={},
            )
    finally:
        process.terminate()
        process.wait(timeout=30)


# ----------------------------------------------------------------------------- helpers


def fail_with_body(what: str, response: httpx2.Response) -> None:
    pytest.fail(f"{what}: HTTP {response.status_code}: {response.text[:1500]}")


def decode_map(explanation: dict[str, Any]) -> np.ndarray:
    heatmap = explanation["heatmap"]
    assert heatmap["format"] == "array", heatmap
    values = np.frombuffer(base64.b64decode(heatmap["data"]), dtype="<f4")
    return values.reshape(heatmap["shape"]).astype(np.float64)


def disagreement(got: np.ndarray, want: np.ndarray) -> str | None:
    """None when `got` matches `want` (relative error or correlation), else the numbers."""
    if got.shape != want.shape:
        return f"shape {list(got.shape)} != reference {list(want.shape)}"
    if not np.all(np.isfinite(got)):
        return f"{int(np.sum(~np.isfinite(got)))} non-finite values"
    scale = float(np.abs(want).max())
    error = float(np.abs(got - want).max())
    relative = error / scale if scale > 0 else (0.0 if error == 0 else float("inf"))
    if relative <= RELATIVE_TOLERANCE:
        return None
    correlation = float("nan")
    if got.std() > 0 and want.std() > 0:
        correlation = float(np.corrcoef(got.ravel(), want.ravel())[0, 1])
    if correlation >= MIN_CORRELATION:
        return None
    return (
        f"relative error {relative:.3g} (max |diff| {error:.3g}, max |ref| {scale:.3g}), "
        f"Pearson {correlation:.6f}, service range [{got.min():.3g}, {got.max():.3g}], "
        f"reference range [{want.min():.3g}, {want.max():.3g}]"
    )


def method_params(zoo: Zoo, method: str) -> dict[str, Any]:
    if method in ("saliency", "guided_backprop"):
        return {"reduction": "abs_max"}
    if method == "smoothgrad":
        return {**zoo.params["smoothgrad"], "reduction": "abs_max"}
    if method == "integrated_gradients":
        return {**zoo.params["integrated_gradients"], "reduction": "sum"}
    if method == "gradient_x_input":
        return {"reduction": "sum"}
    if method == "occlusion":
        return {**zoo.params["occlusion"], "baseline": "constant", "score": "probability"}
    return {}


def model_info(zoo: Zoo, export: str) -> dict[str, Any]:
    response = zoo.client.get(f"{zoo.base}/v1/models/{export}", timeout=30)
    if response.status_code != 200:
        fail_with_body(f"GET /v1/models/{export}", response)
    info: dict[str, Any] = response.json()
    if not info["ready"]:
        pytest.fail(f"{export} did not load in the service: {info.get('reason')}")
    return info


def fits(layer: dict[str, Any], feature: tuple[int, ...]) -> bool:
    """Whether a listed layer's (N, ...) shape can be the (C, h, w) feature map, in either
    layout (a layer's own layout need not be the input's: Keras on torch computes in NCHW)."""
    dims = list(layer["shape"][1:])
    if len(dims) != 3:
        return False
    layouts = (dims, [dims[2], dims[0], dims[1]])
    return any(
        all(not isinstance(d, int) or d == f for d, f in zip(order, feature, strict=True))
        for order in layouts
    )


def activation_mismatch(zoo: Zoo, export: str) -> str | None:
    """Why the service's default layer is not torch's feature map (None when it is)."""
    if export in zoo.activation_checks:
        return zoo.activation_checks[export]
    info = model_info(zoo, export)
    feature = zoo.reference(export)["feature"]
    layer = info["default_layer"]
    shapes = {found["name"]: found for found in info["layers"]}
    problem: str | None = None
    if layer is None:
        problem = "the service found no default layer"
    elif layer in shapes and not fits(shapes[layer], feature.shape):
        found = shapes[layer]
        problem = (
            f"the default layer {layer!r} ({found['op_type']}, shape {found['shape']}) is not "
            f"torch's pre-pooling feature map (channels first {list(feature.shape)})"
        )
    else:
        channels = list(range(min(64, feature.shape[0])))
        response = zoo.post(
            export, "activations", {"layers": [layer], "channels": channels, "format": "array"}
        )
        if response.status_code != 200:
            problem = f"activations of {layer!r}: HTTP {response.status_code}: {response.text}"
        else:
            found = response.json()["layers"][0]
            array = found["array"]
            got = np.frombuffer(base64.b64decode(array["data"]), dtype="<f4").reshape(
                array["shape"]
            )
            if found["channels_total"] != feature.shape[0]:
                problem = (
                    f"default layer {layer!r} has shape {found['shape']}; torch's feature map "
                    f"is {list(feature.shape)} (channels first)"
                )
            else:
                mismatch = disagreement(got.astype(np.float64), feature[channels])
                if mismatch is not None:
                    problem = (
                        f"default layer {layer!r} differs from torch's feature map: {mismatch}"
                    )
    zoo.activation_checks[export] = problem
    return problem


# ----------------------------------------------------------------------------- the tests


def test_the_zoo_exports_what_the_test_lists(zoo: Zoo) -> None:
    assert sorted(zoo.manifest) == sorted(EXPORTS)
    assert zoo.export_seconds < EXPORT_TIMEOUT_SECONDS


@pytest.mark.parametrize("export", EXPORTS)
def test_prediction(zoo: Zoo, export: str) -> None:
    """The export loads, both sides build the same input tensor, and the scores agree."""
    entry = zoo.entry(export)
    info = model_info(zoo, export)
    reference = zoo.reference(export)
    config = ModelConfig.model_validate_json((zoo.root / export / "config.json").read_text())
    np.testing.assert_array_equal(preprocess([zoo.image], config.input), reference["input"])
    assert info["input"]["layout"] == entry["layout"]
    response = zoo.post(export, "predict", {"top_k": 10})
    if response.status_code != 200:
        fail_with_body("predict", response)
    logits = reference["logits"]
    torch_probabilities = np.exp(logits - logits.max())
    torch_probabilities /= torch_probabilities.sum()
    scores = np.zeros(len(logits))
    for prediction in response.json()["predictions"]:
        scores[prediction["index"]] = prediction["score"]
    np.testing.assert_allclose(scores, torch_probabilities, atol=1e-4)
    assert int(np.argmax(scores)) == entry["targets"][0]


@pytest.mark.parametrize("export", EXPORTS)
def test_default_layer_is_the_feature_map(zoo: Zoo, export: str) -> None:
    zoo.entry(export)
    problem = activation_mismatch(zoo, export)
    if problem is not None:
        pytest.fail(problem)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("export", EXPORTS)
def test_gradient_method(zoo: Zoo, export: str, method: str) -> None:
    """The service's map equals torch's, for the top-1 class and for one other target."""
    entry = zoo.entry(export)
    model_info(zoo, export)
    top1, other = entry["targets"]
    reference = zoo.reference(export)
    body: dict[str, Any] = {"method": method, "params": method_params(zoo, method)}
    body["output"] = ARRAY_OUTPUT
    refusal = None
    if method == "cam" and not entry["cam"]:
        refusal = "the head is not global average pooling + one linear layer"
    if method in ("guided_backprop", "guided_gradcam") and not entry["guided"]:
        refusal = "the network has no ReLU-like op for guided backprop to filter at"
    if refusal is not None:
        response = zoo.post(export, "explain", {**body, "top_k": 1})
        assert response.status_code == 422, f"{refusal}: {method} should refuse: {response.text}"
        return
    if method in CAM_FAMILY:
        problem = activation_mismatch(zoo, export)
        if problem is not None:
            pytest.fail(f"cannot compare {method}: {problem}")
    failures: list[str] = []
    for target, request in ((top1, {"top_k": 1}), (other, {"targets": [other]})):
        response = zoo.post(export, "explain", {**body, **request})
        if response.status_code != 200:
            fail_with_body(f"{method} for target {target}", response)
        (explanation,) = response.json()["explanations"]
        assert explanation["target"] == target
        mismatch = disagreement(decode_map(explanation), reference[f"{method}/{target}"])
        if mismatch is not None:
            failures.append(f"target {target}: {mismatch}")
    if failures:
        pytest.fail(f"{method} differs from torch: " + "; ".join(failures))


# Methods without a per-export torch reference, with small settings: each must serve every
# export (their values are checked on the default model and on hand-built graphs).
UNREFERENCED: dict[str, dict[str, Any]] = {
    "deeplift": {},
    "gradientshap": {"samples": 2},
    "ablationcam": {},
    "eigengradcam": {},
    "rise": {"masks": 16},
    "lime": {"samples": 16, "segments": 8},
}


@pytest.mark.parametrize("method", UNREFERENCED)
@pytest.mark.parametrize("export", EXPORTS)
def test_methods_without_a_torch_reference_serve_every_export(
    zoo: Zoo, export: str, method: str
) -> None:
    zoo.entry(export)
    body = {"method": method, "params": UNREFERENCED[method], "output": ARRAY_OUTPUT}
    response = zoo.post(export, "explain", {**body, "top_k": 1})
    if response.status_code != 200:
        fail_with_body(method, response)
    (explanation,) = response.json()["explanations"]
    values = decode_map(explanation)
    assert values.ndim == 2
    assert min(values.shape) > 1
    assert np.all(np.isfinite(values))
    assert values.std() > 0, f"{method} gave a constant map"


CONCURRENT_MIX: list[tuple[str, dict[str, Any]]] = [
    ("predict", {"top_k": 3}),
    ("explain", {"method": "gradcam", "output": {"format": "png"}}),
    (
        "explain",
        {
            "method": "smoothgrad",
            "params": {"samples": 3, "noise": 0.1},
            "output": {"format": "png"},
        },
    ),
    (
        "explain",
        {
            "method": "occlusion",
            "params": {"window": 16, "stride": 16},
            "output": {"format": "png"},
        },
    ),
]


def describe(route: str, body: dict[str, Any]) -> str:
    return route if route == "predict" else str(body["method"])


@pytest.mark.parametrize("export", EXPORTS)
def test_concurrent_requests(zoo: Zoo, export: str) -> None:
    """Twelve mixed requests at once on a real server: every answer is 200."""
    zoo.entry(export)
    model_info(zoo, export)
    alone = {describe(r, b): zoo.post(export, r, b) for r, b in CONCURRENT_MIX}
    requests = [CONCURRENT_MIX[i % len(CONCURRENT_MIX)] for i in range(CONCURRENT_REQUESTS)]
    with ThreadPoolExecutor(CONCURRENT_REQUESTS) as pool:
        answers = list(pool.map(lambda rb: zoo.post(export, rb[0], rb[1]), requests))
    failures = []
    for (route, body), answer in zip(requests, answers, strict=True):
        if answer.status_code != 200:
            name = describe(route, body)
            solo = alone[name]
            how = "also alone" if solo.status_code != 200 else "only under concurrency"
            failures.append(f"{name}: HTTP {answer.status_code} ({how}): {answer.text[:300]}")
    assert not failures, "\n".join(failures)
