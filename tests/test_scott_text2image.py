"""SCott with a diffusers text-to-image teacher (gensample.methods.scott_text2image): the guided VP teacher against
direct UNet calls and DDIMScheduler, the LCM student against LCMScheduler.step, the round trip through the Trainer into
diffusers' own LatentConsistencyModelPipeline, and bad input. Tiny random SD-like components (tests/sd_components.py);
nothing is downloaded."""
from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers", reason="the text-to-image teacher needs transformers (CLIP)")

import sd_components as sd

from gensample.core.sigmas import vp_sigma_from_alpha_bar
from gensample.methods.scott_text2image import (
    LCMStudent,
    TextCFGTeacher,
    TextToImageSCott,
    build_text2image_scott,
    lcm_scheduler_for,
    lcm_timesteps,
    load_text2image_teacher,
    student_unet_from_teacher,
)
from gensample.methods.teachers import as_denoiser

CAPTIONS = ["a red square", "a blue dot", "a red square", "green", "a blue dot", "green"]


def _states(batch: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, sd.MAX_TOKENS, sd.TEXT_DIM, generator=g)


def _sigma(scheduler, t: torch.Tensor) -> torch.Tensor:
    """sigma(t) = sqrt((1 - a_t) / a_t) in float64, from the scheduler's alpha_bar."""
    return vp_sigma_from_alpha_bar(scheduler.alphas_cumprod.double()[t])


# -- the teacher ------------------------------------------------------------------------------------------------------
def test_cfg_teacher_is_uncond_plus_w_times_difference_of_two_unet_calls():
    unet, scheduler = sd.tiny_unet(0), sd.sd_scheduler("epsilon")
    cond, uncond = _states(3, 1), _states(1, 2)
    teacher = TextCFGTeacher(as_denoiser(unet, scheduler=scheduler), uncond)
    t = torch.tensor([999, 499, 19])
    sigma = _sigma(scheduler, t)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * sigma.float().view(-1, 1, 1, 1)
    w = torch.tensor([1.0, 2.5, 7.0])
    with torch.no_grad():
        got = teacher(x, sigma, w, encoder_hidden_states=cond)
        x_vp = x * (1 / (1 + sigma**2)).sqrt().float().view(-1, 1, 1, 1)
        eps_c = unet(x_vp, t, encoder_hidden_states=cond).sample.double()
        eps_u = unet(x_vp, t, encoder_hidden_states=uncond.expand(3, -1, -1)).sample.double()
    s = sigma.view(-1, 1, 1, 1)
    d_c, d_u = x.double() - s * eps_c, x.double() - s * eps_u           # D = x - sigma eps, per branch
    want = d_u + w.double().view(-1, 1, 1, 1) * (d_c - d_u)
    assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-5)
    # w = 1 everywhere: the conditional model alone (one pass), not the guided formula with a stale branch
    with torch.no_grad():
        plain = teacher(x, sigma, 1.0, encoder_hidden_states=cond)
    assert torch.allclose(plain.double(), d_c, atol=2e-5, rtol=1e-5)
    assert not torch.allclose(plain.double(), want, atol=1e-3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_teacher_denoiser_equals_ddim_pred_original_sample(prediction_type):
    from diffusers import DDIMScheduler

    unet = sd.tiny_unet(1)
    ddim = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         prediction_type=prediction_type, clip_sample=False, timestep_spacing="trailing")
    ddim.set_timesteps(50)
    assert ddim.timesteps[0] == 999 and ddim.timesteps[-1] == 19   # the LCM grid (trailing spacing)
    teacher = TextCFGTeacher(as_denoiser(unet, scheduler=ddim), _states(1, 5))
    cond, w = _states(2, 4), torch.tensor([1.0, 4.0])
    for t in (int(ddim.timesteps[0]), int(ddim.timesteps[25]), int(ddim.timesteps[-1])):
        x_vp = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(t))
        a = ddim.alphas_cumprod[t]
        with torch.no_grad():
            out_c = unet(x_vp, t, encoder_hidden_states=cond).sample
            out_u = unet(x_vp, t, encoder_hidden_states=teacher.uncond_embeds.expand(2, -1, -1)).sample
            guided = out_u + w.view(-1, 1, 1, 1) * (out_c - out_u)
            want = torch.stack([ddim.step(guided[i:i + 1], t, x_vp[i:i + 1]).pred_original_sample[0]
                                for i in range(2)])
            sigma = vp_sigma_from_alpha_bar(a.double()).expand(2)
            got = teacher(x_vp / a.sqrt(), sigma, w, encoder_hidden_states=cond)
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), (t, (got - want).abs().max())


