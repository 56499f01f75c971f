"""Losses: Hungarian matcher, DETR set criterion, and SimVG's total loss with DWBD distillation."""

from simvg.losses.criterion import SetCriterion
from simvg.losses.distill import SimVGLoss, teacher_targets
from simvg.losses.matcher import HungarianMatcher

__all__ = ["HungarianMatcher", "LossConfig", "SetCriterion", "SimVGLoss", "teacher_targets"]
