"""EDM preconditioning, training loss, σ schedule and Heun/Euler samplers (diffusion/edm.py).

Most checks use Gaussian data N(μ, s²), whose optimal denoiser is known in closed form,
D*(x; σ) = (s² x + σ² μ)/(s² + σ²), and whose probability-flow ODE (EDM Eq. 1 with σ(t) = t)
has the exact solution x(σ) = μ + (x(σ_max) − μ)·√(s² + σ²)/√(s² + σ_max²).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import EDMEulerScheduler

from synthset.diffusion.edm import (
    EDMDenoiser,
    edm_loss,
    euler_sample,
    heun_sample,
    initial_noise,
    karras_sigmas,
    loss_weight,
    sample_training_sigmas,
)

pytestmark = pytest.mark.usefixtures("one_thread")

SIGMA_DATA = 0.5
MU = 0.3


def gaussian_denoiser(mu: float, s: float):
    """The optimal denoiser for data N(mu, s²) per element; counts its evaluations."""
    def denoise(x, sigma, **cond):
        denoise.calls += 1
        sigma = sigma.reshape(-1, *[1] * (x.ndim - 1))
        return (s ** 2 * x + sigma ** 2 * mu) / (s ** 2 + sigma ** 2)
    denoise.calls = 0
    return denoise


def exact_ode_solution(x_start: torch.Tensor, sigma_max: float, mu: float, s: float) -> torch.Tensor:
    """x(0) of the probability-flow ODE for data N(mu, s²), started at x(σ_max) = x_start."""
    return mu + (x_start - mu) * s / math.sqrt(s ** 2 + sigma_max ** 2)


class RecordingNetwork:
    """F(x, c_noise, **cond) returning a fixed tensor and recording what it was given."""

    def __init__(self, output: torch.Tensor):
        self.output = output
        self.seen = []

    def __call__(self, x, c_noise, **cond):
        self.seen.append((x.clone(), c_noise.clone(), cond))
        return self.output


class TinyNetwork(torch.nn.Module):
    """A small conditional network: conv(x) + class embedding · c_noise."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 1, 3, padding=1)
        self.classes = torch.nn.Embedding(3, 1)

    def forward(self, x, c_noise, class_labels):
        return self.conv(x) + self.classes(class_labels).reshape(-1, 1, 1, 1) * c_noise.reshape(-1, 1, 1, 1)


# ---------------------------------------------------------------- EDM Table 1

def test_preconditioning_matches_edm_table1_per_sample():
    sigma = torch.tensor([0.002, 0.1, 0.5, 2.0, 80.0], dtype=torch.float64)
    x = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    f = torch.randn(5, 1, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    network = RecordingNetwork(f)
    labels = torch.tensor([0, 1, 2, 0, 1])
    denoised = EDMDenoiser(network, sigma_data=SIGMA_DATA)(x, sigma, class_labels=labels, source=0)

    sd, s = SIGMA_DATA, sigma.reshape(-1, 1, 1, 1)
    c_skip = sd ** 2 / (s ** 2 + sd ** 2)
    c_out = s * sd / torch.sqrt(s ** 2 + sd ** 2)
    c_in = 1 / torch.sqrt(s ** 2 + sd ** 2)
    c_noise = torch.log(sigma) / 4
    (x_in, noise_in, cond), = network.seen
    torch.testing.assert_close(x_in, c_in * x, rtol=1e-12, atol=0)
    torch.testing.assert_close(noise_in, c_noise, rtol=1e-12, atol=0)
    assert noise_in.shape == (5,)
    assert torch.equal(cond["class_labels"], labels) and cond["source"] == 0
    torch.testing.assert_close(denoised, c_skip * x + c_out * f, rtol=1e-12, atol=0)

    # The diffusers pieces reused for this compute the same Table 1 coefficients.
    scheduler = EDMEulerScheduler(sigma_data=sd, prediction_type="epsilon")
    torch.testing.assert_close(scheduler.precondition_inputs(x, s), c_in * x, rtol=1e-12, atol=0)
    torch.testing.assert_close(scheduler.precondition_noise(sigma), c_noise, rtol=1e-12, atol=0)
    torch.testing.assert_close(scheduler.precondition_outputs(x, f, s), c_skip * x + c_out * f, rtol=1e-12, atol=0)


def test_preconditioning_scalar_sigma_and_unet_style_output():
    x = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(2))
    f = torch.randn(2, 1, 3, 3, generator=torch.Generator().manual_seed(3))

    class Output:  # like diffusers' UNet2DOutput
        sample = f

    denoised = EDMDenoiser(lambda x, c_noise: Output())(x, 1.0)
    expected = 0.25 / 1.25 * x + 0.5 / math.sqrt(1.25) * f
    torch.testing.assert_close(denoised, expected)


