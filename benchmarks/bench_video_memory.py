"""Activation memory of motion-consistency guidance per frame count (issue #6).

For one guided step of MotionGuidedVideoPipeline, report the bytes autograd saved for the backward pass
(``out.guidance_saved_bytes``; device independent) and the wall time of a 2-step run with both steps guided, for:
  * all temporal-attention layers (the paper's choice), plain;
  * all layers with gradient checkpointing;
  * the down and mid blocks only, with the forward pass stopped after the last hooked layer (truncation);
  * the unguided run (no reference) for the time baseline.
On CUDA it also reports torch.cuda.max_memory_allocated for each run.

    python benchmarks/bench_video_memory.py --frames 8 16 24 --size 32 --channels 32 64
"""
from __future__ import annotations

import argparse
import time

import torch
from diffusers import DDIMScheduler

from gensample.pipelines.pipeline_motion_guided_video import MotionGuidedVideoPipeline
from gensample.video.guidance import MotionGuidanceConfig
from gensample.video.tiny_model import tiny_video_unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, nargs="+", default=[8, 16, 24])
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--in-channels", type=int, default=1)
    parser.add_argument("--channels", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    unet = tiny_video_unet(args.size, args.in_channels, block_out_channels=tuple(args.channels),
                           motion_max_seq_length=max(args.frames)).eval().to(device)
    pipe = MotionGuidedVideoPipeline(unet=unet, scheduler=DDIMScheduler(beta_schedule="squaredcos_cap_v2",
                                                                       clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    params = sum(p.numel() for p in unet.parameters())
    print(f"device {device}, UNetMotionModel {params / 1e6:.2f}M parameters, {args.in_channels}x{args.size}x"
          f"{args.size} frames, threads {torch.get_num_threads()}")
    settings = {
        "all layers": MotionGuidanceConfig(weight=1.0, guidance_fraction=1.0),
        "all layers + checkpointing": MotionGuidanceConfig(weight=1.0, guidance_fraction=1.0,
                                                           gradient_checkpointing=True),
        "down+mid, truncated": MotionGuidanceConfig(weight=1.0, guidance_fraction=1.0,
                                                    layers=["down_blocks.*", "mid_block.*"]),
        "unguided": None,
    }
    print("| frames | setting | saved for backward (MiB) | MiB per frame | 2-step time (s) | CUDA peak (MiB) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for frames in args.frames:
        reference = torch.rand(frames, args.in_channels, args.size, args.size) * 2 - 1
        for name, config in settings.items():
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            kwargs = {} if config is None else {"reference_video": reference, "motion_guidance": config,
                                                "init_noise": "random"}
            t0 = time.perf_counter()
            out = pipe(num_frames=frames, num_inference_steps=2, output_type="latent",
                       generator=torch.Generator().manual_seed(0), **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            mib = out.guidance_saved_bytes / 2**20
            peak = f"{torch.cuda.max_memory_allocated() / 2**20:.0f}" if device == "cuda" else "-"
            print(f"| {frames} | {name} | {mib:.1f} | {mib / frames:.2f} | {seconds:.2f} | {peak} |", flush=True)


if __name__ == "__main__":
    main()
