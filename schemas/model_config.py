"""The `config.json` that sits beside each `model.onnx` in the model repository."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Layout = Literal["NCHW", "NHWC"]


def channel_axis(layout: Layout) -> int:
    """The channel axis of a batched 4-D tensor in `layout`."""
    return 1 if layout == "NCHW" else 3


def spatial_axes(layout: Layout) -> tuple[int, int]:
    """The height and width axes of a batched 4-D tensor in `layout`."""
    return (2, 3) if layout == "NCHW" else (1, 2)


class InputSpec(BaseModel):
    """How a decoded RGB uint8 image becomes the model's input tensor.

    tensor = (pixel * scale - mean) / std, per channel in the model's channel order.
    """

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(
        default=None, max_length=256, description="Input name; the model's first input if unset."
    )
    height: int = Field(ge=8, le=4096)
    width: int = Field(ge=8, le=4096)
    resize: Literal["resize", "center_crop"] = Field(
        default="resize",
        description="`resize` stretches to height x width; `center_crop` scales the shorter "
        "side to size / crop_fraction and cuts the centre.",
    )
    crop_fraction: float = Field(default=0.875, gt=0.0, le=1.0)
    color: Literal["RGB", "BGR", "GRAY"] = Field(
        default="RGB",
        description="The model's channels: `GRAY` is one channel of luminance (ITU-R 601-2, "
        "as PIL's convert('L') and torchvision's Grayscale compute it).",
    )
    layout: Layout = "NCHW"
    scale: float = Field(default=1.0 / 255.0, gt=0.0, le=1.0)
    mean: tuple[float, float, float] | tuple[float] = (0.0, 0.0, 0.0)
    std: tuple[float, float, float] | tuple[float] = (1.0, 1.0, 1.0)

    @property
    def channels(self) -> int:
        return 1 if self.color == "GRAY" else 3

    @property
    def image_dims(self) -> tuple[int, int, int]:
        """One image's input dims, without the batch axis: (C, H, W) or (H, W, C)."""
        if self.layout == "NCHW":
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)

    @property
    def spatial_axes(self) -> tuple[int, int]:
        """The height and width axes of the model's batched input tensor."""
        return spatial_axes(self.layout)

    @model_validator(mode="after")
    def _std_positive(self) -> "InputSpec":
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        for name in ("mean", "std"):
            values = getattr(self, name)
            if len(values) == self.channels:
                continue
            if self.channels == 1 and len(set(values)) == 1:  # the default, or one value thrice
                setattr(self, name, (values[0],))
                continue
            raise ValueError(f"{name} needs {self.channels} value(s) for color {self.color}")
        return self


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    description: str = Field(default="", max_length=1000)
    input: InputSpec
    output: Literal["logits", "probabilities"] = "logits"
    output_name: str | None = Field(
        default=None, max_length=256, description="Output name; the model's first output if unset."
    )
    labels_file: str | None = Field(
        default="labels.txt",
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="One label per line, in class-index order, in the model's folder.",
    )
