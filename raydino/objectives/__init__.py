"""The objective: pure math on tensors, no Ray, no MLflow, no I/O."""

from raydino.objectives.centering import Centering, make_centering
from raydino.objectives.dino import DINOLoss, LossOutput
from raydino.objectives.koleo import koleo_loss
from raydino.objectives.vmf import bessel_ratio, log_vmf_normalizer, vmf_logits

__all__ = [
    "Centering",
    "DINOLoss",
    "LossOutput",
    "bessel_ratio",
    "koleo_loss",
    "log_vmf_normalizer",
    "make_centering",
    "vmf_logits",
]
