"""CTM training diagnosed on a toy with an exact teacher (issue #17, item 2): are 2- and 4-NFE gamma = 0 samples
worse than 1-NFE ones, and which training ingredient closes the gap?

Data: the Gaussian mixture of 1x4x4 "images" of ``tests/test_ctm_oracle.py`` (three modes, weights 0.5/0.3/0.2),
whose denoiser D*(x, sigma) = E[x_0 | x_sigma] is closed-form. Teacher: that exact D* (as an ``EDMDenoiser``), so the
teacher's Heun solves in the CTM loss are exact up to Heun's error. Student: a small residual MLP behind the
``CTMUNet2DModel`` interface (:class:`ToyBackbone`; same t / s embeddings, s-branch at zero output), initialised
(like ``gensample train ctm`` from an EDM teacher) as a denoiser pre-trained to regress D* (``--init-steps``; cached
under ``runs/ctm_toy/``). Training: ``CTMTraining`` exactly as the
CLI builds it (pseudo-Huber distance, DSM term with adaptive weight, target EMA 0.999, p(k) ~ k, N = 18), Adam, a
fresh batch of mixture samples per step, an evaluation EMA (0.999 with warm-up, as the Trainer's).

Evaluation (the EMA student, and the raw student), gamma = 0 at 1, 2 and 4 NFE through ``CTMPipeline`` from the
same 1000 noises:

* ``ode_rmse``: RMS distance to the exact ODE endpoint of the same noise (the oracle G* of the test, 192 Heun
  steps): what a perfect CTM returns at every NFE; it needs no sampling statistics.
* ``fd``: Frechet distance of the samples' mean/covariance to the mixture's exact ones (the W2^2 of the
  moment-matched Gaussians; "FID in pixel space"). 1000 exact samples score about ``fd_floor``.
* ``fd_mean_term``: its ||mean - mean*||^2 part; ``variance_ratio``: total variance over the exact one.
* ``mode_tv``: total variation between the nearest-mode frequencies and the weights.
* ``within_std``: the RMS distance to the nearest mode mean over the true one (1 = right spread, < 1: too sharp).
* 2-NFE decomposition: ``jump1_rmse`` = RMS of G(x_T, 80, s_1) - G*(x_T, 80, s_1) at s_1 = 2.51 (in units of
  s_1: < 1 means the first jump lands within its noise level), ``jump2_rmse`` = RMS of G(G*(x_T, 80, s_1), s_1,
  sigma_min) - endpoint (the second jump from the exact intermediate point).

Ablations (one at a time): ``--steps``, ``--heun-step-multiplier`` (p(k) ~ k^m; 0 = uniform k), ``--s-strategy``
(uniform: CTM; smallest: s = sigma_min, consistency-model-like; u: s = u, the shortest jump), ``--dsm-weight``,
``--dsm-target teacher`` (the DSM term regresses onto the teacher's denoiser instead of x_0), ``--compare-at s``
(estimate and target compared at level s instead of after the target's map to sigma_min), ``--modes`` (a
many-mode mixture, a stand-in for a small finite data set), ``--teacher init`` (a learned teacher),
``--num-sigmas``, ``--target-inner``, ``--lr``.

    python scripts/ctm_toy.py --steps 1000 --output runs/ctm_toy/base.json   # about 3 min on a shared core
    python scripts/ctm_toy.py summary runs/ctm_toy/*.json                     # one markdown row per run
    python scripts/ctm_toy.py trajectory runs/CTM/pipeline runs/EDM/pipeline  # a real run vs its teacher's ODE

Single-threaded (``--threads 1``). Every run prints one table row per evaluation.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import math
import sys
import time
from pathlib import Path

import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from gensample.pipelines.pipeline_ctm import CTMPipeline
from tqdm.auto import tqdm

from gensample.core.parametrization import EDMDenoiser, TrajectoryFunction, per_sample
from gensample.core.sigmas import CTMTimes, karras_ramp, karras_sigmas_descending
from gensample.methods.ctm import CTMTraining, teacher_heun_solve
from gensample.models.ctm_unet import CTMUNet2DModel
from gensample.schedulers.scheduling_ctm import CTMScheduler
from gensample.training.ema import EMA

REPO = Path(__file__).resolve().parents[1]
SIGMA_MIN, SIGMA_MAX, SIGMA_DATA = 0.002, 80.0, 0.5


def _oracle_module():
    """tests/test_ctm_oracle.py, where the closed-form teacher and the oracle trajectory live (written once)."""
    spec = importlib.util.spec_from_file_location("ctm_oracle", REPO / "tests" / "test_ctm_oracle.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["ctm_oracle"] = module
    spec.loader.exec_module(module)
    return module


oracle = _oracle_module()


class ToyCTMTraining(CTMTraining):
    """CTMTraining with the ablation switches of this script (defaults: exactly CTMTraining)."""

    def __init__(self, *args, s_strategy: str = "uniform", compare_at: str = "sigma_min", dsm_target: str = "data",
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.s_strategy, self.compare_at, self.dsm_target = s_strategy, compare_at, dsm_target

    def dsm_loss(self, x0: torch.Tensor, **kwargs) -> torch.Tensor:
        """``dsm_target="teacher"``: the same weighted regression of g(x_sigma, sigma, sigma), onto the teacher's
        D(x_sigma, sigma) instead of x_0 (a distilled DSM term: it trains the student towards the denoiser whose
        trajectories the CTM term distils, not towards the data's)."""
        if self.dsm_target == "data":
            return super().dsm_loss(x0, **kwargs)
        from gensample.core.losses import edm_denoising_loss

        sigma = self.sample_dsm_sigmas(x0.shape[0], x0.device)
        x_sigma = x0 + per_sample(sigma, x0).to(x0.dtype) * torch.randn_like(x0)
        with torch.no_grad():
            target = self.teacher(x_sigma, sigma, **kwargs).to(x0.dtype)
        return edm_denoising_loss(self.student.denoise(x_sigma, sigma, **kwargs), target, sigma,
                                  self.sigma_data).mean()

    def sample_times(self, batch_size: int, step: int, device=None) -> CTMTimes:
        times = super().sample_times(batch_size, step, device)
        if self.s_strategy == "uniform":
            return times
        grid = karras_sigmas_descending(self.num_sigmas, self.sigma_min, self.sigma_max, self.rho)
        m = (torch.full_like(times.s_index, self.num_sigmas - 1) if self.s_strategy == "smallest"
             else times.u_index.clone())
        return CTMTimes(times.num_heun_steps, times.t_index, times.u_index, m, times.t, times.u,
                        grid[m.cpu()].to(times.s.device))

    def ctm_estimate(self, x_t, t, s, **kwargs):
        if self.compare_at == "s":
            return self.student(x_t, t, s, **kwargs)
        return super().ctm_estimate(x_t, t, s, **kwargs)

    @torch.no_grad()
    def ctm_target(self, x_t, times, **kwargs):
        if self.compare_at == "s":
            x_u = teacher_heun_solve(self.teacher, x_t, self.grid, times.t_index, times.num_heun_steps, **kwargs)
            inner = self.student if self.target_inner == "student" else self.target
            return inner(x_u, times.u, times.s, **kwargs)
        return super().ctm_target(x_t, times, **kwargs)


def toy_mixture(modes: int, std: float, seed: int = 0):
    """The test's three-mode mixture, or ``modes`` equal-weight modes with distinct random +-0.6 sign patterns."""
    if modes == 3:
        return oracle.GaussianMixture.default()
    g = torch.Generator().manual_seed(seed)
    patterns = torch.randperm(2**16, generator=g)[:modes]
    bits = ((patterns[:, None] >> torch.arange(16)) & 1).to(torch.float64)
    return oracle.GaussianMixture(torch.full((modes,), 1.0 / modes, dtype=torch.float64),
                                  (0.6 * (2 * bits - 1)).reshape(modes, 1, 4, 4), torch.full((modes,), std))


class ExactDenoiser(EDMDenoiser):
    """D* as the ``EDMDenoiser`` that ``CTMTraining`` accepts as a teacher. Its backbone is the oracle's (so
    ``backbone_output`` is right), but ``forward`` returns D* directly: the same values as the preconditioned
    call up to the float32 rounding of c_noise, at half the cost of the teacher's Heun steps."""

    def __init__(self, mixture):
        backbone = oracle.OracleBackbone(sample_size=mixture.shape[-1], in_channels=mixture.shape[0])
        backbone.denoiser = mixture.denoise
        super().__init__(backbone, SIGMA_DATA)
        self.mixture = mixture

    def forward(self, x: torch.Tensor, sigma, **kwargs) -> torch.Tensor:
        return self.mixture.denoise(x, sigma)


def exact_teacher(mixture) -> EDMDenoiser:
    return ExactDenoiser(mixture)


class ToyBackbone(CTMUNet2DModel):
    """F(x, t, s) as a small residual MLP behind :class:`CTMUNet2DModel`'s interface (what ``CTMTraining`` and
    ``CTMPipeline`` call): the same time projection and t / s embeddings as the CTM UNet (s added to t, s-branch at
    zero output), then ``depth`` residual blocks of width ``hidden`` each fed the embedding; the output layer is
    ``conv_out`` (a Linear here), the last layer of the adaptive DSM weight. An MLP, not the tiny UNet, because a
    tiny UNet step costs ~0.3 s on this shared CPU (a 4x4 image runs through ~60 small kernels)."""

    def __init__(self, sample_size: int = 4, in_channels: int = 1, hidden: int = 128, depth: int = 3):
        super().__init__(sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
                         block_out_channels=(32,), down_block_types=("DownBlock2D",),
                         up_block_types=("UpBlock2D",), layers_per_block=1, norm_num_groups=8)
        for name in ("conv_in", "down_blocks", "mid_block", "up_blocks", "conv_norm_out", "conv_act"):
            setattr(self, name, None)
        dim, emb_dim = in_channels * sample_size**2, self.time_embedding.linear_2.out_features
        self.inp = torch.nn.Linear(dim, hidden)
        self.emb_proj = torch.nn.ModuleList(torch.nn.Linear(emb_dim, hidden) for _ in range(depth))
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(hidden, hidden) for _ in range(depth))
        self.conv_out = torch.nn.Linear(hidden, dim)

    def forward(self, sample, timestep, class_labels=None, return_dict: bool = True, s_timestep=None):
        t_emb = self.time_proj(self._timesteps(timestep, sample)).to(dtype=self.dtype)
        s_emb = t_emb if s_timestep is None else self.time_proj(self._timesteps(s_timestep, sample)).to(self.dtype)
        emb = torch.nn.functional.silu(self.time_embedding(t_emb) + self.s_embedding(s_emb))
        h = self.inp(sample.flatten(1))
        for proj, block in zip(self.emb_proj, self.blocks):
            h = h + block(torch.nn.functional.silu(h + proj(emb)))
        out = self.conv_out(torch.nn.functional.silu(h)).reshape(sample.shape)
        return (out,) if not return_dict else UNet2DOutput(sample=out)


