"""The objective: pure math on tensors, no Ray, no MLflow, no I/O.

Every loss term has one call shape (``raydino.objectives.base.LossTerm``); ``Objective``
weights and sums the terms that ``build_objective`` finds switched on in the config.
"""

from raydino.objectives.base import LossTerm, Outputs, Temperatures, TermOutput, Views
from raydino.objectives.centering import Centering, make_centering
from raydino.objectives.dino import DINOTerm
from raydino.objectives.ibot import IBOTPatchTerm
from raydino.objectives.koleo import KoLeoTerm, koleo_loss
from raydino.objectives.objective import LOSS_TERMS, Objective, ObjectiveOutput, build_objective
from raydino.objectives.teacher import TeacherTargets, scaled_logits
from raydino.objectives.vmf import bessel_ratio, log_vmf_normalizer, vmf_logits

__all__ = [
    "LOSS_TERMS",
    "Centering",
    "DINOTerm",
    "IBOTPatchTerm",
    "KoLeoTerm",
    "LossTerm",
    "Objective",
    "ObjectiveOutput",
    "Outputs",
    "TeacherTargets",
    "Temperatures",
    "TermOutput",
    "Views",
    "bessel_ratio",
    "build_objective",
    "koleo_loss",
    "log_vmf_normalizer",
    "make_centering",
    "scaled_logits",
    "vmf_logits",
]