# -- the student --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_lcm_student_equals_lcm_scheduler_step_denoised(prediction_type):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    unet = sd.tiny_unet(2, time_cond_proj_dim=8)           # random cond_proj: the guidance embedding matters
    lcm = LCMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                       prediction_type=prediction_type)
    student = LCMStudent(unet, lcm.alphas_cumprod, prediction_type)
    t = torch.tensor([999, 499, 19, 0])
    w = torch.tensor([8.5, 2.0, 1.0, 3.0])
    cond = _states(4, 6)
    x_ve = torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    x_vp = lcm.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1) * x_ve
    with torch.no_grad():
        # the network output, with diffusers' own guidance embedding of w - 1 (the LCM pipeline's)
        emb = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w - 1, embedding_dim=8)
        model_output = unet(x_vp, t, timestep_cond=emb, encoder_hidden_states=cond).sample
        got_vp = student.consistency_vp(x_vp, t, w, encoder_hidden_states=cond)
        got_ve = student(x_ve, _sigma(lcm, t), w, encoder_hidden_states=cond)
    for i, ti in enumerate(t.tolist()):
        ref = LCMScheduler.from_config(lcm.config)
        ref.set_timesteps(timesteps=[ti])
        want = ref.step(model_output[i:i + 1], ref.timesteps[0], x_vp[i:i + 1]).denoised[0]
        assert torch.equal(got_vp[i], want), (ti, (got_vp[i] - want).abs().max())
        assert torch.equal(got_ve[i], want), ti
    assert torch.equal(got_vp[3], x_vp[3])                   # t = 0: c_skip = 1, c_out = 0 (LCM's boundary)
    # the w input reaches the output
    with torch.no_grad():
        other = student.consistency_vp(x_vp, t, w + 1, encoder_hidden_states=cond)
    assert not torch.allclose(other[:3], got_vp[:3])


def test_lcm_grid_and_scheduler_sample_on_it():
    grid = lcm_timesteps(1000, 50)
    assert grid[:3].tolist() == [0, 19, 39] and grid[-1] == 999 and len(grid) == 51
    lcm = lcm_scheduler_for(sd.sd_scheduler(), 50)
    for n, want in ((1, [999]), (2, [999, 499]), (4, [999, 759, 499, 259])):
        lcm.set_timesteps(n)
        assert lcm.timesteps.tolist() == want and set(want) <= set(grid.tolist())


# -- round trip: Trainer -> LatentConsistencyModelPipeline.from_pretrained ------------------------------------------
def _args(tmp_path, teacher_dir, data_dir, *extra: str):
    from gensample.cli import build_parser

    return build_parser().parse_args(
        ["train", "scott", "--teacher", str(teacher_dir), "--data", str(data_dir), "--output", str(tmp_path / "run"),
         "--max-steps", "3", "--batch-size", "4", "--checkpoint-every", "0", "--num-sample-images", "3",
         "--sample-steps", "1", "2", "--time-cond-proj-dim", "8", "--substeps", "2", "--guidance-range", "2", "4",
         "--guidance-scale", "3", "--lr", "1e-2", "--no-progress", "--seed", "0", *extra])


