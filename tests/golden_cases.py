"""Fixed-seed outputs of every shipped pipeline, of the EDM and CTM samplers and of each method's loss, recorded in
``tests/data/golden.safetensors`` so that a refactor can show its numbers did not move (``tests/test_golden.py``).

Only stable, public entry points are used here (pipeline classes, model presets, method classes), so the cases run
unchanged on both sides of a restructuring. Re-record (after a deliberate change of numbers only) with
``python tests/golden_cases.py --write``.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import torch

ASSETS = Path(__file__).resolve().parents[1] / "assets" / "pipelines"
GOLDEN_FILE = Path(__file__).resolve().parent / "data" / "golden.safetensors"


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ict_digits() -> dict[str, torch.Tensor]:
    from gensample.pipelines import ConsistencyPipeline

    pipe = _quiet(ConsistencyPipeline.from_pretrained(ASSETS / "ict-digits"))
    out = {}
    for steps in (1, 2):
        out[f"ict_digits_{steps}step"] = pipe(batch_size=4, num_inference_steps=steps, generator=gen(0),
                                              output_type="pt").images
    out["ict_digits_ts_0_22"] = pipe(batch_size=4, timesteps=[0, 22], generator=gen(1), output_type="pt").images
    out["ict_digits_sigmas"] = pipe(batch_size=4, sigmas=[80.0, 5.0, 0.8], generator=gen(2), output_type="pt").images
    return out


def slct_digits() -> dict[str, torch.Tensor]:
    from gensample.pipelines import LatentConsistencyPipeline

    pipe = _quiet(LatentConsistencyPipeline.from_pretrained(ASSETS / "slct-digits"))
    return {f"slct_digits_{steps}step": pipe(batch_size=4, num_inference_steps=steps, generator=gen(0),
                                             output_type="pt").images for steps in (1, 2)}


def video_digits() -> dict[str, torch.Tensor]:
    from gensample.data.moving_digits import make_reference_video
    from gensample.pipelines import MotionGuidedVideoPipeline
    from gensample.video.guidance import MotionGuidanceConfig

    pipe = _quiet(MotionGuidedVideoPipeline.from_pretrained(ASSETS / "video-digits"))
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    reference = make_reference_video(45, digit_index=0, split="heldout", num_frames=8, canvas=size).videos[0]
    plain = pipe(num_frames=8, num_inference_steps=4, num_videos_per_prompt=1, generator=[gen(0)],
                 output_type="pt").frames
    guided = pipe(num_frames=8, num_inference_steps=4, num_videos_per_prompt=1, generator=[gen(0)],
                  reference_video=reference, motion_guidance=MotionGuidanceConfig(weight=3.0),
                  init_noise="ddim_inversion", output_type="pt").frames
    return {"video_digits_plain": plain, "video_digits_guided": guided}


def _tiny_unet(seed: int):
    from gensample.models import build_unet

    torch.manual_seed(seed)
    return build_unet("tiny", sample_size=8).eval()


def edm_and_ctm_samplers() -> dict[str, torch.Tensor]:
    from gensample.models.ctm_unet import CTMUNet2DModel
    from gensample.pipelines import CTMPipeline, EDMPipeline
    from gensample.schedulers.scheduling_ctm import CTMScheduler
    from gensample.schedulers.scheduling_edm_heun import EDMHeunScheduler

    edm = _quiet(EDMPipeline(unet=_tiny_unet(0), scheduler=EDMHeunScheduler()))
    out = {"edm_heun_3step": edm(batch_size=2, num_inference_steps=3, generator=gen(0), output_type="pt").images}
    ctm_unet = CTMUNet2DModel.from_teacher(_tiny_unet(1)).eval()
    g = gen(101)
    with torch.no_grad():
        for p in ctm_unet.s_embedding.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    ctm = _quiet(CTMPipeline(unet=ctm_unet, scheduler=CTMScheduler()))
    for gamma in (0.0, 0.3, 1.0):
        out[f"ctm_gamma{gamma}_3step"] = ctm(batch_size=2, num_inference_steps=3, gamma=gamma, generator=gen(0),
                                             output_type="pt").images
    return out


def method_losses() -> dict[str, torch.Tensor]:
    from gensample.data import load_digits
    from gensample.methods.ctm import CTMTraining
    from gensample.methods.edm import EDMTraining
    from gensample.methods.ict import ImprovedConsistencyTraining
    from gensample.methods.lct import LatentConsistencyTraining
    from gensample.models.nsln import build_nsln_unet
    from gensample.pipelines import EDMPipeline
    from gensample.schedulers.scheduling_edm_heun import EDMHeunScheduler

    x0 = load_digits("train")[:8]
    if isinstance(x0, (tuple, list)):
        x0 = x0[0]
    x0 = torch.as_tensor(x0, dtype=torch.float32)
    out = {}

    def losses(method, name, steps=(0, 5)):
        for step in steps:
            torch.manual_seed(123 + step)
            result = method(x0, step)
            for key, value in sorted(result.items()):
                if torch.is_tensor(value) and value.numel() == 1:
                    out[f"{name}_step{step}_{key}"] = value.detach().reshape(1).double()

    losses(ImprovedConsistencyTraining(_tiny_unet(2), total_steps=20), "ict")
    losses(EDMTraining(_tiny_unet(3)), "edm")
    teacher = EDMPipeline(unet=_tiny_unet(4), scheduler=EDMHeunScheduler())
    losses(CTMTraining(teacher, num_sigmas=8, seed=0), "ctm")
    torch.manual_seed(5)
    lct_unet = build_nsln_unet("tiny", sample_size=8)
    losses(LatentConsistencyTraining(lct_unet, total_steps=40), "lct", steps=(0, 25))
    return out


CASES = [ict_digits, slct_digits, video_digits, edm_and_ctm_samplers, method_losses]


def run_all() -> dict[str, torch.Tensor]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # thread count can change reduction order
    try:
        out = {}
        for case in CASES:
            out.update({k: v.detach().cpu().contiguous() for k, v in case().items()})
        return out
    finally:
        torch.set_num_threads(threads)


def digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().numpy().tobytes()).hexdigest()[:16]


def environment() -> dict[str, str]:
    return {"torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability()}


if __name__ == "__main__":
    from safetensors.torch import save_file

    tensors = run_all()
    for key, value in sorted(tensors.items()):
        print(f"{key:36s} {tuple(value.shape)} sha256 {digest(value)}")
    if "--write" in sys.argv:
        GOLDEN_FILE.parent.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(GOLDEN_FILE), metadata=environment())
        print(f"wrote {GOLDEN_FILE}")
