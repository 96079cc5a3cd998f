"""The embedded digits set: sklearn's bundled 8x8 handwritten digits (1,797 images, values 0..16), shipped in
assets/digits.npz with a fixed train (1,500) / held-out (297) split drawn once with numpy seed 0."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..assets import asset_path

DIGITS_PATH = asset_path("digits.npz")


def load_digits(split: str = "train", resolution: int = 8, return_labels: bool = False):
    """Digits as a float tensor (N, 1, resolution, resolution) in [-1, 1] (and int64 labels if asked).

    ``split``: "train", "heldout" or "all". Resolutions other than 8 use bilinear resizing (antialiased when
    shrinking).
    """
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}.")
    with np.load(DIGITS_PATH, allow_pickle=False) as data:
        images, labels = data["images"], data["labels"]
        if split != "all":
            index = data["train_index" if split == "train" else "heldout_index"].astype(np.int64)
            images, labels = images[index], labels[index]
    x = torch.from_numpy(images.astype(np.float32) / 16.0 * 2.0 - 1.0).unsqueeze(1)
    if resolution != 8:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False,
                          antialias=resolution < 8).clamp(-1, 1)
    if return_labels:
        return x, torch.from_numpy(labels.astype(np.int64))
    return x
