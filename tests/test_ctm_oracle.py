"""Oracle test of CTM's sampler, separated from CTM training (issue #17, item 2).

A teacher whose exact denoiser is closed-form: data from a Gaussian mixture of 1x4x4 "images",
x_0 ~ sum_k w_k N(mu_k, s_k^2 I), so x_sigma = x_0 + sigma z is the mixture of N(mu_k, (s_k^2 + sigma^2) I) and

    D(x, sigma) = E[x_0 | x_sigma = x] = sum_k r_k(x, sigma) (mu_k + s_k^2 / (s_k^2 + sigma^2) (x - mu_k)),
    r_k ∝ w_k N(x; mu_k, (s_k^2 + sigma^2) I)                                     (Bayes' rule, exact)

The oracle trajectory function G*(x, t, s) is the probability-flow ODE of that D solved from t to s with many EDM
Heun steps (:func:`gensample.core.sampling.heun_solve`): what a perfectly trained CTM student would compute (CTM,
Kim et al. 2024, sec. 3: G(x_t, t, s) = the ODE solution at s). :class:`OracleBackbone` presents it to the REAL
sampling path (:class:`CTMPipeline` + :class:`CTMScheduler`) with the UNet signature the pipeline calls,
``unet(c_in(t) x, c_noise(t), s_timestep=c_noise(s))``, by inverting :class:`TrajectoryFunction`'s
preconditioning: g = (G* - (s/t) x) / (1 - s/t), F = (g - c_skip(t) x) / c_out(t).

What must hold if the sampler is right:

* gamma = 0 makes deterministic jumps along one ODE trajectory, so 1, 2 and 4 NFE from the same noise give the same
  sample (up to the oracle's solver error), which is also a direct Heun solve from sigma_max to sigma_min;
* every gamma gives the data distribution: G* maps p_t to p_s exactly, and the re-noise from s to sigma_{i+1}
  turns p_s into p_{sigma_{i+1}} exactly, so mean, per-pixel variance and mode weights match the mixture within
  sampling error;
* a deliberately wrong oracle (G jumps to s with the one-step Euler estimate, g = D(x, t): what the student is at
  initialisation) breaks both, so these checks can fail.

The closed-form teacher and the oracle are also used by ``scripts/ctm_toy.py`` (the training diagnosis).
"""
from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.models.unets.unet_2d import UNet2DOutput
from gensample.pipelines.pipeline_ctm import CTMPipeline

from gensample.core.parametrization import edm_scalings, input_scaling, per_sample
from gensample.core.sampling import heun_solve
from gensample.core.sigmas import karras_ramp
from gensample.schedulers.scheduling_ctm import CTMScheduler

SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 0.5
#: Heun steps of the oracle per jump (Karras spacing between t and s); its error is what "agree" allows
ORACLE_HEUN_STEPS = 192
#: max and mean |difference| allowed between the gamma = 0 samples at 1 or 2 NFE and the one at 4 NFE (4 x 192 Heun
#: steps: the ODE solution to ~1e-7). Measured error of a 192-step Heun solve 80 -> 0.002 against a 1536-step one,
#: 2000 samples: max 2.1e-3 (a few samples between two modes, where the ODE is stiff at small sigma), mean 4.5e-5; it
#: falls as 1/steps^2 (96 steps: 8.1e-3, 384: 5.4e-4). In the test (256 samples): 1 vs 4 NFE max 8.2e-4, mean 4.5e-5
#: (the Euler oracle: max 1.0, mean 0.38)
AGREEMENT_TOL, AGREEMENT_MEAN_TOL = 4e-3, 1e-4
#: the distribution checks need a less accurate oracle: with 32 steps Heun inflates the within-mode variance by
#: about 5% (measured on 20,000 samples; z = 4 on the per-pixel variances), with 128 by < 0.3%; 96 keeps that bias
#: well below the sampling error of n = 2000 samples
DISTRIBUTION_HEUN_STEPS = 96
#: a statistic is "within sampling error" when its z-score is below this (16 + 16 + 3 + 3 statistics per check)
Z_MAX = 4.5

Trajectory = Callable[[torch.Tensor, float, float], torch.Tensor]


