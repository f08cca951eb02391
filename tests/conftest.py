from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from engines.models.repository import ModelRepository
from engines.runtime.session import RuntimeOptions
from service.app import create_app
from service.settings import Settings
from tests.tiny_models import write_model_folder

CPU = RuntimeOptions(providers="cpu", intra_op_threads=1)


@pytest.fixture(scope="session")
def tiny_repository_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`tiny` (a working CNN), `broken` (garbage model.onnx) and a folder with an odd name."""
    root = tmp_path_factory.mktemp("repository")
    write_model_folder(root / "tiny")
    broken = write_model_folder(root / "broken")
    (broken / "model.onnx").write_bytes(b"this is not an onnx protobuf")
    write_model_folder(root / "bad name!")
    return root


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A repository holding the real EfficientNet-Lite0, built by our own converter."""
    from engines.models.zoo import build_model

    root = tmp_path_factory.mktemp("default-models")
    build_model("efficientnet-lite0", root)
    write_model_folder(root / "tiny")
    return root


def make_client(root: Path, **overrides: Any) -> TestClient:
    settings = Settings(
        model_repository=root,
        cache_dir=root / ".cache",
        providers="cpu",
        intra_op_threads=2,
        **overrides,
    )
    repository = ModelRepository(root, CPU, cache_dir=settings.cache_dir)
    repository.load_all()
    return TestClient(create_app(settings, repository))


@pytest.fixture(scope="session")
def tiny_client(tiny_repository_dir: Path) -> Iterator[TestClient]:
    with make_client(tiny_repository_dir) as client:
        yield client


@pytest.fixture(scope="session")
def client(default_model_dir: Path) -> Iterator[TestClient]:
    with make_client(default_model_dir, max_body_bytes=4 * 1024 * 1024) as client:
        yield client
