"""diffusers UNet2DModel presets, from "tiny" (tests) to the iCT paper's CIFAR-10 size."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from diffusers import UNet2DModel

# Sizes are for 1-channel 16x16 digits unless noted; every preset takes sample_size/in_channels overrides.
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # ~0.16M parameters: unit and end-to-end tests.
    "tiny": dict(
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=8,
    ),
    # ~0.65M parameters: about the size of the EDM denoiser that gives clean 8x8 digits in minutes on a CPU.
    "digits-small": dict(
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        layers_per_block=1,
        norm_num_groups=16,
    ),
    # ~1.6M parameters: the embedded-digits default (trains on 2 CPU cores in tens of minutes).
    "digits": dict(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        layers_per_block=2,
        norm_num_groups=16,
        attention_head_dim=32,
    ),
    # ~56M parameters, 32x32 RGB: the scale of iCT's CIFAR-10 NCSN++ (iCT used NCSN++; this is the closest
    # UNet2DModel configuration: 128 base channels, multipliers 2,2,2, 4 blocks per resolution, attention at 16x16).
    "cifar10": dict(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(128, 256, 256, 256),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=4,
        norm_num_groups=32,
        dropout=0.3,
    ),
    # 64x64 RGB (ImageNet-64-like resolution), for benchmarks and larger image folders.
    "imagenet64": dict(
        sample_size=64,
        in_channels=3,
        out_channels=3,
        block_out_channels=(192, 384, 576, 768),
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        layers_per_block=3,
        norm_num_groups=32,
        attention_head_dim=64,
    ),
}


def load_unet_config(name_or_path: str) -> dict[str, Any]:
    """A preset name from :data:`UNET_PRESETS` or a path to a JSON file of UNet2DModel arguments."""
    if name_or_path in UNET_PRESETS:
        return dict(UNET_PRESETS[name_or_path])
    path = Path(name_or_path)
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text())
    raise ValueError(
        f"Unknown model preset {name_or_path!r}. Use one of {sorted(UNET_PRESETS)} or the path to a JSON file "
        "with UNet2DModel arguments (e.g. a unet/config.json written by save_pretrained)."
    )


def build_unet(name_or_path: str = "digits", sample_size: int | None = None, in_channels: int | None = None,
               **overrides: Any) -> UNet2DModel:
    """Build a randomly initialised UNet2DModel from a preset, with optional size/channel overrides."""
    config = load_unet_config(name_or_path)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    if sample_size is not None:
        config["sample_size"] = sample_size
    if in_channels is not None:
        config["in_channels"] = config["out_channels"] = in_channels
    config.setdefault("sample_size", 16)
    config.setdefault("in_channels", 1)
    config.setdefault("out_channels", config["in_channels"])
    config.update(overrides)
    return UNet2DModel(**config)
