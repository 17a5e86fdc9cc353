"""lgm-ext: fused Large-Margin Gaussian Mixture loss and attack operators for PyTorch.

Operators live under ``torch.ops.lgm_ext``; this package wraps them::

    import lgm_ext
    loss = lgm_ext.lgm_loss(features, means, log_var, labels, alpha=1.0, lambda_=0.1)
"""
from ._ops import force_impl, has_cuda_kernels
from .functional import lgm_log_likelihood, lgm_logits, lgm_loss, lgm_loss_and_logits, pgd_step, pgd_step_
from .modules import CenterLoss, LGMLoss

__version__ = "0.1.0"

__all__ = [
    "lgm_loss",
    "lgm_loss_and_logits",
    "lgm_logits",
    "lgm_log_likelihood",
    "pgd_step",
    "pgd_step_",
    "LGMLoss",
    "CenterLoss",
    "force_impl",
    "has_cuda_kernels",
]
