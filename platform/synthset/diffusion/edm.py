"""EDM (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):
preconditioned denoiser, training loss and the deterministic Heun sampler, as plain functions.

This is the diffusion core CASD trains and samples with (seed 001, "we follow the EDM
implementation"; its Algorithm 2 is EDM's Algorithm 1 with the source label fixed to 0).
Everything follows the "Ours" column of EDM Table 1 (σ(t) = t, s(t) = 1):

- ``EDMDenoiser(network)`` wraps any network ``F(x, c_noise, **cond)`` into the preconditioned
  denoiser D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ)) (EDM Eq. 7). The four
  coefficients are diffusers' ``EDMEulerScheduler.precondition_inputs/noise/outputs``, which
  implement Table 1 with ``sigma_data = 0.5``.
- ``edm_loss(denoiser, images, generator)``: per-sample training loss λ(σ)·‖D(y + n; σ) − y‖²
  (EDM Eq. 2 with the weight of Table 1), ln σ ~ N(P_mean, P_std²), n ~ N(0, σ² I).
- ``karras_sigmas(num_steps)``: the time steps of EDM Eq. 5 (σ_min 0.002, σ_max 80, ρ = 7)
  followed by a final 0, from diffusers' ``EDMEulerScheduler.set_timesteps``.
- ``heun_sample`` (EDM Algorithm 1; Algorithm 2 with S_churn = 0) and ``euler_sample`` (its
  first-order counterpart) run the denoising loop explicitly on noise from ``initial_noise``.

Conditioning (class labels, CASD's source label, …) is passed as keyword arguments through
the loss, the samplers and the denoiser to the network untouched. No Ray here: the training
stage wraps ``edm_loss`` and the synthesis stage wraps ``heun_sample``.

    denoiser = EDMDenoiser(unet)  # e.g. a diffusers UNet2DModel: unet(x, c_noise, class_labels=…)
    loss = edm_loss(denoiser, images, generator, class_labels=labels).mean()
    images = heun_sample(denoiser, initial_noise(seeds, (3, 32, 32)), karras_sigmas(18),
                         class_labels=labels)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import EDMEulerScheduler

# EDM Table 1, "Ours" column.
SIGMA_DATA = 0.5    # σ_data: standard deviation of the training data (images in [-1, 1])
P_MEAN = -1.2       # training noise distribution: ln σ ~ N(P_mean, P_std²)
P_STD = 1.2
SIGMA_MIN = 0.002   # sampling schedule, EDM Eq. 5
SIGMA_MAX = 80.0
RHO = 7.0

# D(x, sigma, **cond) -> denoised x; sigma is a (B,) tensor, one noise level per sample.
Denoiser = Callable[..., torch.Tensor]


def _per_sample(sigma: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``sigma`` (a number or one value per sample) as a (B,) tensor on x's device and dtype."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    return sigma.expand(x.shape[0]) if sigma.ndim == 0 else sigma.reshape(x.shape[0])


def _broadcastable(sigma: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) → (B, 1, …, 1), so it scales each sample of x."""
    return sigma.reshape(-1, *[1] * (x.ndim - 1))


class EDMDenoiser:
    """The preconditioned denoiser D(x; σ) of EDM Eq. 7 around a network F.

    ``network(x, c_noise, **cond)`` is any callable returning a tensor shaped like x (a diffusers
    UNet's output object is unwrapped through ``.sample``); it is given c_in(σ)·x and
    c_noise(σ) = ln(σ)/4 as a (B,) tensor. ``sigma_data``: σ_data of EDM Table 1.
    """

    def __init__(self, network: Callable[..., torch.Tensor], sigma_data: float = SIGMA_DATA):
        if not sigma_data > 0:
            raise ValueError(f"sigma_data: must be > 0, got {sigma_data}")
        self.network = network
        self.sigma_data = float(sigma_data)
        # Table 1 preconditioning: c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²),
        # c_in = 1/√(σ²+σ_d²), c_noise = ln(σ)/4. diffusers calls this c_out "epsilon".
        self._scheduler = EDMEulerScheduler(sigma_data=self.sigma_data, prediction_type="epsilon")

    def __call__(self, x: torch.Tensor, sigma: float | torch.Tensor, **cond) -> torch.Tensor:
        """Denoised x (same shape); ``sigma``: one noise level, or one per sample (B,)."""
        sigma = _per_sample(sigma, x)
        sigma_b = _broadcastable(sigma, x)
        c_noise = self._scheduler.precondition_noise(sigma)
        out = self.network(self._scheduler.precondition_inputs(x, sigma_b), c_noise, **cond)
        if not isinstance(out, torch.Tensor):  # diffusers' UNet2DOutput and friends
            out = out.sample
        return self._scheduler.precondition_outputs(x, out.to(x.dtype), sigma_b)


