"""The explanation methods the service offers, by the names requests use."""

from engines.methods.cam import (
    EigenCam,
    EigenGradCam,
    GradCam,
    GradCamPlusPlus,
    HiResCam,
    LayerCam,
    XGradCam,
)
from engines.methods.classic_cam import ClassicCam
from engines.methods.forward_cam import AblationCam, ScoreCam
from engines.methods.occlusion import Occlusion
from engines.methods.pipeline import Explainer
from engines.methods.rise import Rise
from engines.methods.saliency import (
    DeepLift,
    GradientShap,
    GradientTimesInput,
    GuidedBackprop,
    GuidedGradCam,
    IntegratedGradients,
    Saliency,
    SmoothGrad,
)
from engines.methods.superpixels import KernelShap, Lime

EXPLAINERS: dict[str, Explainer] = {
    "gradcam": GradCam(),
    "gradcam++": GradCamPlusPlus(),
    "xgradcam": XGradCam(),
    "layercam": LayerCam(),
    "hirescam": HiResCam(),
    "scorecam": ScoreCam(),
    "ablationcam": AblationCam(),
    "eigencam": EigenCam(),
    "eigengradcam": EigenGradCam(),
    "guided_gradcam": GuidedGradCam(),
    "saliency": Saliency(),
    "guided_backprop": GuidedBackprop(),
    "smoothgrad": SmoothGrad(),
    "integrated_gradients": IntegratedGradients(),
    "gradient_x_input": GradientTimesInput(),
    "gradientshap": GradientShap(),
    "deeplift": DeepLift(),
    "occlusion": Occlusion(),
    "cam": ClassicCam(),
    "rise": Rise(),
    "lime": Lime(),
    "kernelshap": KernelShap(),
}
