"""Models: pure torch and timm, no Ray, no MLflow."""

from raydino.models.ema import ema_update
from raydino.models.head import DINOHead
from raydino.models.network import MultiCropNetwork, build_student_teacher, create_backbone
from raydino.models.param_groups import param_groups
from raydino.models.preprocess import normalize_crops

__all__ = [
    "DINOHead",
    "MultiCropNetwork",
    "build_student_teacher",
    "create_backbone",
    "ema_update",
    "normalize_crops",
    "param_groups",
]