def loss_weight(sigma: torch.Tensor, sigma_data: float = SIGMA_DATA) -> torch.Tensor:
    """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² (EDM Table 1); equals 1/c_out(σ)², so the network's target
    has unit weight at every σ (EDM Eq. 8)."""
    return (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2


def sample_training_sigmas(n: int, generator: torch.Generator, p_mean: float = P_MEAN,
                           p_std: float = P_STD, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``n`` training noise levels, ln σ ~ N(P_mean, P_std²) (EDM Table 1), drawn on the
    generator's device."""
    z = torch.randn(n, generator=generator, device=generator.device, dtype=dtype)
    return (p_mean + p_std * z).exp()


def edm_loss(denoiser: Denoiser, images: torch.Tensor, generator: torch.Generator, *,
             sigma_data: float = SIGMA_DATA, p_mean: float = P_MEAN, p_std: float = P_STD,
             **cond) -> torch.Tensor:
    """Per-sample EDM training loss (B,): λ(σ)·mean over elements of (D(y + n; σ) − y)².

    ``images`` y: a (B, …) batch scaled like the data σ_data describes ([-1, 1] for 0.5).
    ``generator`` draws σ (one per sample, EDM Table 1) and then n ~ N(0, σ² I) (EDM Eq. 2), on
    its own device, so a seed gives the same noise on CPU and GPU. ``cond`` goes to the
    denoiser. The mean over a batch is EDM's loss up to a constant: the reference sums over
    elements; the mean keeps the scale independent of resolution. Weighting per sample (CASD
    weighs real and synthetic samples equally) is left to the caller.
    """
    sigma = sample_training_sigmas(images.shape[0], generator, p_mean, p_std, images.dtype)
    noise = torch.randn(images.shape, generator=generator, device=generator.device, dtype=images.dtype)
    sigma, noise = sigma.to(images.device), noise.to(images.device)
    sigma_b = _broadcastable(sigma, images)
    denoised = denoiser(images + sigma_b * noise, sigma, **cond)
    return (loss_weight(sigma_b, sigma_data) * (denoised - images) ** 2).flatten(1).mean(1)


def karras_sigmas(num_steps: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX,
                  rho: float = RHO) -> torch.Tensor:
    """The N + 1 noise levels of EDM Eq. 5: σ_i = (σ_max^{1/ρ} + i/(N−1)(σ_min^{1/ρ} −
    σ_max^{1/ρ}))^ρ for i < N, then σ_N = 0. float32 on the CPU, decreasing."""
    if not (isinstance(num_steps, int) and num_steps >= 2):
        raise ValueError(f"num_steps: must be an integer >= 2, got {num_steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"sigma_min, sigma_max: need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
    if not rho > 0:
        raise ValueError(f"rho: must be > 0, got {rho}")
    scheduler = EDMEulerScheduler(sigma_min=sigma_min, sigma_max=sigma_max, rho=rho,
                                  sigma_schedule="karras", final_sigmas_type="zero")
    scheduler.set_timesteps(num_steps)
    return scheduler.sigmas.clone()


def initial_noise(seeds: Sequence[int], shape: Sequence[int], device: torch.device | str | None = None,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Standard normal noise (len(seeds), *shape), each sample from a CPU generator seeded by its
    own seed, so a sample does not depend on its batch or device (DESIGN.md, "Generation request").
    The samplers scale it by σ_0."""
    noise = [torch.randn(tuple(shape), generator=torch.Generator("cpu").manual_seed(int(s)), dtype=dtype)
             for s in seeds]
    return torch.stack(noise).to(device)


def _check_sigmas(sigmas: torch.Tensor | Sequence[float]) -> list[float]:
    values = [float(s) for s in torch.as_tensor(sigmas).reshape(-1)]
    if len(values) < 2:
        raise ValueError(f"sigmas: need at least 2 noise levels, got {len(values)}")
    if any(b >= a for a, b in zip(values, values[1:])) or values[-1] < 0:
        raise ValueError(f"sigmas: must be strictly decreasing and end >= 0, got {values}")
    return values


@torch.no_grad()
def heun_sample(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
                **cond) -> torch.Tensor:
    """Deterministic 2nd-order Heun sampling, EDM Algorithm 1 (Algorithm 2 with S_churn = 0).

    ``noise``: standard normal (B, …), e.g. from ``initial_noise``; ``sigmas``: decreasing noise
    levels t_0 > … > t_N (``karras_sigmas``), usually ending in 0. N steps cost 2N − 1 denoiser
    evaluations when t_N = 0 (the last step is Euler). ``cond`` goes to every denoiser call.
    """
    t = _check_sigmas(sigmas)
    x = noise * t[0]                                        # line 2: x_0 ~ N(0, t_0² I)
    for t_cur, t_next in zip(t[:-1], t[1:]):                # line 3
        d = (x - denoiser(x, _per_sample(t_cur, x), **cond)) / t_cur     # line 4: dx/dt at t_i
        x_next = x + (t_next - t_cur) * d                   # line 5: Euler step
        if t_next != 0:                                     # line 6: 2nd-order correction
            d_next = (x_next - denoiser(x_next, _per_sample(t_next, x), **cond)) / t_next  # line 7
            x_next = x + (t_next - t_cur) * (0.5 * d + 0.5 * d_next)                    # line 8
        x = x_next
    return x                                                # line 11


@torch.no_grad()
def euler_sample(denoiser: Denoiser, noise: torch.Tensor, sigmas: torch.Tensor | Sequence[float],
                 **cond) -> torch.Tensor:
    """Deterministic 1st-order Euler sampling of the same ODE (EDM Algorithm 1 without lines
    6–9): one denoiser evaluation per step. Arguments as ``heun_sample``."""
    t = _check_sigmas(sigmas)
    x = noise * t[0]
    for t_cur, t_next in zip(t[:-1], t[1:]):
        d = (x - denoiser(x, _per_sample(t_cur, x), **cond)) / t_cur
        x = x + (t_next - t_cur) * d
    return x