def _trainer_class():
    """The Trainer with the method's text-to-image sample grid (the LCM pipeline takes prompts, not batch_size)."""
    from gensample.images import save_image_grid
    from gensample.training.trainer import Trainer

    class Text2ImageTrainer(Trainer):
        def save_samples(self, path):
            pipe = self.export_pipeline()
            pipe.set_progress_bar_config(disable=True)
            method = self.accelerator.unwrap_model(self.model)
            rows = [method.sample_images(pipe, self.config.num_sample_images, n,
                                         torch.Generator().manual_seed(self.config.seed))
                    for n in self.config.sample_steps]
            return save_image_grid(torch.cat(rows), path, nrow=self.config.num_sample_images)

    return Text2ImageTrainer


def test_round_trip_trainer_to_diffusers_lcm_pipeline_bit_for_bit(tmp_path):
    from diffusers import LatentConsistencyModelPipeline, LCMScheduler

    from gensample.cli._common import train_config

    teacher_dir = sd.save_tiny_sd_pipeline(tmp_path, "epsilon")
    data_dir = sd.write_captioned_folder(tmp_path / "data", CAPTIONS)
    args = _args(tmp_path, teacher_dir, data_dir, "--adv-weight", "0.4", "--discriminator", "teacher-full")
    torch.manual_seed(0)
    method, latents, labels = build_text2image_scott(args, teacher_dir)
    assert isinstance(method, TextToImageSCott) and latents.shape == (6, 4, 8, 8)
    assert labels.tolist() == [0, 1, 0, 2, 1, 2] and method.prompt_embeds.shape == (3, sd.MAX_TOKENS, sd.TEXT_DIM)
    assert list(method.trainable_groups()) == ["generator", "discriminator"]
    initial = {k: v.clone() for k, v in method.student.unet.state_dict().items()}
    trainer = _trainer_class()(method, latents, train_config(args, {"data": str(data_dir)}, sample_steps=(1, 2)),
                               labels=labels)
    summary = trainer.train()
    assert summary["steps"] == 3 and (tmp_path / "run" / "samples.png").is_file()

    folder = tmp_path / "run" / "pipeline"
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "LatentConsistencyModelPipeline" and index["safety_checker"] == [None, None]
    pipe = LatentConsistencyModelPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    assert isinstance(pipe.scheduler, LCMScheduler) and pipe.scheduler.config.original_inference_steps == 50
    exported = pipe.unet.state_dict()
    ema = trainer.emas["unet"].model.state_dict()
    assert all(torch.equal(exported[k], ema[k]) for k in ema)                  # the EMA weights were saved
    assert not torch.equal(exported["time_embedding.cond_proj.weight"], initial["time_embedding.cond_proj.weight"])
    # the pipeline's prompt encoding is the one the method trained on
    prompt_embeds, _ = pipe.encode_prompt(["a blue dot"], "cpu", 1, False)
    assert torch.allclose(prompt_embeds, method.prompt_embeds[1:2], atol=1e-6)

    # 1 step: diffusers' latents equal the student's output bit for bit (same seed)
    student = LCMStudent(pipe.unet, pipe.scheduler.alphas_cumprod, "epsilon")
    embeds = method.prompt_embeds[[0, 1, 2]]
    with torch.no_grad():
        got = pipe(prompt_embeds=embeds, num_inference_steps=1, guidance_scale=3.0, output_type="latent",
                   generator=torch.Generator().manual_seed(11)).images
        noise = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(11))
        want = student.consistency_vp(noise, torch.tensor(999), 3.0, encoder_hidden_states=embeds)
    assert torch.equal(got, want)
    # ... and from a VE input x at sigma(999): the pipeline started at x_vp = sqrt(alpha_bar) x
    t = torch.tensor(999)
    x_ve = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(12)) * 14.6
    with torch.no_grad():
        mine = student(x_ve, _sigma(pipe.scheduler, t), 3.0, encoder_hidden_states=embeds)
        theirs = pipe(prompt_embeds=embeds, num_inference_steps=1, guidance_scale=3.0, output_type="latent",
                      latents=pipe.scheduler.alphas_cumprod[t].sqrt() * x_ve).images
    assert torch.equal(mine, theirs)
    # 2 and 4 steps sample (LCM multistep), decode through the VAE, and differ from 1 step
    images = {n: pipe("a red square", num_inference_steps=n, guidance_scale=3.0, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).images for n in (1, 2, 4)}
    assert all(v.shape == (1, 3, 16, 16) and torch.isfinite(v).all() for v in images.values())
    assert not torch.equal(images[1], images[4]) and not torch.equal(images[2], images[4])


# -- bad input -----------------------------------------------------------------------------------------------------------
def test_teacher_folder_that_is_not_a_text_to_image_pipeline(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a diffusion pipeline folder.*model_index.json"):
        load_text2image_teacher(tmp_path / "empty")
    (tmp_path / "ddpm").mkdir()
    (tmp_path / "ddpm" / "model_index.json").write_text(json.dumps(
        {"_class_name": "DDPMPipeline", "unet": ["diffusers", "UNet2DModel"], "scheduler": ["diffusers",
                                                                                          "DDPMScheduler"]}))
    with pytest.raises(ValueError, match=r"without \['vae', 'text_encoder', 'tokenizer'\]"):
        load_text2image_teacher(tmp_path / "ddpm")


def _parts(tmp_path):
    """Teacher pieces for building TextToImageSCott by hand."""
    pipe = sd.tiny_sd_pipeline(tmp_path)
    lcm = lcm_scheduler_for(pipe.scheduler, 50)
    denoiser = as_denoiser(pipe.unet, scheduler=pipe.scheduler)
    common = dict(prompt_embeds=_states(2), vae=pipe.vae, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer,
                  scheduler=lcm)
    return pipe, lcm, denoiser, common


def test_guidance_scale_on_a_teacher_without_unconditional_embedding(tmp_path):
    pipe, lcm, denoiser, common = _parts(tmp_path)
    student = LCMStudent(student_unet_from_teacher(pipe.unet, 8), lcm.alphas_cumprod)
    teacher = TextCFGTeacher(denoiser, uncond_embeds=None)
    with pytest.raises(ValueError, match="no unconditional embedding.*--guidance-range 1 1"):
        TextToImageSCott(student, teacher, guidance_range=(2.0, 4.0), **common)
    x = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="no unconditional embedding"):
        teacher(x, 1.0, 3.0, encoder_hidden_states=_states(1))
    TextToImageSCott(student, teacher, guidance_range=(1.0, 1.0), **common)    # w = 1 needs no unconditional branch


def test_student_teacher_latent_shape_mismatch(tmp_path):
    from diffusers import UNet2DConditionModel

    pipe, lcm, denoiser, common = _parts(tmp_path)
    config = {k: v for k, v in dict(pipe.unet.config).items() if not k.startswith("_")}
    wrong = UNet2DConditionModel(**{**config, "in_channels": 3, "out_channels": 3, "time_cond_proj_dim": 8})
    with pytest.raises(ValueError, match="does not match the teacher's.*student_unet_from_teacher"):
        TextToImageSCott(LCMStudent(wrong, lcm.alphas_cumprod), TextCFGTeacher(denoiser, _states(1)), **common)
    student = LCMStudent(student_unet_from_teacher(pipe.unet, 8), lcm.alphas_cumprod)
    method = TextToImageSCott(student, TextCFGTeacher(denoiser, _states(1)), **common)
    with pytest.raises(ValueError, match="latents have 3 channels.*teacher's VAE"):
        method((torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.int64)), 0)
    with pytest.raises(ValueError, match="not a level of the student's discrete schedule"):
        student(torch.zeros(1, 4, 8, 8), 1.2345, 2.0, encoder_hidden_states=_states(1))
    assert math.isclose(float(method.sigmas[0]), float(_sigma(lcm, torch.tensor(0))), rel_tol=0)