def test_loss_weight_matches_edm_table1():
    sigma = torch.tensor([0.002, 0.1, 0.5, 2.0, 80.0], dtype=torch.float64)
    expected = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
    torch.testing.assert_close(loss_weight(sigma, SIGMA_DATA), expected, rtol=1e-12, atol=0)
    # λ(σ) = 1/c_out(σ)²: unit weight on the network's target at every σ (EDM Eq. 8).
    c_out = sigma * 0.5 / torch.sqrt(sigma ** 2 + 0.25)
    torch.testing.assert_close(loss_weight(sigma) * c_out ** 2, torch.ones_like(sigma), rtol=1e-12, atol=0)


def test_training_sigmas_are_log_normal():
    n = 20_000
    log_sigma = sample_training_sigmas(n, torch.Generator().manual_seed(0), dtype=torch.float64).log()
    # 4 standard errors of the mean (P_std/√n) and of the standard deviation (≈ P_std/√(2n)).
    assert abs(log_sigma.mean().item() - (-1.2)) < 4 * 1.2 / math.sqrt(n)
    assert abs(log_sigma.std().item() - 1.2) < 4 * 1.2 / math.sqrt(2 * n)


# ---------------------------------------------------------------- training loss

def test_loss_of_optimal_denoiser_is_one_and_beats_a_wrong_one():
    # Data N(MU, σ_d²): given σ, D*(y + n) − y ~ N(0, σ²σ_d²/(σ² + σ_d²)) and λ(σ) times that
    # variance is 1, so every weighted squared error is χ²₁ (mean 1, variance 2) whatever σ is.
    y = MU + SIGMA_DATA * torch.randn(512, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    optimal = edm_loss(gaussian_denoiser(MU, SIGMA_DATA), y, torch.Generator().manual_seed(1))
    assert optimal.shape == (512,)
    standard_error = math.sqrt(2 / y.numel())
    assert abs(optimal.mean().item() - 1) < 4 * standard_error

    wrong = edm_loss(gaussian_denoiser(MU + 0.5, SIGMA_DATA), y, torch.Generator().manual_seed(1))
    assert wrong.mean() > optimal.mean() + 4 * standard_error


def test_loss_is_deterministic_per_seed_and_passes_conditioning():
    y = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    network = TinyNetwork()
    denoiser = EDMDenoiser(network)
    a = edm_loss(denoiser, y, torch.Generator().manual_seed(5), class_labels=labels)
    b = edm_loss(denoiser, y, torch.Generator().manual_seed(5), class_labels=labels)
    c = edm_loss(denoiser, y, torch.Generator().manual_seed(6), class_labels=labels)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    other_labels = edm_loss(denoiser, y, torch.Generator().manual_seed(5), class_labels=(labels + 1) % 3)
    assert not torch.equal(a, other_labels)
    a.mean().backward()  # differentiable through the preconditioning
    assert network.conv.weight.grad is not None and network.conv.weight.grad.abs().sum() > 0


# ---------------------------------------------------------------- σ schedule

@pytest.mark.parametrize("num_steps", [2, 18, 40])
def test_karras_sigmas_endpoints_and_eq5(num_steps):
    sigmas = karras_sigmas(num_steps).double()
    assert sigmas.shape == (num_steps + 1,)
    assert sigmas[-1] == 0
    torch.testing.assert_close(sigmas[0].item(), 80.0, rtol=1e-6, atol=0)
    torch.testing.assert_close(sigmas[-2].item(), 0.002, rtol=1e-6, atol=0)
    assert bool((sigmas[1:] < sigmas[:-1]).all())
    i = torch.arange(num_steps, dtype=torch.float64)
    eq5 = (80 ** (1 / 7) + i / (num_steps - 1) * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(sigmas[:-1], eq5, rtol=1e-6, atol=0)


def test_bad_schedules_are_rejected():
    with pytest.raises(ValueError, match="num_steps"):
        karras_sigmas(1)
    with pytest.raises(ValueError, match="sigma_min"):
        karras_sigmas(10, sigma_min=90.0)
    with pytest.raises(ValueError, match="sigmas"):
        heun_sample(gaussian_denoiser(0, 1), torch.zeros(1, 1), [0.0, 1.0])


# ---------------------------------------------------------------- samplers

@pytest.mark.parametrize("sampler", [heun_sample, euler_sample])
def test_samples_are_deterministic_per_seed(sampler):
    denoiser = EDMDenoiser(TinyNetwork())
    sigmas = karras_sigmas(6)

    def generate(seeds, labels):
        noise = initial_noise(seeds, (1, 4, 4))
        return sampler(denoiser, noise, sigmas, class_labels=torch.tensor(labels))

    first = generate([0, 1, 2], [0, 1, 2])
    assert torch.equal(first, generate([0, 1, 2], [0, 1, 2]))
    other = generate([3, 4, 5], [0, 1, 2])
    assert all(not torch.equal(first[k], other[k]) for k in range(3))
    # A sample depends on its own seed and conditioning only, not on its batch.
    alone = generate([1], [1])
    torch.testing.assert_close(alone[0], first[1], rtol=1e-5, atol=1e-6)


def test_heun_reproduces_gaussian_mean_and_variance():
    s, n, num_steps = SIGMA_DATA, 4096, 64
    noise = initial_noise(range(1024), (1, 2, 2), dtype=torch.float64)  # 4096 i.i.d. elements
    x = heun_sample(gaussian_denoiser(MU, s), noise, karras_sigmas(num_steps))
    # Tolerance: 4 standard errors of the sample mean (s/√n) and variance (s²√(2/(n−1))), plus
    # the bias of starting from N(0, σ_max²) instead of N(μ, s² + σ_max²) (mean off by μ·s/σ_max
    # ≈ 0.002). The discretization error is O(N⁻²) (see below): 64 Heun steps make the variance
    # ~0.7 % too high, well inside; 18 steps (EDM's CIFAR-10 setting) ~11 %, outside.
    assert abs(x.mean().item() - MU) < 4 * s / math.sqrt(n) + abs(MU) * s / 80
    assert abs(x.var().item() - s ** 2) < 4 * s ** 2 * math.sqrt(2 / (n - 1))


def test_heun_beats_euler_at_equal_evaluations_on_the_exact_ode():
    start = torch.linspace(-2, 2, 9, dtype=torch.float64).reshape(9, 1)  # x(σ_max) = 80 · start

    def errors(num_steps):
        heun, euler = gaussian_denoiser(MU, SIGMA_DATA), gaussian_denoiser(MU, SIGMA_DATA)
        heun_sigmas, euler_sigmas = karras_sigmas(num_steps), karras_sigmas(2 * num_steps - 1)
        heun_x = heun_sample(heun, start, heun_sigmas)
        euler_x = euler_sample(euler, start, euler_sigmas)
        assert heun.calls == euler.calls == 2 * num_steps - 1  # equal network evaluations
        exact = exact_ode_solution(start * float(heun_sigmas[0]), float(heun_sigmas[0]), MU, SIGMA_DATA)
        return (heun_x - exact).abs().max().item(), (euler_x - exact).abs().max().item()

    heun_18, euler_18 = errors(18)  # EDM's CIFAR-10 setting: 35 evaluations
    assert heun_18 < euler_18
    heun_36, euler_36 = errors(36)
    heun_72, euler_72 = errors(72)
    assert heun_36 < euler_36 / 2 and heun_72 < euler_72 / 4
    # Convergence orders: doubling the steps divides Heun's error by ~4 and Euler's by ~2.
    assert 3 < heun_36 / heun_72 < 5
    assert 1.5 < euler_36 / euler_72 < 2.5
