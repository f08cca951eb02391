"""Method-specific `params` of an explain request, one bounded model per method family."""

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

Reduction = Literal["abs_max", "max", "sum", "abs_sum"]
Baseline = Literal["black", "white", "grey", "zeros", "blur"]
BASELINE_DESCRIPTION = (
    "Pixel-space baseline (black, white, mid-grey or a blurred copy), or a zero input tensor."
)


class _Params(BaseModel):
    model_config = ConfigDict(extra="forbid")


class CamParams(_Params):
    layer: str | None = Field(
        default=None,
        max_length=256,
        description="A layer from GET /v1/models/{name}; the model's default layer if unset.",
    )


class SaliencyParams(_Params):
    reduction: Reduction = Field(
        default="abs_max",
        description="How the per-channel input gradient becomes one map: `abs_max` (as "
        "practitioners use it), `max`, `sum` (signed) or `abs_sum`.",
    )


class SmoothGradParams(SaliencyParams):
    samples: int = Field(default=25, ge=1, le=200)
    noise: float = Field(
        default=0.15, ge=0.0, le=1.0, description="Noise std as a fraction of the input range."
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class IntegratedGradientsParams(_Params):
    reduction: Reduction = "sum"
    steps: int = Field(default=32, ge=2, le=512)
    baseline: Baseline = Field(default="black", description=BASELINE_DESCRIPTION)


class GradientTimesInputParams(_Params):
    reduction: Reduction = "sum"


class GuidedGradCamParams(CamParams):
    pass


class ForwardCamParams(CamParams):
    """Score-CAM and Ablation-CAM: one forward pass per channel of the layer."""

    max_passes: int | None = Field(
        default=None, ge=1, description="Refuse the request above this many passes."
    )


class DeepLiftParams(_Params):
    reduction: Reduction = "sum"
    baseline: Baseline = Field(default="black", description=BASELINE_DESCRIPTION)


class GradientShapParams(DeepLiftParams):
    samples: int = Field(default=5, ge=1, le=512, description="Random points, as Captum's.")
    stdevs: float = Field(
        default=0.0,
        ge=0.0,
        le=100.0,
        description="Std of the Gaussian noise added to the input, in input-tensor units.",
    )
    seed: int = Field(default=0, ge=0, le=2**31 - 1)


class ClassicCamParams(_Params):
    """The original CAM has no knobs: the layer is the one the model's head pools."""


class OcclusionParams(_Params):
    window: int = Field(default=16, ge=1, le=4096, description="Side of the square patch.")
    stride: int = Field(default=8, ge=1, le=4096)
    baseline: Literal["constant", "mean", "blur"] = Field(
        default="constant",
        description="What covers the patch: a constant pixel value, the image's mean colour, "
        "or a blurred copy of the image.",
    )
    value: int = Field(default=128, ge=0, le=255, description="Pixel value for `constant`.")
    score: Literal["probability", "logit", "feature_dip"] = Field(
        default="probability",
        description="The map is the drop of the target's probability or logit from the clean "
        "image, or (`feature_dip`) the largest per-channel drop of a layer's mean activation.",
    )
    layer: str | None = Field(
        default=None, max_length=256, description="Layer for `feature_dip`; default layer if unset."
    )
    max_passes: int | None = Field(
        default=None, ge=1, description="Refuse the request above this many passes."
    )
