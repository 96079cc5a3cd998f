"""Helpers of the feature-extractor contract shared by every metrics network (digits CNN, FID Inception-v3,
LPIPS) and by ``metrics.fid``: 8-bit quantisation of the input images and the hash that identifies the weights.

* :func:`to_uint8`: extractors see the 8-bit image only (as for PNGs on disk): float input in [0, 1] becomes
  ``round(255 x)``;
* :func:`state_dict_sha256`: the ``weights_sha256`` attribute recorded in statistics files and checked before
  comparing against them, independent of the file format the weights were stored in.

Depends on torch only, so ``features`` and ``inception`` both import it without importing each other.
"""
from __future__ import annotations

import hashlib

import torch
from torch import nn


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 images as they are; float images in [0, 1] -> ``round(255 x)`` as uint8 (range checked by callers)."""
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise TypeError(f"images must be uint8 or float in [0, 1], got dtype {images.dtype}.")
    return (images * 255).round().clamp(0, 255).to(torch.uint8)


def state_dict_sha256(module: nn.Module) -> str:
    """sha256 over (name, dtype, shape, bytes) of every state-dict entry in key order: identifies the weights
    independently of the file format they were stored in."""
    h = hashlib.sha256()
    for key, value in module.state_dict().items():
        t = value.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()
