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
    mode: Literal["exact", "fast"] = Field(
        default="exact",
        description="`exact`: every window of the stride's grid. `fast`: a coarse pass with "
        "`coarse_stride`, then the exact windows only where the coarse map is in its top "
        "`fast_fraction`; elsewhere the map is the coarse one.",
    )
    coarse_stride: int | None = Field(
        default=None,
        ge=1,
        le=4096,
        description="Stride of `fast` mode's coarse pass, rounded up to a multiple of `stride` "
        "(at least twice it; the default).",
    )
    fast_fraction: float = Field(
        default=0.05,
        ge=0.01,
        le=1.0,
        description="The share of the image, by the coarse map's rank, that `fast` mode "
        "computes exactly.",
    )


MAX_PERTURBED_PASSES = 65_536
"""The schema's ceiling on a black-box method's passes; the service's `max_passes` setting is
usually far lower and refuses with 422 and the count."""


class _PerturbationParams(_Params):
    """What the black-box methods share: the score they read and what hides a pixel."""

    score: Literal["probability", "logit"] = Field(
        default="probability",
        description="The target's softmax probability (RISE's and LIME's scores) or its logit.",
    )
    baseline: Literal["zeros", "constant", "mean", "blur"] = Field(
        default="zeros",
        description="What a pixel turns into where a mask hides it: the zero input tensor (the "
        "peers' default: with mean/std normalisation, the data set's mean colour), a constant "
        "pixel value, the image's mean colour, or a blurred copy of the image.",
    )
    value: int = Field(default=128, ge=0, le=255, description="Pixel value for `constant`.")
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    max_passes: int | None = Field(
        default=None, ge=1, description="Refuse the request above this many passes."
    )


class RiseParams(_PerturbationParams):
    masks: int = Field(
        default=4000,
        ge=1,
        le=MAX_PERTURBED_PASSES,
        description="Random masks, one forward pass each (the paper's 4000).",
    )
    grid: int = Field(
        default=7, ge=2, le=64, description="Side of the coarse random grid (the paper's 7)."
    )
    probability: float = Field(
        default=0.5,
        gt=0.0,
        le=1.0,
        description="Chance that a grid cell keeps the image (the paper's 0.5).",
    )


class SuperpixelParams(_PerturbationParams):
    score: Literal["probability", "logit"] = Field(
        default="logit",
        description="The target's logit (the model's raw output, which Captum's Lime and "
        "KernelShap fit on a classifier) or its softmax probability. Superpixels move a "
        "probability by less than the Lasso's default alpha shrinks away.",
    )
    baseline: Literal["zeros", "constant", "mean", "blur", "superpixel_mean"] = Field(  # type: ignore[assignment]
        default="constant",
        description="What a switched-off superpixel turns into: `constant` grey (`value` 128, "
        "as occlusion and the deletion metric), the zero input tensor (Captum's default), the "
        "image's mean colour, a blurred copy, or each superpixel's own mean colour "
        "(`superpixel_mean`, the lime package's default).",
    )
    samples: int = Field(
        default=1000,
        ge=2,
        le=MAX_PERTURBED_PASSES,
        description="Perturbed copies, one forward pass each.",
    )
    segmentation: Literal["slic", "quickshift"] = Field(
        default="slic", description="scikit-image's segmentation that makes the superpixels."
    )
    segments: int = Field(
        default=50, ge=2, le=500, description="SLIC: the number of superpixels aimed at."
    )
    compactness: float = Field(
        default=10.0, gt=0.0, le=1000.0, description="SLIC: colour against space."
    )
    kernel_size: float = Field(
        default=4.0, ge=1.0, le=8.0, description="Quickshift: the density kernel's width."
    )
    max_dist: float = Field(
        default=200.0, gt=0.0, le=1000.0, description="Quickshift: the cut-off of its tree."
    )
    ratio: float = Field(
        default=0.2, ge=0.0, le=1.0, description="Quickshift: colour against space."
    )


class LimeParams(SuperpixelParams):
    alpha: float = Field(
        default=0.01,
        ge=0.0,
        le=100.0,
        description="The Lasso's L1 weight (Captum's 0.01); 0 fits weighted least squares.",
    )
    kernel_width: float = Field(
        default=1.0,
        gt=0.0,
        le=100.0,
        description="Width of the exponential kernel on the cosine distance between the input "
        "and each perturbed copy (Captum's 1.0).",
    )


class KernelShapParams(SuperpixelParams):
    """Shapley-kernel weights come from the sampling; nothing else to set."""
