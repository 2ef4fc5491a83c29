"""Preconditioning of a raw network F into a denoiser D(x; sigma), as in EDM (Karras et al.
2022, Table 1):

    D(x; sigma) = c_skip(sigma) x + c_out(sigma) F(c_in(sigma) x, c_noise(sigma))

with x = y + sigma n, y the data in [-1, 1]. The wrapped network is stored as `model`, so a
state dict has the keys `model.<...>` of EDM's checkpoints and loads either way.

The network is called as model(x_in, c_noise, class_labels=..., **model_kwargs) with x_in of
shape (B, C, H, W) and c_noise of shape (B,) (or (1,) for one sigma shared by the batch).
"""
from __future__ import annotations

import math

import torch


def vp_sigma(t, beta_d: float, beta_min: float) -> torch.Tensor:
    """Noise level of the VP SDE at time t: sigma(t) = sqrt(exp(beta_d t^2 / 2 + beta_min t) - 1)."""
    t = torch.as_tensor(t)
    return ((0.5 * beta_d * t**2 + beta_min * t).exp() - 1).sqrt()


def vp_sigma_inv(sigma, beta_d: float, beta_min: float) -> torch.Tensor:
    """Inverse of vp_sigma: the positive root t of beta_d t^2 / 2 + beta_min t = ln(1 + sigma^2)."""
    sigma = torch.as_tensor(sigma)
    return ((beta_min**2 + 2 * beta_d * (1 + sigma**2).log()).sqrt() - beta_min) / beta_d


class _Precond(torch.nn.Module):
    """What VP, VE and EDM share: the input handling and D = c_skip x + c_out F. Subclasses
    give the four coefficients."""

    def __init__(self, model: torch.nn.Module, img_resolution: int, img_channels: int, label_dim: int, use_fp16: bool):
        super().__init__()
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.model = model

    def coefficients(self, sigma: torch.Tensor):
        """(c_skip, c_out, c_in, c_noise) for sigma of shape (B, 1, 1, 1)."""
        raise NotImplementedError

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        # One sigma per image (or one for all): broadcast over (C, H, W).
        sigma = torch.as_tensor(sigma, device=x.device).to(torch.float32).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            # A conditional network asked for no label sees the all-zero label, broadcast over the batch.
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        # fp16 only on CUDA, where it is fast; the coefficients and the skip stay in fp32.
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == "cuda") else torch.float32

        c_skip, c_out, c_in, c_noise = self.coefficients(sigma)
        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if F_x.dtype != dtype:
            raise TypeError(f"the wrapped model returned {F_x.dtype} for {dtype} input")
        D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    def round_sigma(self, sigma):
        # Continuous-time formulations: every sigma is a valid noise level.
        return torch.as_tensor(sigma)


class VPPrecond(_Precond):
    """Variance preserving (Song et al. 2021, VP SDE): F predicts the noise n (c_out = -sigma),
    the input is scaled to unit variance, and the network sees the DDPM step index
    c_noise = (M - 1) t(sigma)."""

    def __init__(
        self,
        model: torch.nn.Module,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        beta_d: float = 19.9,  # extent of the noise level schedule
        beta_min: float = 0.1,  # initial slope of the noise level schedule
        M: int = 1000,  # number of DDPM steps the network's time input is scaled to
        epsilon_t: float = 1e-5,  # smallest time t, which sets sigma_min
    ):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.M = M
        self.epsilon_t = epsilon_t
        self.sigma_min = float(self.sigma(epsilon_t))
        self.sigma_max = float(self.sigma(1))

    def coefficients(self, sigma):
        c_skip = 1
        c_out = -sigma
        c_in = 1 / (sigma**2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise

    def sigma(self, t):
        return vp_sigma(t, self.beta_d, self.beta_min)

    def sigma_inv(self, sigma):
        return vp_sigma_inv(sigma, self.beta_d, self.beta_min)


class VEPrecond(_Precond):
    """Variance exploding (Song et al. 2021, VE SDE): F predicts the scaled noise n
    (c_out = sigma), the input is not scaled, and the network sees c_noise = ln(sigma / 2)."""

    def __init__(
        self,
        model: torch.nn.Module,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.02,
        sigma_max: float = 100,
    ):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def coefficients(self, sigma):
        c_skip = 1
        c_out = sigma
        c_in = 1
        c_noise = (0.5 * sigma).log()
        return c_skip, c_out, c_in, c_noise


class EDMPrecond(_Precond):
    """EDM (Karras et al. 2022): unit-variance input and training target for data of standard
    deviation sigma_data, with c_skip mixing x and F so that F's error is amplified least;
    c_noise = ln(sigma) / 4."""

    def __init__(
        self,
        model: torch.nn.Module,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0,
        sigma_max: float = math.inf,
        sigma_data: float = 0.5,  # expected standard deviation of the training data
    ):
        super().__init__(model, img_resolution, img_channels, label_dim, use_fp16)
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data

    def coefficients(self, sigma):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise
