"""Consistency Trajectory Models, core pieces (Kim et al., ICLR 2024, "Consistency Trajectory Model: Learning
Probability Flow ODE Trajectory of Diffusion", arXiv 2310.02279): the trajectory function G(x, t, s) and the
(t, u, s) time sampler of the CTM loss. The loss, scheduler and GAN term build on these.

Trajectory function (CTM sec. 3, eq. for G_theta; sony/ctm ``KarrasDenoiser.get_denoised_and_G`` with
inner_parametrization='edm', outer_parametrization='euler'):

    G(x_t, t, s) = (s/t) x_t + (1 - s/t) g(x_t, t, s)
    g(x_t, t, s) = c_skip(t) x_t + c_out(t) F(c_in(t) x_t, c_noise(t), c_noise(s))     (EDM scalings, at t)

so G(x_t, t, t) = x_t exactly, G(x_t, t, 0) = g(x_t, t, 0), and g(x_t, t, t) is a denoiser D(x_t, t) (what the DSM
term trains; score = (g(x, t, t) - x) / t^2). c_noise(sigma) = 250 ln(sigma) as everywhere in gensample.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .edm_parametrization import edm_scalings
from .parametrization import _as_tensor, _per_sample, input_scaling, noise_conditioning
from .sigmas import RHO, SIGMA_DATA, SIGMA_MAX, SIGMA_MIN, karras_sigmas

__all__ = ["TrajectoryFunction", "CTMTimes", "ctm_sigmas", "heun_step_probabilities", "sample_ctm_times"]


class TrajectoryFunction(nn.Module):
    """G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s), g = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t), c_noise(s)).

    ``backbone`` is called as ``F(x, c_noise_t, s_timestep=c_noise_s, **kwargs)`` (a
    :class:`gensample.models.ctm_unet.CTMUNet2DModel`, or any callable with that signature; an output with
    ``.sample`` is unwrapped). ``t`` and ``s`` are floats, 0-d tensors or one value per sample, with
    0 <= s <= t and t > 0. Scalings and s/t are formed in float64 and cast to the input dtype, so G(x, t, t) = x
    holds bit for bit.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = SIGMA_DATA):
        super().__init__()
        if sigma_data <= 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}.")
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    @staticmethod
    def _times(x: torch.Tensor, t, s) -> tuple[torch.Tensor, torch.Tensor]:
        t = _per_sample(_as_tensor(t), x).to(torch.float64)
        s = _per_sample(_as_tensor(s), x).to(torch.float64)
        if (t <= 0).any():
            raise ValueError(f"t must be > 0, got min {float(t.min())}.")
        if (s < 0).any() or (s > t).any():
            raise ValueError("need 0 <= s <= t for every sample (G jumps from t down to s), got "
                             f"t={t.flatten().tolist()[:8]}, s={s.flatten().tolist()[:8]}.")
        return t, s

    def backbone_output(self, x: torch.Tensor, t, s, **kwargs: Any) -> torch.Tensor:
        """F(c_in(t) x, c_noise(t), c_noise(s)): the raw network output."""
        t, s = self._times(x, t, s)
        c_in = input_scaling(t, self.sigma_data).to(x.dtype)
        out = self.backbone(c_in * x, noise_conditioning(t.flatten()).to(torch.float32),
                            s_timestep=noise_conditioning(s.flatten()).to(torch.float32), **kwargs)
        return out.sample if hasattr(out, "sample") else out

    def g(self, x: torch.Tensor, t, s, **kwargs: Any) -> torch.Tensor:
        """g(x, t, s) = c_skip(t) x + c_out(t) F(c_in(t) x, c_noise(t), c_noise(s)) (EDM Table 1 scalings at t)."""
        t64, _ = self._times(x, t, s)
        c_skip, c_out = edm_scalings(t64, self.sigma_data)
        return c_skip.to(x.dtype) * x + c_out.to(x.dtype) * self.backbone_output(x, t, s, **kwargs)

    def denoise(self, x: torch.Tensor, sigma, **kwargs: Any) -> torch.Tensor:
        """g(x, sigma, sigma): the student as an EDM denoiser D(x, sigma) (CTM's DSM term, score-based sampling)."""
        return self.g(x, sigma, sigma, **kwargs)

    def forward(self, x: torch.Tensor, t, s, **kwargs: Any) -> torch.Tensor:
        """G(x, t, s) = (s/t) x + (1 - s/t) g(x, t, s)."""
        t64, s64 = self._times(x, t, s)
        ratio = s64 / t64
        return ratio.to(x.dtype) * x + (1 - ratio).to(x.dtype) * self.g(x, t, s, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# (t, u, s) sampling for the CTM loss
# ---------------------------------------------------------------------------------------------------------------------
def ctm_sigmas(num_sigmas: int, sigma_min: float = SIGMA_MIN, sigma_max: float = SIGMA_MAX, rho: float = RHO,
               dtype: torch.dtype = torch.float64, device: torch.device | str | None = None) -> torch.Tensor:
    """CTM's discrete grid, **descending** (index 0 = sigma_max, N-1 = sigma_min; sony/ctm ``KarrasDenoiser.get_t``):
    sigma_i = (sigma_max^(1/rho) + i/(N-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho. N = 18 gives CIFAR-10's
    80, 57.59, ..., 0.0075, 0.002."""
    return karras_sigmas(num_sigmas, sigma_min, sigma_max, rho, dtype=dtype).flip(0).to(device)


def heun_step_probabilities(max_heun_steps: int, multiplier: float = 1.0) -> torch.Tensor:
    """p(k) proportional to k^multiplier for k = 1..K (CTM ``get_num_heun_step``, strategy 'weighted'; the default
    multiplier 1 gives p(k) = 2k / (K (K + 1))). Entry k-1 is p(k); float64."""
    if not isinstance(max_heun_steps, int) or max_heun_steps < 1:
        raise ValueError(f"max_heun_steps must be an integer >= 1, got {max_heun_steps!r}.")
    weights = torch.arange(1, max_heun_steps + 1, dtype=torch.float64) ** float(multiplier)
    return weights / weights.sum()


@dataclass
class CTMTimes:
    """One draw of CTM's times. Indices are on the descending grid :func:`ctm_sigmas` (0 = sigma_max), so
    t_index < u_index <= s_index and t > u >= s >= sigma_min.

    num_heun_steps: k, the teacher Heun steps from t to u (one value for the whole batch);
    t_index, u_index = t_index + k, s_index: (B,) int64; t, u, s: the matching sigmas, (B,) float64.
    """

    num_heun_steps: int
    t_index: torch.Tensor
    u_index: torch.Tensor
    s_index: torch.Tensor
    t: torch.Tensor
    u: torch.Tensor
    s: torch.Tensor


def sample_ctm_times(
    batch_size: int,
    num_sigmas: int = 18,
    max_heun_steps: int = 17,
    heun_step_multiplier: float = 1.0,
    num_heun_steps: int | None = None,
    sigma_min: float = SIGMA_MIN,
    sigma_max: float = SIGMA_MAX,
    rho: float = RHO,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> CTMTimes:
    """Draw (k, t, u, s) as the CTM loss does (sony/ctm ``ctm_losses``, ``get_num_heun_step``,
    ``UniformSampler.sample_t``, ``sample_s`` with strategy 'uniform'; reference sec. 1.3), on the N-point
    descending Karras grid:

    1. k in {1..K} with p(k) proportional to k^heun_step_multiplier, once per call (``num_heun_steps`` fixes it);
    2. per sample, n ~ Uniform{0, ..., N-1-k}: t = sigma_n, u = sigma_{n+k};
    3. per sample, m ~ Uniform{n+k, ..., N-1}: s = sigma_m (s = u is possible, s = sigma_min at m = N-1).

    CTM defaults: N = 18, K = 17 (CIFAR-10); N = 40, K = 39 (ImageNet-64). sony/ctm draws k once per global batch
    and broadcasts it to all ranks; to reproduce that under DDP pass a ``generator`` seeded identically on every rank
    (e.g. from the step) or pass ``num_heun_steps``. Random numbers come from ``generator`` on the CPU; the result
    is moved to ``device``.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}.")
    if not isinstance(num_sigmas, int) or num_sigmas < 2:
        raise ValueError(f"num_sigmas must be an integer >= 2, got {num_sigmas!r}.")
    if not isinstance(max_heun_steps, int) or not 1 <= max_heun_steps <= num_sigmas - 1:
        raise ValueError(f"max_heun_steps must be an integer in [1, num_sigmas - 1 = {num_sigmas - 1}] (a k-step "
                         f"Heun solve from t = sigma_n needs n + k <= N - 1), got {max_heun_steps!r}.")
    if num_heun_steps is None:
        probs = heun_step_probabilities(max_heun_steps, heun_step_multiplier)
        k = int(torch.multinomial(probs, 1, generator=generator)) + 1
    else:
        if not isinstance(num_heun_steps, int) or not 1 <= num_heun_steps <= max_heun_steps:
            raise ValueError(f"num_heun_steps must be an integer in [1, {max_heun_steps}], got {num_heun_steps!r}.")
        k = num_heun_steps
    n = torch.randint(0, num_sigmas - k, (batch_size,), generator=generator)
    count = num_sigmas - n - k  # number of admissible s indices, >= 1
    offset = (torch.rand(batch_size, generator=generator, dtype=torch.float64) * count).floor().long()
    m = n + k + torch.minimum(offset, count - 1)
    grid = ctm_sigmas(num_sigmas, sigma_min, sigma_max, rho)
    to = dict(device=device)
    return CTMTimes(num_heun_steps=k, t_index=n.to(**to), u_index=(n + k).to(**to), s_index=m.to(**to),
                    t=grid[n].to(**to), u=grid[n + k].to(**to), s=grid[m].to(**to))
