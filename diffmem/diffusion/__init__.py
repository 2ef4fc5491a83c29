"""Diffusion models in the EDM formulation: preconditioned denoisers, training losses,
the closed-form optimal denoiser, and samplers."""
from .closed_form import EmpiricalOptimalDenoiser
from .denoiser import Denoiser
from .loss import EDMLoss, VELoss, VPLoss
from .precond import EDMPrecond, VEPrecond, VPPrecond, vp_sigma, vp_sigma_inv
from .samplers import StackedRandomGenerator, edm_schedule, euler_sampler, generate, heun_sampler

__all__ = [
    "Denoiser",
    "EmpiricalOptimalDenoiser",
    "VPPrecond",
    "VEPrecond",
    "EDMPrecond",
    "vp_sigma",
    "vp_sigma_inv",
    "VPLoss",
    "VELoss",
    "EDMLoss",
    "edm_schedule",
    "heun_sampler",
    "euler_sampler",
    "StackedRandomGenerator",
    "generate",
]
