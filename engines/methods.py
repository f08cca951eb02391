"""The explanation methods the service offers, by the names requests use."""

from engines.cam import GradCam, GradCamPlusPlus, HiResCam, LayerCam, XGradCam
from engines.classic_cam import ClassicCam
from engines.explain import Explainer
from engines.occlusion import Occlusion
from engines.saliency import (
    GradientTimesInput,
    GuidedBackprop,
    GuidedGradCam,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
)

EXPLAINERS: dict[str, Explainer] = {
    "gradcam": GradCam(),
    "gradcam++": GradCamPlusPlus(),
    "xgradcam": XGradCam(),
    "layercam": LayerCam(),
    "hirescam": HiResCam(),
    "guided_gradcam": GuidedGradCam(),
    "saliency": Saliency(),
    "guided_backprop": GuidedBackprop(),
    "smoothgrad": SmoothGrad(),
    "integrated_gradients": IntegratedGradients(),
    "gradient_x_input": GradientTimesInput(),
    "occlusion": Occlusion(),
    "cam": ClassicCam(),
}
