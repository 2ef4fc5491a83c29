"""Denoising score-matching losses of EDM (Karras et al. 2022, Table 1): draw a noise level
sigma per image, corrupt y to y + sigma n, and weight the denoiser's squared error,

    loss = lambda(sigma) * (D(y + sigma n; sigma) - y)^2      (per element, not reduced)

The three differ only in the distribution of sigma and in lambda. Pass a torch.Generator on
the images' device to make the noise reproducible; without one, the global RNG is used and
the draws are those of EDM's training code.
"""
from __future__ import annotations

import torch

from .precond import vp_sigma


def _denoising_loss(net, images, labels, augment_pipe, sigma, weight, generator):
    y, augment_labels = augment_pipe(images) if augment_pipe is not None else (images, None)
    n = torch.randn(y.shape, generator=generator, dtype=y.dtype, device=y.device) * sigma
    # Only an augmenting pipeline produces augment_labels; networks without augmentation
    # conditioning need not accept the argument.
    kwargs = {} if augment_labels is None else {"augment_labels": augment_labels}
    D_yn = net(y + n, sigma, labels, **kwargs)
    return weight * ((D_yn - y) ** 2)


class VPLoss:
    """VP: t ~ U(epsilon_t, 1), sigma = sigma_VP(t), lambda = 1 / sigma^2 (unit weight on the
    predicted noise)."""

    def __init__(self, beta_d: float = 19.9, beta_min: float = 0.1, epsilon_t: float = 1e-5):
        self.beta_d = beta_d
        self.beta_min = beta_min
        self.epsilon_t = epsilon_t

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], generator=generator, device=images.device)
        sigma = self.sigma(1 + rnd_uniform * (self.epsilon_t - 1))
        weight = 1 / sigma**2
        return _denoising_loss(net, images, labels, augment_pipe, sigma, weight, generator)

    def sigma(self, t):
        return vp_sigma(t, self.beta_d, self.beta_min)


class VELoss:
    """VE: ln sigma ~ U(ln sigma_min, ln sigma_max), lambda = 1 / sigma^2."""

    def __init__(self, sigma_min: float = 0.02, sigma_max: float = 100):
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None):
        rnd_uniform = torch.rand([images.shape[0], 1, 1, 1], generator=generator, device=images.device)
        sigma = self.sigma_min * ((self.sigma_max / self.sigma_min) ** rnd_uniform)
        weight = 1 / sigma**2
        return _denoising_loss(net, images, labels, augment_pipe, sigma, weight, generator)


class EDMLoss:
    """EDM: ln sigma ~ N(P_mean, P_std^2), lambda = (sigma^2 + sigma_data^2) / (sigma sigma_data)^2,
    which makes the effective training target of F unit-weighted at every sigma."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5):
        self.P_mean = P_mean
        self.P_std = P_std
        self.sigma_data = sigma_data

    def __call__(self, net, images, labels=None, augment_pipe=None, generator=None):
        rnd_normal = torch.randn([images.shape[0], 1, 1, 1], generator=generator, device=images.device)
        sigma = (rnd_normal * self.P_std + self.P_mean).exp()
        weight = (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2
        return _denoising_loss(net, images, labels, augment_pipe, sigma, weight, generator)
