"""Sampling from a denoiser D(x; sigma) by integrating the probability-flow ODE

    dx / dsigma = (x - D(x; sigma)) / sigma

from sigma_max down to 0 (Karras et al. 2022, Algorithms 1 and 2), and batched generation
with one random stream per seed, as EDM's generate.py does.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from ..memorization import quantize

try:
    from tqdm import tqdm as _tqdm
except ImportError:  # the progress bar is optional
    _tqdm = None


def edm_schedule(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7, round_sigma=None, device=None) -> torch.Tensor:
    """The EDM noise levels: sigma_max to sigma_min evenly spaced in sigma^(1/rho), so that
    steps get finer near the data, followed by a final 0. float64, num_steps + 1 entries.

        sigma_i = (sigma_max^(1/rho) + i / (num_steps - 1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be at least 1, got {num_steps}")
    step_indices = torch.arange(num_steps, dtype=torch.float64, device=device)
    fraction = step_indices / max(num_steps - 1, 1)  # one step: only sigma_max
    sigmas = (sigma_max ** (1 / rho) + fraction * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    if round_sigma is not None:
        sigmas = torch.as_tensor(round_sigma(sigmas), dtype=torch.float64, device=sigmas.device)
    return torch.cat([sigmas, torch.zeros_like(sigmas[:1])])


def _clipped_schedule(denoiser, device, num_steps, sigma_min, sigma_max, rho):
    # Never ask the denoiser for noise levels outside what it was trained on.
    sigma_min = max(sigma_min, denoiser.sigma_min)
    sigma_max = min(sigma_max, denoiser.sigma_max)
    return edm_schedule(num_steps, sigma_min, sigma_max, rho, round_sigma=denoiser.round_sigma, device=device)


def _churn(denoiser, x_cur, t_cur, num_steps, S_churn, S_min, S_max, S_noise, randn_like):
    """Stochastic step of Algorithm 2: raise the noise level from t_cur to
    t_hat = (1 + gamma) t_cur by adding fresh noise, so the ODE solver can correct errors
    made earlier. gamma is 0 outside [S_min, S_max]."""
    if S_churn == 0:
        # Deterministic sampler: skip the draw (EDM draws and multiplies it by 0).
        return x_cur, t_cur
    gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
    t_hat = torch.as_tensor(denoiser.round_sigma(t_cur + gamma * t_cur), dtype=torch.float64, device=x_cur.device)
    # Drawn at every step, even where gamma = 0, so each seed's noise stream is EDM's.
    x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur)
    return x_hat, t_hat


@torch.no_grad()
def heun_sampler(
    denoiser,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = math.inf,
    S_noise: float = 1,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
) -> torch.Tensor:
    """EDM's sampler (Algorithm 2): Heun's second-order method on the EDM schedule, with an
    Euler last step (the correction would divide by sigma = 0), and optional churn
    (S_churn > 0). `latents` are unit Gaussian (B, C, H, W). 2 num_steps - 1 denoiser
    evaluations. Returns float64 images."""
    t_steps = _clipped_schedule(denoiser, latents.device, num_steps, sigma_min, sigma_max, rho)
    # float64 state: the late steps move x by amounts far below float32 resolution of x.
    x_next = latents.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_hat, t_hat = _churn(denoiser, x_next, t_cur, num_steps, S_churn, S_min, S_max, S_noise, randn_like)

        # Euler step.
        d_cur = (x_hat - denoiser(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur

        # Second-order correction: average the slopes at both ends of the step.
        if i < num_steps - 1:
            d_prime = (x_next - denoiser(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next


@torch.no_grad()
def euler_sampler(
    denoiser,
    latents: torch.Tensor,
    class_labels: torch.Tensor | None = None,
    *,
    num_steps: int = 18,
    sigma_min: float = 0.002,
    sigma_max: float = 80,
    rho: float = 7,
    S_churn: float = 0,
    S_min: float = 0,
    S_max: float = math.inf,
    S_noise: float = 1,
    randn_like: Callable[[torch.Tensor], torch.Tensor] = torch.randn_like,
) -> torch.Tensor:
    """First-order (Euler) integration on the same schedule as heun_sampler, with the same
    optional churn. num_steps denoiser evaluations. Returns float64 images."""
    t_steps = _clipped_schedule(denoiser, latents.device, num_steps, sigma_min, sigma_max, rho)
    x_next = latents.to(torch.float64) * t_steps[0]
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        x_hat, t_hat = _churn(denoiser, x_next, t_cur, num_steps, S_churn, S_min, S_max, S_noise, randn_like)
        d_cur = (x_hat - denoiser(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
    return x_next


class StackedRandomGenerator:
    """One torch.Generator per seed, drawing row i of every batch from generator i, so an
    image depends only on its seed and not on which other seeds share its batch. Seeds are
    taken modulo 2^32 as in EDM, so the same seed gives EDM's latents."""

    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def _check(self, size):
        if size[0] != len(self.generators):
            raise ValueError(f"leading size {size[0]} must equal the number of seeds {len(self.generators)}")

    def randn(self, size, **kwargs) -> torch.Tensor:
        self._check(size)
        return torch.stack([torch.randn(size[1:], generator=g, **kwargs) for g in self.generators])

    def randn_like(self, input: torch.Tensor) -> torch.Tensor:
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs) -> torch.Tensor:
        self._check(size)
        return torch.stack([torch.randint(*args, size=size[1:], generator=g, **kwargs) for g in self.generators])


def _batch_labels(denoiser, class_labels, index, rnd, device):
    """One-hot labels (B, label_dim) for the seeds at positions `index`, or None."""
    label_dim = denoiser.label_dim
    if label_dim == 0:
        return None
    # Drawn after the latents from each seed's stream, as EDM's generate.py does, whether or
    # not it is used, so that the stream the sampler continues from is always the same.
    random_classes = rnd.randint(label_dim, size=[len(index)], device=device)
    if class_labels is None:
        return None
    if isinstance(class_labels, str):
        if class_labels != "random":
            raise ValueError(f"class_labels must be 'random', None or a tensor, got {class_labels!r}")
        classes = random_classes
    else:
        labels = torch.as_tensor(class_labels, device=device)
        if labels.dtype.is_floating_point:  # one-hot (or soft) rows, one per seed
            return labels[index].reshape(len(index), label_dim)
        classes = labels.expand(len(index)) if labels.dim() == 0 else labels[index]
    return torch.eye(label_dim, device=device)[classes]


def generate(
    denoiser,
    seeds,
    *,
    batch_size: int = 512,
    device,
    class_labels="random",
    sampler: Callable = heun_sampler,
    progress: bool = True,
    **sampler_kwargs,
) -> torch.Tensor:
    """Generate one image per seed with `sampler` and quantize it like a saved PNG:
    uint8 (len(seeds), C, H, W) on the CPU.

    class_labels, for a conditional denoiser (label_dim > 0): 'random' draws one uniformly
    random class per seed from that seed's generator; a tensor gives class indices (one per
    seed, or a single index for all) or float one-hot rows (len(seeds), label_dim); None
    passes no labels. Ignored for unconditional denoisers. Extra keyword arguments go to the
    sampler (num_steps, S_churn, ...).
    """
    if isinstance(denoiser, torch.nn.Module) and denoiser.training:
        raise ValueError("denoiser is in training mode (dropout active); call .eval() first")
    device = torch.device(device)
    seeds = torch.as_tensor(list(seeds), dtype=torch.int64)
    if seeds.numel() == 0:
        raise ValueError("no seeds given")
    positions = torch.arange(len(seeds))
    num_batches = (len(seeds) - 1) // batch_size + 1
    batches = list(zip(seeds.tensor_split(num_batches), positions.tensor_split(num_batches)))
    if progress and _tqdm is not None:
        batches = _tqdm(batches, unit="batch")

    shape = [denoiser.img_channels, denoiser.img_resolution, denoiser.img_resolution]
    images = []
    with torch.no_grad():
        for batch_seeds, index in batches:
            rnd = StackedRandomGenerator(device, batch_seeds.tolist())
            latents = rnd.randn([len(batch_seeds), *shape], device=device)
            labels = _batch_labels(denoiser, class_labels, index.to(device), rnd, device)
            x = sampler(denoiser, latents, labels, randn_like=rnd.randn_like, **sampler_kwargs)
            images.append(quantize(x).cpu())
    return torch.cat(images)