class GaussianMixture:
    """x_0 ~ sum_k w_k N(mu_k, s_k^2 I) on tensors of shape ``shape``; the exact denoiser and moments."""

    def __init__(self, weights, means: torch.Tensor, stds):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.means = means.to(torch.float64)
        self.stds = torch.as_tensor(stds, dtype=torch.float64)
        if not (len(self.weights) == len(self.means) == len(self.stds)):
            raise ValueError("weights, means and stds need one entry per component.")
        if abs(float(self.weights.sum()) - 1.0) > 1e-12:
            raise ValueError(f"weights must sum to 1, got {float(self.weights.sum())}.")
        self.shape = tuple(self.means.shape[1:])

    @classmethod
    def default(cls, seed: int = 0) -> GaussianMixture:
        """Three well-separated modes of 1x4x4 images in [-1, 1]: pixel means +-0.6 (random signs, seeded), stds
        0.05 / 0.1 / 0.15, weights 0.5 / 0.3 / 0.2 (unequal, so a wrong mode balance shows)."""
        g = torch.Generator().manual_seed(seed)
        signs = torch.randint(0, 2, (3, 1, 4, 4), generator=g).to(torch.float64) * 2 - 1
        return cls([0.5, 0.3, 0.2], 0.6 * signs, [0.05, 0.1, 0.15])

    @property
    def dim(self) -> int:
        return math.prod(self.shape)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn((n, *self.shape), generator=generator, dtype=torch.float64)
        return self.means[k] + per_sample(self.stds[k], z) * z

    def denoise(self, x: torch.Tensor, sigma) -> torch.Tensor:
        """E[x_0 | x_sigma = x] (module docstring), float64; ``sigma`` a float, 0-d tensor or one per sample."""
        x64 = x.to(torch.float64)
        sigma = per_sample(sigma, x64).to(torch.float64).flatten(1)                  # (B, 1)
        flat, mu = x64.flatten(1), self.means.flatten(1)                              # (B, d), (K, d)
        var = self.stds.square()[None, :] + sigma.square()                            # (B, K)
        sq = flat.square().sum(1, keepdim=True) - 2 * flat @ mu.T + mu.square().sum(1)[None]  # ||x - mu_k||^2
        r = torch.softmax(self.weights.log()[None] - 0.5 * sq / var - 0.5 * self.dim * var.log(), dim=1)
        shrink = self.stds.square()[None] / var                                       # s_k^2 / (s_k^2 + sigma^2)
        # sum_k r_k (mu_k + shrink_k (x - mu_k)) = (sum_k r_k shrink_k) x + sum_k r_k (1 - shrink_k) mu_k
        post = (r * shrink).sum(1, keepdim=True) * flat + (r * (1 - shrink)) @ mu
        return post.reshape(x.shape).to(x.dtype)

    def __call__(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        return self.denoise(x, sigma)

    def moments(self, extra_std: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-pixel mean, variance and 4th central moment of x_0 + extra_std z (flattened, float64)."""
        w, mu = self.weights[:, None], self.means.flatten(1)
        var_k = (self.stds.square() + extra_std**2)[:, None]
        mean = (w * mu).sum(0)
        a = mu - mean
        variance = (w * (a.square() + var_k)).sum(0)
        m4 = (w * (a**4 + 6 * a.square() * var_k + 3 * var_k.square())).sum(0)
        return mean, variance, m4

    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest mode mean per sample."""
        return torch.cdist(x.to(torch.float64).flatten(1), self.means.flatten(1)).argmin(1)


def heun_trajectory(denoiser: Callable, num_steps: int = ORACLE_HEUN_STEPS, rho: float = 7.0) -> Trajectory:
    """G*(x, t, s): ``num_steps`` EDM Heun steps of the PF-ODE of ``denoiser`` from t to s on Karras spacing
    (:func:`heun_solve`, the same solver EDM and CTM's teacher use), in x's dtype (the levels in float64)."""
    def trajectory(x: torch.Tensor, t: float, s: float) -> torch.Tensor:
        if s >= t:
            return x
        sigmas = karras_ramp(torch.linspace(0, 1, num_steps + 1, dtype=torch.float64), t, s, rho)
        return heun_solve(denoiser, x, sigmas)
    return trajectory


def euler_jump(denoiser: Callable) -> Trajectory:
    """The WRONG oracle: one Euler step of the ODE from t to s, G = x + (s - t)(x - D(x, t))/t
    = (s/t) x + (1 - s/t) D(x, t), i.e. g(x, t, s) = D(x, t) for every s (a CTM student at initialisation)."""
    def trajectory(x: torch.Tensor, t: float, s: float) -> torch.Tensor:
        d = denoiser(x.to(torch.float64), t)
        return (s / t) * x.to(torch.float64) + (1 - s / t) * d
    return trajectory


class OracleBackbone(ModelMixin, ConfigMixin):
    """Presents a trajectory function G(x, t, s) (in sigma space) as the backbone F that :class:`CTMPipeline` calls,
    ``F(c_in(t) x, c_noise(t), s_timestep=c_noise(s))``, with c_noise = 250 ln(sigma) (inverted here in float64).

    :class:`gensample.core.parametrization.TrajectoryFunction` (and the scheduler's step) forms
    G = (s/t) x + (1 - s/t) g with g = c_skip(t) x + c_out(t) F, so F = (g - c_skip x) / c_out with
    g = (G - (s/t) x) / (1 - s/t); at s = t (the pipeline's Heun sampler, g(x, t, t)) g is the denoiser itself, and
    then t may differ per sample (so ``EDMDenoiser(OracleBackbone)`` is the exact teacher D of a training method).
    For s < t all samples of a call share t and s (the pipeline's case). ``calls`` records (t, s) per call."""

    @register_to_config
    def __init__(self, sample_size: int = 4, in_channels: int = 1, sigma_data: float = SIGMA_DATA,
                 num_class_embeds: int | None = None):
        super().__init__()
        # a float64 buffer makes ``self.dtype`` float64, so the pipeline samples in float64
        self.register_buffer("dtype_anchor", torch.zeros((), dtype=torch.float64))
        self.trajectory: Trajectory | None = None
        self.denoiser: Callable | None = None
        self.calls: list[tuple[float, float]] = []

    @staticmethod
    def _sigma(c_noise, sample: torch.Tensor) -> torch.Tensor:
        """sigma = exp(c_noise / 250) per sample, float64, shape (B, 1, ..., 1)."""
        c = torch.as_tensor(c_noise, dtype=torch.float64, device=sample.device).flatten()
        return per_sample(torch.exp(c / 250.0).expand(sample.shape[0]), sample)

    def forward(self, sample: torch.Tensor, timestep, class_labels=None, return_dict: bool = True,
                s_timestep=None):
        t = self._sigma(timestep, sample)
        s = t if s_timestep is None else self._sigma(s_timestep, sample)
        x = sample.to(torch.float64) / input_scaling(t, self.config.sigma_data)
        if bool((s >= t).all()):  # g(x, t, t) = D(x, t); one level per sample allowed (a teacher's use)
            g = self.denoiser(x, t.flatten())
            self.calls.append((float(t.flatten()[0]), float(s.flatten()[0])))
        else:
            if (t != t.flatten()[0]).any() or (s != s.flatten()[0]).any() or (s > t).any():
                raise ValueError("the trajectory oracle needs one (t, s) with s < t for the whole batch.")
            t0, s0 = float(t.flatten()[0]), float(s.flatten()[0])
            self.calls.append((t0, s0))
            g = (self.trajectory(x, t0, s0) - (s0 / t0) * x) / (1 - s0 / t0)
        c_skip, c_out = edm_scalings(t, self.config.sigma_data)
        out = ((g - c_skip * x) / c_out).to(sample.dtype)
        return UNet2DOutput(sample=out) if return_dict else (out,)


def oracle_pipeline(mixture: GaussianMixture, trajectory: Trajectory) -> CTMPipeline:
    backbone = OracleBackbone(sample_size=mixture.shape[-1], in_channels=mixture.shape[0])
    backbone.trajectory, backbone.denoiser = trajectory, mixture.denoise
    pipe = CTMPipeline(unet=backbone, scheduler=CTMScheduler(num_train_timesteps=18))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe: CTMPipeline, latents: torch.Tensor, nfe: int, gamma: float, seed: int = 0) -> torch.Tensor:
    """The pipeline's final state at sigma_min (no clamp), from the unit noise ``latents``."""
    out = pipe(batch_size=latents.shape[0], num_inference_steps=nfe, gamma=gamma, latents=latents,
               generator=torch.Generator().manual_seed(seed), output_type="latent")
    return out.images


def distribution_z_scores(mixture: GaussianMixture, x: torch.Tensor) -> dict[str, float]:
    """Largest |z| of the per-pixel means, the per-pixel variances, the mode weights and the within-mode variances
    of ``x`` against the mixture convolved with N(0, sigma_min^2) (the law of the final state), from the exact
    moments: se(mean) = sqrt(var / n), se(variance) = sqrt((m4 - var^2) / n), se(weight_k) = sqrt(w_k (1 - w_k) / n),
    se(within-mode variance v_k) = v_k sqrt(2 / (n_k d)) (Gaussian residuals around the nearest mean; the modes are
    so far apart that the nearest mean is the true mode)."""
    n = x.shape[0]
    flat = x.to(torch.float64).flatten(1)
    mean, var, m4 = mixture.moments(extra_std=SIGMA_MIN)
    z_mean = (flat.mean(0) - mean) / (var / n).sqrt()
    z_var = (flat.var(0, unbiased=True) - var) / ((m4 - var.square()) / n).sqrt()
    w = mixture.weights
    frac = torch.bincount(mixture.assign(x), minlength=len(w)).to(torch.float64) / n
    z_w = (frac - w) / (w * (1 - w) / n).sqrt()
    modes = mixture.assign(x)
    z_within = []
    for k in range(len(w)):
        residual = flat[modes == k] - mixture.means.flatten(1)[k]
        if residual.numel() == 0:  # an empty mode: the weights' z-score already flags it
            continue
        v_k = float(mixture.stds[k] ** 2 + SIGMA_MIN**2)
        z_within.append((float(residual.square().mean()) - v_k) / (v_k * math.sqrt(2 / residual.numel())))
    return {"mean": float(z_mean.abs().max()), "variance": float(z_var.abs().max()),
            "weights": float(z_w.abs().max()), "within_mode_variance": max(abs(z) for z in z_within)}


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.default()


@pytest.fixture(scope="module")
def noise(mixture) -> torch.Tensor:
    return torch.randn((2000, *mixture.shape), generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.fixture(scope="module")
def oracle(mixture) -> CTMPipeline:
    return oracle_pipeline(mixture, heun_trajectory(mixture.denoise))


@pytest.fixture(scope="module")
def coarse_oracle(mixture) -> CTMPipeline:
    return oracle_pipeline(mixture, heun_trajectory(mixture.denoise, DISTRIBUTION_HEUN_STEPS))


# -- the closed-form teacher itself -----------------------------------------------------------------------------------
def test_mixture_denoiser_is_the_posterior_mean():
    """D against hand values: one component -> mu + s^2/(s^2 + sigma^2)(x - mu); two point masses at +-1 with
    weights (1/4, 3/4) -> E[x_0|x] = (p_1 - p_2)/(p_1 + p_2), p_k = w_k exp(-(x - mu_k)^2 / (2 sigma^2))."""
    one = GaussianMixture([1.0], torch.full((1, 1, 1, 1), 0.3, dtype=torch.float64), [0.2])
    x = torch.tensor([[[[1.3]]]], dtype=torch.float64)
    assert float(one.denoise(x, 0.5)) == pytest.approx(0.3 + 0.04 / 0.29 * 1.0, abs=1e-12)
    two = GaussianMixture([0.25, 0.75], torch.tensor([1.0, -1.0], dtype=torch.float64).reshape(2, 1, 1, 1),
                          [0.0, 0.0])
    v = 0.8**2  # variance of x_sigma given the mode, sigma = 0.8, s_k = 0
    p1 = 0.25 * math.exp(-(0.4 - 1) ** 2 / (2 * v))
    p2 = 0.75 * math.exp(-(0.4 + 1) ** 2 / (2 * v))
    expected = (p1 - p2) / (p1 + p2)
    assert float(two.denoise(torch.tensor([[[[0.4]]]], dtype=torch.float64), 0.8)) == pytest.approx(expected, abs=1e-12)


# -- the oracle through the real sampler ------------------------------------------------------------------------------
def test_oracle_backbone_reproduces_the_trajectory(mixture, noise):
    """The inversion is right: TrajectoryFunction(OracleBackbone) evaluates G* (so what the pipeline sees is G*)."""
    from gensample.core.parametrization import TrajectoryFunction, noise_conditioning

    backbone = OracleBackbone()
    trajectory = heun_trajectory(mixture.denoise, 16)
    backbone.trajectory, backbone.denoiser = trajectory, mixture.denoise
    # exact times as the network sees them (c_noise rounded to float32, as the scheduler passes it)
    t = float(torch.exp(noise_conditioning(5.0).float().double() / 250))
    s = float(torch.exp(noise_conditioning(0.7).float().double() / 250))
    x = mixture.sample(64, torch.Generator().manual_seed(3)) + t * noise[:64]
    G = TrajectoryFunction(backbone, SIGMA_DATA)(x, t, s)
    torch.testing.assert_close(G, trajectory(x, t, s), atol=1e-12, rtol=0)
    torch.testing.assert_close(TrajectoryFunction(backbone, SIGMA_DATA).denoise(x, t), mixture.denoise(x, t),
                               atol=1e-12, rtol=0)


def test_gamma0_samples_agree_across_nfe(oracle, mixture, noise):
    """gamma = 0: 1, 2 and 4 jumps along the exact trajectory land on the same sample. The 4-jump sample is itself a
    4 x 192-step Heun solve sigma_max -> sigma_min (the ODE solution to ~1e-7 here), so this is also each sample's
    distance to the ODE solution."""
    noise = noise[:256]
    samples = {n: sample(oracle, noise, n, 0.0) for n in (1, 2, 4)}
    for n in (1, 2):
        err = (samples[n] - samples[4]).abs()
        assert float(err.max()) < AGREEMENT_TOL, f"{n}-NFE gamma=0 sample is {float(err.max()):.2e} from 4-NFE"
        assert float(err.mean()) < AGREEMENT_MEAN_TOL, f"{n}-NFE: mean difference {float(err.mean()):.2e}"
    # (the times the pipeline asked for do not depend on the oracle: a one-call one is used to record them)
    recorder = oracle_pipeline(mixture, euler_jump(mixture.denoise))
    sample(recorder, noise[:8], 4, 0.0)
    levels = recorder.scheduler.sigmas
    assert [round(t, 4) for t, _ in recorder.unet.calls] == [round(float(v), 4) for v in levels[:-1]]
    assert [round(s, 4) for _, s in recorder.unet.calls] == [round(float(v), 4) for v in levels[1:]]
    # and the ODE moved the samples far from where one Euler jump would put them (the check is not vacuous)
    assert float((samples[1] - mixture.denoise(noise * SIGMA_MAX, SIGMA_MAX)).abs().max()) > 0.5


@pytest.mark.parametrize("nfe, gamma", [(1, 0.0), (2, 0.5), (2, 1.0), (4, 0.5), (4, 1.0)])
def test_gamma_sampling_matches_the_mixture(coarse_oracle, mixture, noise, gamma, nfe):
    """Every gamma and NFE gives the data law: mean, variance, mode weights and within-mode variance within sampling
    error (n = 2000). At 1 NFE gamma plays no role (the one jump lands on sigma_min); gamma = 0 at 2 and 4 NFE gives
    the 1-NFE samples (test_gamma0_samples_agree_across_nfe), so its law needs no second check."""
    x = sample(coarse_oracle, noise, nfe, gamma, seed=10 * nfe)
    z = distribution_z_scores(mixture, x)
    assert max(z.values()) < Z_MAX, z


# -- the checks can fail -----------------------------------------------------------------------------------------------
def test_wrong_oracle_breaks_agreement_and_distribution(mixture, noise):
    """With G = one Euler jump (g = D(x, t) for every s) the same checks fail by far: the gamma = 0 samples at 1, 2,
    4 NFE disagree, and 1-NFE samples collapse towards the data mean."""
    wrong = oracle_pipeline(mixture, euler_jump(mixture.denoise))
    samples = {n: sample(wrong, noise, n, 0.0) for n in (1, 2, 4)}
    assert float((samples[1] - samples[4]).abs().max()) > 100 * AGREEMENT_TOL
    assert float((samples[2] - samples[4]).abs().max()) > 100 * AGREEMENT_TOL
    assert distribution_z_scores(mixture, samples[1])["variance"] > 10 * Z_MAX
    assert max(distribution_z_scores(mixture, sample(wrong, noise, 4, 1.0, seed=40)).values()) > Z_MAX


def test_heun_sampler_on_the_oracle_denoiser(oracle, mixture, noise):
    """sampler="heun" runs EDM Heun on g(x, t, t) = D: with 40 steps it lands near the same ODE solution as the
    gamma = 0 jump (Heun's error at 40 steps, not the oracle's)."""
    jumps = sample(oracle, noise[:256], 1, 0.0)
    heun = oracle(batch_size=256, num_inference_steps=40, sampler="heun", latents=noise[:256],
                  output_type="latent").images
    err = float((heun - jumps).abs().max())
    assert err < 2e-2, err
