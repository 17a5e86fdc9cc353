"""The training recipe: how a :class:`~lgm_lab.config.TrainConfig` becomes a feature network, a head,
an optimizer and a learning-rate schedule."""
from __future__ import annotations

import torch
from torch import nn

import lgm_ext

from .config import TrainConfig, dataset_info
from .devices import resolve_device
from .heads import HEADS, build_head
from .models import build_model

__all__ = ["warmup_steps", "total_steps", "build_model_and_head", "make_optimizer", "make_scheduler"]


def warmup_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The L-GM ramp length in optimizer steps: ``cfg.warmup_steps`` when set, else ``warmup_epochs`` of
    ``steps_per_epoch``."""
    if cfg.warmup_steps is not None:
        return cfg.warmup_steps
    return max(1, int(cfg.warmup_epochs * steps_per_epoch)) if cfg.warmup_epochs > 0 else 0


def total_steps(cfg: TrainConfig, steps_per_epoch: int) -> int:
    """The run's SGD steps: ``cfg.steps`` when set (the last epoch cut short), else ``epochs`` full epochs."""
    return cfg.steps if cfg.steps is not None else cfg.epochs * steps_per_epoch


def build_model_and_head(cfg: TrainConfig, steps_per_epoch: int = 0) -> tuple[nn.Module, nn.Module]:
    """The feature network and the head of ``cfg`` on its device; the head gets exactly the config
    fields it declares (``Head.config_keys``), the warm-up in steps derived from ``steps_per_epoch``."""
    info = dataset_info(cfg.dataset)
    model = build_model(cfg.model, cfg.feat_dim, info["channels"], info["image_size"], feature_relu=cfg.feature_relu,
                        spectral_norm=cfg.spectral_norm, feature_norm=cfg.feature_norm)
    derived = {"warmup_steps": warmup_steps(cfg, steps_per_epoch)}
    kwargs = {k: derived[k] if k in derived else getattr(cfg, k) for k in HEADS[cfg.head].config_keys}
    head = build_head(cfg.head, cfg.feat_dim, cfg.num_classes, **kwargs)  # fewer with cfg.classes
    device = resolve_device(cfg.device)
    return model.to(device), head.to(device)


def make_optimizer(cfg: TrainConfig, model: nn.Module, head: nn.Module) -> torch.optim.Optimizer:
    """SGD over two parameter groups (lgm_ext.param_groups): the network and the head's other
    parameters at ``lr``; the head's class parameters (L-GM means, log-variances) at
    ``lr * head_lr_mult`` with ``head_weight_decay`` -- and a third with ``log_var_lr_mult`` != 1: the
    log-variances at ``lr * head_lr_mult * log_var_lr_mult``.  Parameters without gradient (log-variances of
    the ``ema`` rule) are in none."""
    cls = head.class_parameters()
    ids = {id(p) for p in cls}
    rest = [p for p in (*model.parameters(), *head.parameters()) if id(p) not in ids and p.requires_grad]
    log_var = getattr(head, "log_var", None)
    split = cfg.log_var_lr_mult != 1 and any(p is log_var for p in cls)  # else two groups, as runs always had
    groups = lgm_ext.param_groups(rest, [p for p in cls if not (split and p is log_var)], lr=cfg.lr,
                                  head_lr_mult=cfg.head_lr_mult, weight_decay=cfg.weight_decay,
                                  head_weight_decay=cfg.head_weight_decay)
    if split:  # a third group: the log-variances at lr * head_lr_mult * log_var_lr_mult
        groups.append(dict(groups[1], params=[log_var], lr=groups[1]["lr"] * cfg.log_var_lr_mult))
    return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)


def _step_schedule(total: int):
    return lambda s: 1.0 if s < 0.5 * total else (0.1 if s < 0.75 * total else 0.01)


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer, steps_per_epoch: int):
    """The learning-rate schedule over the run's :func:`total_steps`: one cycle to the peak (``cyclic``),
    x0.1 at 50% and 75% (``step``), or ``constant``."""
    total = total_steps(cfg, steps_per_epoch)
    if cfg.schedule == "cyclic":
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=total)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.LambdaLR(opt, _step_schedule(total))
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
