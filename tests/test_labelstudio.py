"""The Label Studio ML backend: a real Label Studio connects it, imports a task and fetches its
predictions; brushes Label Studio's own SDK decodes onto the cat in chelsea; task images
fetched from the configured Label Studio only.

Label Studio and its SDK (`label-studio`, pinned in the Makefile) live in `.venv-labelstudio`,
which `make unit` builds and names in ONNX_EXPLAIN_LABEL_STUDIO_PYTHON: they pin their own
Django, numpy, pandas and OpenCV. The SSRF tests serve task images from a real HTTP server
standing in for Label Studio's uploads (it checks the token), beside a foreign server that must
never be reached.
"""

import base64
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from tests.conftest import make_client
from tests.images import encode, photo
from tests.servers import free_port, serving, wait_until_ready

MODEL = "efficientnet-lite0"
TOKEN = "label-studio-token-for-tests"
CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="region" toName="image">
    <Label value="cat"/>
    <Label value="background"/>
  </BrushLabels>
  <Choices name="kind" toName="image">
    <Choice value="a cat having a striped coat"/>
    <Choice value="dog"/>
  </Choices>
</View>
"""
CHELSEA = encode(np.ascontiguousarray(photo("chelsea")))

SDK_SCRIPT = """
import json, sys
import numpy as np
from label_studio_sdk.converter.brush import decode_rle
from label_studio_sdk.label_interface import LabelInterface

job = json.load(sys.stdin)
interface = LabelInterface(job["config"])
answers = []
for prediction in job["predictions"]:
    errors = interface.validate_prediction({"result": prediction["result"]}, return_errors=True)
    masks = []
    for region in prediction["result"]:
        if region["type"] == "brushlabels":
            pixels = decode_rle(region["value"]["rle"]).reshape(
                region["original_height"], region["original_width"], 4
            )
            masks.append((pixels[:, :, 3] == 255).astype(int).tolist())
    answers.append({"errors": errors, "masks": masks})
json.dump(answers, sys.stdout)
"""


class _Images(BaseHTTPRequestHandler):
    """Label Studio's uploads (token required), or a foreign host that must stay untouched."""

    hits: list[str]
    redirect_to: str = ""

    def do_GET(self) -> None:
        self.hits.append(self.path)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", self.redirect_to)
            self.end_headers()
            return
        if self.headers.get("Authorization") != f"Token {TOKEN}":
            self.send_response(401)
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(CHELSEA)))
        self.end_headers()
        self.wfile.write(CHELSEA)

    def log_message(self, *args: Any) -> None:
        pass


def _server(hits: list[str], redirect_to: str = "") -> ThreadingHTTPServer:
    handler = type("Handler", (_Images,), {"hits": hits, "redirect_to": redirect_to})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, Any]]:
    foreign_hits: list[str] = []
    origin_hits: list[str] = []
    foreign = _server(foreign_hits)
    foreign_url = f"http://127.0.0.1:{foreign.server_address[1]}"
    origin = _server(origin_hits, redirect_to=f"{foreign_url}/image.png")
    try:
        yield {
            "origin": f"http://127.0.0.1:{origin.server_address[1]}",
            "foreign": foreign_url,
            "origin_hits": origin_hits,
            "foreign_hits": foreign_hits,
        }
    finally:
        origin.shutdown()
        foreign.shutdown()


@pytest.fixture(scope="module")
def backend(default_model_dir: Path, servers: dict[str, Any]) -> Iterator[TestClient]:
    settings = {"label_studio_url": servers["origin"], "label_studio_api_key": TOKEN}
    with make_client(default_model_dir, **settings) as client:
        yield client


LS_PYTHON = os.environ.get("ONNX_EXPLAIN_LABEL_STUDIO_PYTHON", "")


@pytest.fixture(scope="module")
def sdk_python() -> Path:
    """The python of .venv-labelstudio (Label Studio and label-studio-sdk)."""
    if not LS_PYTHON:
        pytest.skip(
            "ONNX_EXPLAIN_LABEL_STUDIO_PYTHON is unset: these tests need .venv-labelstudio's "
            "python (`make unit` builds the venv and sets it)"
        )
    python = Path(LS_PYTHON)
    assert python.is_file(), f"{python} does not exist (make .venv-labelstudio)"
    return python


