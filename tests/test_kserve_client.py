"""KServe's own REST client (the `kserve` package's InferenceRESTClient) against the service as
a process: V1 :predict and :explain, and V2 readiness and infer.

The client lives in `.venv-kserve` (kserve pins its own FastAPI, uvicorn and grpc), which
`make unit` builds and names in ONNX_EXPLAIN_KSERVE_PYTHON.
"""

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from tests.images import encode, solid
from tests.servers import serving

KSERVE_PYTHON = os.environ.get("ONNX_EXPLAIN_KSERVE_PYTHON", "")

SCRIPT = """
import asyncio, base64, json, sys
import numpy as np
from kserve import InferenceRESTClient, RESTConfig
from kserve.protocol.infer_type import InferInput, InferRequest

base, red = sys.argv[1], sys.argv[2]
batch = np.asarray(json.loads(sys.argv[3]), dtype=np.float32)

async def main():
    v1 = InferenceRESTClient(RESTConfig(protocol="v1"))
    instances = [{"image": {"b64": red}}]
    predicted = await v1.infer(base, {"instances": instances}, model_name="tiny")
    explained = await v1.explain(
        base, "tiny", {"instances": instances, "method": "gradcam", "targets": ["red"]}
    )
    v2 = InferenceRESTClient(RESTConfig(protocol="v2"))
    ready = await v2.is_server_ready(base)
    tensor = InferInput(name="x", shape=list(batch.shape), datatype="FP32")
    tensor.set_data_from_numpy(batch, binary_data=True)
    request = InferRequest(model_name="tiny", infer_inputs=[tensor])
    answer = await v2.infer(base, request, model_name="tiny")
    logits = answer.outputs[0].as_numpy()
    print(json.dumps({
        "label": predicted["predictions"][0][0]["label"],
        "explained_target": explained["explanations"][0][0]["label"],
        "ready": ready,
        "logits": logits.tolist(),
    }))

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def service(tiny_repository_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with serving(tiny_repository_dir, tmp_path_factory.mktemp("kserve") / "server.log") as base:
        yield base


@pytest.mark.skipif(
    not KSERVE_PYTHON,
    reason="ONNX_EXPLAIN_KSERVE_PYTHON is unset: this test needs .venv-kserve's python "
    "(`make unit` builds the venv and sets it)",
)
def test_kserves_rest_client_speaks_v1_and_v2_with_the_service(
    service: str, tiny_repository_dir: Path
) -> None:
    batch = np.random.default_rng(5).standard_normal((2, 3, 16, 16)).astype(np.float32)
    red = base64.b64encode(encode(solid((220, 10, 10), 20, 30))).decode()
    ran = subprocess.run(
        [KSERVE_PYTHON, "-c", SCRIPT, service, red, json.dumps(batch.tolist())],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    answer = json.loads(ran.stdout)
    assert answer["label"] == "red"
    assert answer["explained_target"] == "red"
    assert answer["ready"] is True
    session = ort.InferenceSession(
        str(tiny_repository_dir / "tiny" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    (expected,) = session.run(None, {"x": batch})
    np.testing.assert_allclose(np.asarray(answer["logits"]), expected, rtol=1e-5, atol=1e-6)
