"""lgm-ext: fused Large-Margin Gaussian Mixture loss and attack operators for PyTorch.

The core library: operators (``torch.ops.lgm_ext``), the functional API, the
``nn`` modules, the pure-PyTorch reference and the attacks.  It depends on
torch only; the paper-reproduction application (models, data, training,
experiments, benchmarks) is the separate package ``lgm_lab``::

    import lgm_ext
    loss = lgm_ext.lgm_loss(features, means, log_var, labels, alpha=1.0, lambda_=0.1)
"""
from . import detectors as detectors  # the detector family: lgm_ext.detectors.create(name, head, ...)
from ._ops import DIRECT_MAX_KD, IMPLS, has_cuda_kernels, has_fused_kernels
from ._version import __version__
from .deploy import RejectingClassifier
from .detector import LikelihoodDetector
from .functional import lgm_log_likelihood, lgm_logits, lgm_loss, lgm_loss_and_logits, pgd_step, pgd_step_
from .inverse import InverseAdversaryCenterLoss, inverse_adversary_features
from .modules import CenterLoss, Classifier, LGMLoss, NonFiniteLossError, param_groups

__all__ = [
    "lgm_loss",
    "lgm_loss_and_logits",
    "lgm_logits",
    "lgm_log_likelihood",
    "pgd_step",
    "pgd_step_",
    "LGMLoss",
    "NonFiniteLossError",
    "CenterLoss",
    "Classifier",
    "InverseAdversaryCenterLoss",
    "inverse_adversary_features",
    "param_groups",
    "LikelihoodDetector",
    "RejectingClassifier",
    "has_cuda_kernels",
    "has_fused_kernels",
    "IMPLS",
    "DIRECT_MAX_KD",
    "__version__",
]