def _sdk_check(python: Path, predictions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    job = json.dumps({"config": CONFIG, "predictions": predictions})
    ran = subprocess.run(
        [str(python), "-c", SDK_SCRIPT], input=job, capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    answers: list[dict[str, Any]] = json.loads(ran.stdout)
    return answers


def _predict(client: TestClient, tasks: list[dict[str, Any]], project: str = "") -> Any:
    body = {"tasks": tasks, "label_config": CONFIG, "project": project, "params": {}}
    response = client.post(f"/label-studio/{MODEL}/predict", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_health_setup_and_webhook_follow_the_ml_backend_contract(backend: TestClient) -> None:
    base = f"/label-studio/{MODEL}"
    assert backend.get(f"{base}/health").json()["status"] == "UP"
    assert backend.get("/label-studio/nope/health").status_code == 404
    setup = backend.post(f"{base}/setup", json={"project": "7", "schema": CONFIG})
    assert setup.status_code == 200
    assert "gradcam" in setup.json()["model_version"]
    event = {"action": "ANNOTATION_CREATED", "annotation": {"id": 1}}
    assert backend.post(f"{base}/webhook", json=event).status_code == 200
    bad = backend.post(f"{base}/setup", json={"project": "8", "extra_params": {"method": "x"}})
    assert bad.status_code == 422


def test_a_task_image_from_label_studio_gets_a_brush_on_the_cat_and_the_choice(
    backend: TestClient, servers: dict[str, Any], sdk_python: Path
) -> None:
    data_uri = "data:image/png;base64," + base64.b64encode(CHELSEA).decode()
    results = _predict(
        backend,
        [{"data": {"image": "/data/upload/1/chelsea.png"}}, {"data": {"image": data_uri}}],
    )
    assert "/data/upload/1/chelsea.png" in servers["origin_hits"]
    for prediction in results:
        kinds = {r["type"]: r for r in prediction["result"]}
        assert kinds["choices"]["value"]["choices"] == ["a cat having a striped coat"]
        brush = kinds["brushlabels"]
        assert brush["value"]["brushlabels"] == ["cat"]  # the tag has no "tiger cat": its first
        assert (brush["original_width"], brush["original_height"]) == (451, 300)
        assert prediction["score"] > 0.2
    for answer in _sdk_check(sdk_python, results):
        assert answer["errors"] == []
        (mask,) = (np.asarray(m, dtype=bool) for m in answer["masks"])
        assert mask.shape == (300, 451)
        assert abs(mask.mean() - 0.2) < 0.01  # the map's top 20% of the image
        rows, columns = np.nonzero(mask)
        # chelsea's cat: its face and body fill the middle of the photo, not the top corners
        assert 60 < rows.mean() < 240
        assert 100 < columns.mean() < 350
        assert not mask[:40, :40].any()


def test_a_project_sets_its_method_and_brush_share(backend: TestClient, sdk_python: Path) -> None:
    extra = json.dumps({"method": "saliency", "brush_fraction": 0.05})
    setup = backend.post(
        f"/label-studio/{MODEL}/setup", json={"project": "11", "extra_params": extra}
    )
    assert "saliency" in setup.json()["model_version"]
    (prediction,) = _predict(backend, [{"data": {"image": "/data/upload/1/chelsea.png"}}], "11")
    assert "saliency" in prediction["model_version"]
    ((mask,),) = (a["masks"] for a in _sdk_check(sdk_python, [prediction]))
    assert abs(np.asarray(mask, dtype=bool).mean() - 0.05) < 0.005


def test_foreign_urls_never_reach_the_network_and_the_other_tasks_still_answer(
    backend: TestClient, servers: dict[str, Any]
) -> None:
    foreign = servers["foreign"]
    hostile = [
        f"{foreign}/image.png",  # another port
        f"{servers['origin']}/redirect",  # the origin sends us elsewhere
        "file:///etc/passwd",
        "ftp://127.0.0.1/x.png",
        "//127.0.0.1:1/x.png",
        "data:image/png,not-base64",
    ]
    tasks = [{"data": {"image": url}} for url in hostile]
    tasks.append({"data": {"other": "no image field"}})
    tasks.append({"data": {"image": "/data/upload/1/chelsea.png"}})
    results = _predict(backend, tasks)
    assert [len(r["result"]) > 0 for r in results] == [False] * 7 + [True]
    assert servers["foreign_hits"] == []
    assert "/redirect" in servers["origin_hits"]


def test_an_image_over_the_upload_limit_is_cut_off_while_it_is_read(
    default_model_dir: Path, servers: dict[str, Any]
) -> None:
    assert len(CHELSEA) > 100_000
    settings = {
        "label_studio_url": servers["origin"],
        "label_studio_api_key": TOKEN,
        "max_image_bytes": 100_000,
    }
    with make_client(default_model_dir, **settings) as small:
        (prediction,) = _predict(small, [{"data": {"image": "/data/upload/1/chelsea.png"}}])
    assert prediction["result"] == []


# ---- a real Label Studio -------------------------------------------------------------------

ENABLE_LEGACY_TOKENS = """
import pathlib, sys
import label_studio
sys.path.insert(0, str(pathlib.Path(label_studio.__file__).parent))
import django
django.setup()
from jwt_auth.models import JWTSettings
JWTSettings.objects.update(legacy_api_tokens_enabled=True)
"""

FLOW_SCRIPT = """
import json, sys
import httpx
import numpy as np
from label_studio_sdk import LabelStudio
from label_studio_sdk.converter.brush import decode_rle

base, token, backend, config, image = sys.argv[1:6]
auth = {"Authorization": f"Token {token}"}
ls = LabelStudio(base_url=base, api_key=token)
project = ls.projects.create(title="onnx-explain", label_config=config)
with open(image, "rb") as upload:
    imported = httpx.post(
        f"{base}/api/projects/{project.id}/import", headers=auth, timeout=120,
        files={"file": ("chelsea.png", upload, "image/png")},
    )
imported.raise_for_status()
(task,) = ls.tasks.list(project=project.id)
ml = ls.ml.create(url=backend, project=project.id, title="onnx-explain", is_interactive=False)
retrieved = httpx.post(
    f"{base}/api/dm/actions", headers=auth, timeout=300,
    params={"id": "retrieve_tasks_predictions", "project": project.id},
    json={"selectedItems": {"all": True, "excluded": []}},
)
retrieved.raise_for_status()
(prediction,) = ls.predictions.list(task=task.id)
answer = {"image": task.data["image"], "ml_state": ml.state, "score": prediction.score,
          "model_version": prediction.model_version, "regions": []}
for region in prediction.result:
    found = {"type": region["type"], "from_name": region["from_name"]}
    if region["type"] == "choices":
        found["choices"] = region["value"]["choices"]
    else:
        pixels = decode_rle(region["value"]["rle"]).reshape(
            region["original_height"], region["original_width"], 4)
        mask = pixels[:, :, 3] == 255
        rows, columns = np.nonzero(mask)
        found.update(labels=region["value"]["brushlabels"], shape=list(mask.shape),
                     share=float(mask.mean()), centre=[float(rows.mean()), float(columns.mean())],
                     corner=bool(mask[:40, :40].any()))
    answer["regions"].append(found)
json.dump(answer, sys.stdout)
"""


@pytest.fixture(scope="module")
def label_studio(sdk_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Label Studio on a free port, SQLite in a temp folder, a user with a legacy API token.

    Its own SSRF guard refuses ML backends and URLs on local addresses, where this test puts
    the service: both are turned off here (ML_BLOCK_LOCAL_IP, SSRF_PROTECTION_ENABLED), as a
    deployment on a private network would.
    """
    data = tmp_path_factory.mktemp("label-studio")
    port = free_port()
    env = {
        **os.environ,
        "LABEL_STUDIO_BASE_DATA_DIR": str(data),
        "DJANGO_DB": "sqlite",
        "LATEST_VERSION_CHECK": "false",  # it would wait on pypi.org
        "ML_BLOCK_LOCAL_IP": "false",
        "SSRF_PROTECTION_ENABLED": "false",
    }
    command = [
        str(sdk_python.parent / "label-studio"),
        "start",
        "--no-browser",
        "--port",
        str(port),
        "--username",
        "admin@example.com",
        "--password",
        "admin-password-for-tests",
        "--user-token",
        TOKEN,
    ]
    log = data / "label-studio.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(base, process, log, seconds=240, path="/health")
        env["DJANGO_SETTINGS_MODULE"] = "core.settings.label_studio"
        enabled = subprocess.run(
            [str(sdk_python), "-c", ENABLE_LEGACY_TOKENS], env=env, capture_output=True, timeout=120
        )
        assert enabled.returncode == 0, enabled.stderr.decode()[-2000:]
        yield base
    finally:
        process.terminate()
        process.wait(timeout=60)


def test_a_real_label_studio_connects_the_backend_and_gets_a_brush_on_the_cat(
    label_studio: str, sdk_python: Path, default_model_dir: Path, tmp_path: Path
) -> None:
    log = tmp_path / "service.log"
    image = tmp_path / "chelsea.png"
    image.write_bytes(CHELSEA)
    settings = {"LABEL_STUDIO_URL": label_studio, "LABEL_STUDIO_API_KEY": TOKEN}
    with serving(default_model_dir, log, 120, **settings) as service:
        backend = f"{service}/label-studio/{MODEL}"
        arguments = [label_studio, TOKEN, backend, CONFIG, str(image)]
        ran = subprocess.run(
            [str(sdk_python), "-c", FLOW_SCRIPT, *arguments],
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert ran.returncode == 0, f"{ran.stderr[-3000:]}\\n{log.read_text()[-3000:]}"
    answer = json.loads(ran.stdout)
    assert answer["image"].startswith("/data/upload/")  # Label Studio's own upload, fetched
    assert answer["model_version"].startswith(f"onnx-explain-{MODEL}-")
    assert answer["score"] > 0.2
    regions = {region["type"]: region for region in answer["regions"]}
    assert regions["choices"]["choices"] == ["a cat having a striped coat"]
    brush = regions["brushlabels"]
    assert brush["labels"] == ["cat"]
    assert brush["shape"] == [300, 451]
    assert abs(brush["share"] - 0.2) < 0.01
    assert 60 < brush["centre"][0] < 240
    assert 100 < brush["centre"][1] < 350
    assert not brush["corner"]