def pretrained_init(mixture, steps: int, seed: int, batch_size: int = 128, lr: float = 1e-3) -> ToyBackbone:
    """The toy backbone trained as a denoiser g(x, sigma, sigma) regressed onto D* (EDM weighting; sigma half EDM
    log-normal, half CTM's rho-uniform on [0.3, 80]) for ``steps`` steps with the s-branch frozen at zero output, so
    g(x, t, s) = D_init(x, t) for every s: the stand-in for "the student starts as the teacher's network".
    Cached under runs/ctm_toy/."""
    tag = "" if len(mixture.weights) == 3 else f"-modes{len(mixture.weights)}-std{float(mixture.stds[0]):g}"
    path = REPO / "runs" / "ctm_toy" / f"init-mlp{tag}-{steps}-seed{seed}.safetensors"
    torch.manual_seed(seed)
    backbone = ToyBackbone(mixture.shape[-1], mixture.shape[0])
    if path.exists():
        from safetensors.torch import load_file

        backbone.load_state_dict(load_file(str(path)))
        return backbone
    g_theta = TrajectoryFunction(backbone, SIGMA_DATA)
    backbone.s_embedding.requires_grad_(False)
    params = [p for p in backbone.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="pre-train D", leave=False):
        x0 = mixture.sample(batch_size, g).float()
        half = batch_size // 2
        sigma = torch.cat([(-1.2 + 1.2 * torch.randn(half, generator=g, dtype=torch.float64)).exp(),
                           karras_ramp(0.7 * torch.rand(batch_size - half, generator=g, dtype=torch.float64),
                                       SIGMA_MAX, SIGMA_MIN)])
        x = x0 + per_sample(sigma, x0).float() * torch.randn(x0.shape, generator=g)
        weight = ((sigma**2 + SIGMA_DATA**2) / (sigma * SIGMA_DATA) ** 2).float()
        error = g_theta.denoise(x, sigma) - mixture.denoise(x, sigma).float()
        loss = (weight * error.square().flatten(1).mean(1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        schedule.step()
    backbone.s_embedding.requires_grad_(True)
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(backbone.state_dict(), str(path))
    return backbone


def frechet_distance(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> float:
    """||m - mean||^2 + tr(C + cov - 2 (cov^1/2 C cov^1/2)^1/2) of the samples' (m, C)."""
    flat = x.to(torch.float64).flatten(1)
    m, c = flat.mean(0), torch.cov(flat.T)

    def sqrtm(a):
        vals, vecs = torch.linalg.eigh((a + a.T) / 2)
        return vecs @ torch.diag(vals.clamp(min=0).sqrt()) @ vecs.T

    root = sqrtm(cov)
    return float((m - mean).square().sum() + torch.trace(c + cov - 2 * sqrtm(root @ c @ root)))


class Evaluator:
    """The metrics of the module docstring on ``num`` fixed noises."""

    def __init__(self, mixture, num: int = 1000, seed: int = 1234, num_sigmas: int = 18):
        self.mixture, self.num_sigmas = mixture, num_sigmas
        self.noise = torch.randn((num, *mixture.shape), generator=torch.Generator().manual_seed(seed),
                                 dtype=torch.float64)
        self.exact_g = oracle.heun_trajectory(mixture.denoise, 192)
        self.endpoint = self.exact_g(self.noise * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN)
        w, mu, sd = mixture.weights, mixture.means.flatten(1), mixture.stds
        self.mean = (w[:, None] * mu).sum(0)
        a = mu - self.mean
        self.cov = (w[:, None, None] * (a[:, :, None] * a[:, None, :])).sum(0) + torch.diag(
            torch.full((mixture.dim,), float((w * (sd**2 + SIGMA_MIN**2)).sum()), dtype=torch.float64))
        self.s1 = self._two_step_level()
        self.mid_exact = self.exact_g(self.noise * SIGMA_MAX, SIGMA_MAX, self.s1)
        floor = mixture.sample(num, torch.Generator().manual_seed(seed + 1))
        self.fd_floor = frechet_distance(floor + SIGMA_MIN * torch.randn_like(floor), self.mean, self.cov)

    def _two_step_level(self) -> float:
        scheduler = CTMScheduler(num_train_timesteps=self.num_sigmas)
        scheduler.set_timesteps(2)
        return float(scheduler.sigmas[1])

    @torch.no_grad()
    def heun(self, backbone: torch.nn.Module, steps: int = 40) -> dict[str, float]:
        """The metrics of EDM Heun (``steps`` steps, 2 steps - 1 NFE) over the student's denoiser g(x, t, t): how
        good the student is as a diffusion model (for the initialisation: the teacher's stand-in)."""
        pipe = CTMPipeline(unet=backbone.eval(), scheduler=CTMScheduler(num_train_timesteps=self.num_sigmas))
        pipe.set_progress_bar_config(disable=True)
        x = pipe(batch_size=len(self.noise), num_inference_steps=steps, sampler="heun", latents=self.noise.float(),
                 output_type="latent").images
        return self.sample_metrics(x)

    def sample_metrics(self, x: torch.Tensor) -> dict[str, float]:
        mix = self.mixture
        modes = mix.assign(x)
        frac = torch.bincount(modes, minlength=len(mix.weights)).to(torch.float64) / len(x)
        residual = (x.to(torch.float64).flatten(1) - mix.means.flatten(1)[modes]).square().mean(1)
        true = (mix.stds[modes] ** 2 + SIGMA_MIN**2)
        flat = x.to(torch.float64).flatten(1)
        return {"ode_rmse": float((x - self.endpoint).square().mean().sqrt()),
                "fd": frechet_distance(x, self.mean, self.cov),
                "fd_mean_term": float((flat.mean(0) - self.mean).square().sum()),
                "variance_ratio": float(flat.var(0).sum() / torch.trace(self.cov)),
                "mode_tv": float(0.5 * (frac - mix.weights).abs().sum()),
                "within_std": math.sqrt(float(residual.mean() / true.mean()))}

    @torch.no_grad()
    def __call__(self, backbone: torch.nn.Module, nfes=(1, 2, 4), gamma: float = 0.0) -> dict[str, dict]:
        backbone = backbone.eval()
        pipe = CTMPipeline(unet=backbone, scheduler=CTMScheduler(num_train_timesteps=self.num_sigmas))
        pipe.set_progress_bar_config(disable=True)
        out = {}
        for n in nfes:
            x = pipe(batch_size=len(self.noise), num_inference_steps=n, gamma=gamma, latents=self.noise.float(),
                     generator=torch.Generator().manual_seed(0), output_type="latent").images
            out[f"nfe{n}"] = self.sample_metrics(x)
        G = pipe.trajectory_function
        mid = G(self.noise.float() * SIGMA_MAX, SIGMA_MAX, self.s1)
        second = G(self.mid_exact.float(), self.s1, SIGMA_MIN)
        out["jump1_rmse_over_s1"] = float((mid - self.mid_exact).square().mean().sqrt()) / self.s1
        out["jump2_rmse"] = float((second - self.endpoint).square().mean().sqrt())
        return out


def fmt(metrics: dict) -> str:
    cells = [f"{metrics[f'nfe{n}']['ode_rmse']:.4f}/{metrics[f'nfe{n}']['fd']:.4f}" for n in (1, 2, 4)
             if f"nfe{n}" in metrics]
    return (" | ".join(cells) + f" | jump1 {metrics['jump1_rmse_over_s1']:.3f} | jump2 {metrics['jump2_rmse']:.4f}")


def summary(paths: list[Path]) -> None:
    """One markdown row per run (its last evaluation, EMA): ode_rmse and fd at NFE 1, 2, 4, jump errors."""
    print("| run | steps | ode_rmse NFE 1 / 2 / 4 | fd NFE 1 / 2 / 4 | mode_tv 1 / 2 / 4 | jump1/s1 | jump2 |")
    print("|---|---|---|---|---|---|---|")
    for path in paths:
        record = json.loads(Path(path).read_text())
        last = record["evals"][-1]
        e = last["ema"]
        cells = [" / ".join(f"{e[f'nfe{n}'][key]:.{digits}f}" for n in (1, 2, 4))
                 for key, digits in (("ode_rmse", 3), ("fd", 4), ("mode_tv", 3))]
        print(f"| {Path(path).stem} | {last['step']} | " + " | ".join(cells)
              + f" | {e['jump1_rmse_over_s1']:.3f} | {e['jump2_rmse']:.3f} |")


@torch.no_grad()
def trajectory_report(ctm_pipe: CTMPipeline, teacher, num: int = 500, heun_steps: int = 40, nfes=(1, 2, 4),
                      seed: int = 1234) -> dict[str, float]:
    """The toy's per-sample metrics for a REAL CTM run, with its teacher's ODE as the reference (no closed form
    needed): from ``num`` fixed noises, the RMS distance of gamma = 0 samples at each NFE to the teacher's EDM Heun
    solution (``heun_steps`` steps, sigma_max -> sigma_min) of the same noise, and the 2-NFE jump errors against
    the teacher's Heun trajectory. ``teacher``: anything :func:`gensample.teachers.as_denoiser` accepts."""
    from gensample.methods.teachers import as_denoiser

    denoiser = as_denoiser(teacher)
    shape = (num, *ctm_pipe.latent_shape)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    reference = oracle.heun_trajectory(denoiser, heun_steps)
    endpoint = reference(noise * SIGMA_MAX, SIGMA_MAX, SIGMA_MIN).float()
    scheduler = CTMScheduler.from_config(ctm_pipe.scheduler.config)
    scheduler.set_timesteps(2)
    s1 = float(scheduler.sigmas[1])
    # the steps are split in proportion to the rho-space length of each leg, so the two legs add up to the full solve
    split = max(1, round(heun_steps * (SIGMA_MAX ** (1 / 7) - s1 ** (1 / 7))
                         / (SIGMA_MAX ** (1 / 7) - SIGMA_MIN ** (1 / 7))))
    mid = oracle.heun_trajectory(denoiser, split)(noise * SIGMA_MAX, SIGMA_MAX, s1).float()
    report = {"s1": s1}
    for n in nfes:
        x = ctm_pipe(batch_size=num, num_inference_steps=n, gamma=0.0, latents=noise,
                     output_type="latent").images.float()
        report[f"nfe{n}_rmse_to_teacher_ode"] = float((x - endpoint).square().mean().sqrt())
    G = ctm_pipe.trajectory_function
    report["jump1_rmse_over_s1"] = float((G(noise * SIGMA_MAX, SIGMA_MAX, s1).float() - mid).square().mean().sqrt()) / s1
    report["jump2_rmse"] = float((G(mid, s1, SIGMA_MIN).float() - endpoint).square().mean().sqrt())
    return report


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "summary":
        summary([Path(p) for p in sys.argv[2:]])
        return
    if len(sys.argv) > 1 and sys.argv[1] == "trajectory":
        # python scripts/ctm_toy.py trajectory CTM_PIPELINE TEACHER_PIPELINE [NUM]
        from gensample import load_pipeline

        torch.set_num_threads(1)
        ctm_pipe, teacher = load_pipeline(sys.argv[2]), load_pipeline(sys.argv[3])
        ctm_pipe.set_progress_bar_config(disable=True)
        num = int(sys.argv[4]) if len(sys.argv) > 4 else 500
        print(json.dumps(trajectory_report(ctm_pipe, teacher, num), indent=1))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--ema-rate", type=float, default=0.999)
    parser.add_argument("--init-steps", type=int, default=2000, help="pre-training of the student's denoiser")
    parser.add_argument("--num-sigmas", type=int, default=18)
    parser.add_argument("--heun-step-multiplier", type=float, default=1.0)
    parser.add_argument("--s-strategy", choices=["uniform", "smallest", "u"], default="uniform")
    parser.add_argument("--compare-at", choices=["sigma_min", "s"], default="sigma_min")
    parser.add_argument("--dsm-weight", type=float, default=1.0)
    parser.add_argument("--dsm-target", choices=["data", "teacher"], default="data",
                        help="regress the DSM term onto x_0 (CTM) or onto the teacher's D(x_sigma, sigma)")
    parser.add_argument("--target-inner", choices=["student", "target"], default="student")
    parser.add_argument("--distance", choices=["pseudo_huber", "l2"], default="pseudo_huber")
    parser.add_argument("--modes", type=int, default=3,
                        help="3: the test's mixture; K > 3: K equal-weight modes (random +-0.6 sign patterns, std "
                             "--mode-std), a stand-in for a small finite data set")
    parser.add_argument("--mode-std", type=float, default=0.05)
    parser.add_argument("--teacher", choices=["exact", "init"], default="exact",
                        help="exact: D*; init: the pre-trained initialisation (a learned teacher, as on the digits "
                             "where the student starts as the teacher's network)")
    parser.add_argument("--eval-every", type=int, default=100)
    parser.add_argument("--num-eval", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=None, help="JSON file for the results")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    mixture = toy_mixture(args.modes, args.mode_std)
    evaluator = Evaluator(mixture, args.num_eval, num_sigmas=args.num_sigmas)
    student = pretrained_init(mixture, args.init_steps, args.seed)
    if args.teacher == "exact":
        teacher = exact_teacher(mixture)
    else:
        teacher = TrajectoryFunction(copy.deepcopy(student).requires_grad_(False).eval(), SIGMA_DATA)
    torch.manual_seed(args.seed)
    method = ToyCTMTraining(teacher, student=student, num_sigmas=args.num_sigmas,
                            heun_step_multiplier=args.heun_step_multiplier, dsm_weight=args.dsm_weight,
                            target_inner=args.target_inner, distance=args.distance, seed=args.seed,
                            s_strategy=args.s_strategy, compare_at=args.compare_at, dsm_target=args.dsm_target)
    ema = EMA(method.student.backbone, args.ema_rate)
    opt = torch.optim.Adam(method.student.parameters(), lr=args.lr)
    record = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
              "fd_floor": evaluator.fd_floor, "s1": evaluator.s1, "evals": []}
    print(f"exact samples: fd {evaluator.fd_floor:.4f}; 2-NFE intermediate level s1 = {evaluator.s1:.3f}")
    print("columns: ode_rmse/fd at NFE 1 | 2 | 4 (gamma 0), 2-NFE jump errors")
    init_heun = evaluator.heun(method.student.backbone)
    record["init_heun40"] = init_heun
    print(f"init as a diffusion model (EDM Heun, 40 steps): ode_rmse {init_heun['ode_rmse']:.4f}, fd "
          f"{init_heun['fd']:.4f}, mode_tv {init_heun['mode_tv']:.3f}, within_std {init_heun['within_std']:.3f}")
    start = time.time()
    first = evaluator(method.student.backbone)
    record["evals"].append({"step": 0, "student": first, "ema": first})
    print(f"step 0 (init)      {fmt(first)}", flush=True)
    generator = torch.Generator().manual_seed(args.seed + 1)
    for step in tqdm(range(args.steps), desc="ctm", leave=False):
        method.train()
        x0 = mixture.sample(args.batch_size, generator).float()
        losses = method(x0, step)
        opt.zero_grad()
        losses["loss"].backward()
        opt.step()
        method.after_optimizer_step(step)
        ema.update(method.student.backbone)
        if (step + 1) % args.eval_every == 0 or step + 1 == args.steps:
            res_s, res_e = evaluator(method.student.backbone), evaluator(ema.model)
            method.student.backbone.train()
            record["evals"].append({"step": step + 1, "student": res_s, "ema": res_e,
                                    "ctm_loss": float(losses["ctm"]), "dsm": float(losses.get("dsm", 0.0)),
                                    "dsm_adaptive_weight": float(losses.get("dsm_weight", 0.0))})
            print(f"step {step + 1} student {fmt(res_s)}\n{'':>{len(str(step + 1)) + 5}} ema     {fmt(res_e)}",
                  flush=True)
    record["seconds"] = time.time() - start
    print(f"{record['seconds']:.0f} s")
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
