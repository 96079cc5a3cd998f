"""Latent cache: encode an image dataset once with any diffusers ``AutoencoderKL`` and train in its latent space
(sLCT, Dao et al. ICLR 2025; research code quandao10/LCT ``prepocess_data.py`` + ``extract_stat.py``).

Layout of a cache folder::

    manifest.json                 settings + fingerprints of the VAE weights and of the images (resume guard)
    shard-00000.safetensors ...   {"latents": (n, C, h, w) float32}: SCALED latents (z - shift) * scaling_factor,
                                  z = vae.encode(x).latent_dist.sample() (or .mode()), as the research code stores them
    stats.safetensors             {"mean", "std"}: per-element [C, h, w] statistics of the raw latents z over the whole
                                  dataset (torch.std_mean(z, dim=0): unbiased std), + scaling/shift/target_std metadata

Encoding is resumable: each shard is written atomically (temporary file + rename), and a rerun with the same VAE,
images and settings skips every finished shard. Posterior samples are drawn from a CPU generator seeded from
(seed, shard index), so a resumed cache equals an uninterrupted one. :func:`load_latent_cache` returns the
normalised latents ``(z - mean) / std * 0.5`` (per-element [C, h, w] statistics, as ``extract_stat.py`` computes
them with ``torch.std_mean(z, dim=0)``; not per-channel ones) and :func:`load_latent_normalizer` the
:class:`~gensample.models.latent_normalizer.LatentNormalizer` that inverts them for decoding.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..models.latent_normalizer import LatentNormalizer

__all__ = ["LatentCacheResult", "encode_images", "build_latent_cache", "load_latent_cache", "load_latent_normalizer",
           "vae_fingerprint", "vae_scaling", "MANIFEST", "STATS"]

MANIFEST = "manifest.json"
STATS = "stats.safetensors"
CACHE_FORMAT = 1
TARGET_STD = 0.5  # sLCT: normalised latents have std sigma_data = 0.5
STD_FLOOR = 1e-6  # a latent element that never varies would otherwise divide by zero


@dataclass
class LatentCacheResult:
    """What :func:`build_latent_cache` did: shard indices encoded now and skipped as already finished."""

    path: Path
    num_images: int
    num_shards: int
    latent_shape: tuple[int, int, int]
    encoded_shards: list[int] = field(default_factory=list)
    skipped_shards: list[int] = field(default_factory=list)


def vae_scaling(vae) -> tuple[float, float | None]:
    """(scaling_factor, shift_factor) of a diffusers VAE config (scaling 1.0 / shift None when absent)."""
    sf = getattr(vae.config, "scaling_factor", None)
    shift = getattr(vae.config, "shift_factor", None)
    sf = 1.0 if sf is None else float(sf)
    if not sf > 0:
        raise ValueError(f"the VAE's scaling_factor must be > 0, got {sf}.")
    return sf, None if shift is None else float(shift)


def _hash_tensor(h, t: torch.Tensor, chunk: int = 1 << 22) -> None:
    t = t.detach().to("cpu").contiguous()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    flat = t.reshape(-1)
    if t.dtype == torch.bfloat16:
        flat = flat.view(torch.int16)
    for start in range(0, flat.numel(), chunk):
        h.update(flat[start:start + chunk].numpy().tobytes())


def vae_fingerprint(vae) -> str:
    """sha256 of the VAE's weights (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(vae.state_dict().items()):
        h.update(name.encode())
        _hash_tensor(h, t)
    return h.hexdigest()


def _data_fingerprint(images: torch.Tensor) -> str:
    h = hashlib.sha256()
    _hash_tensor(h, images)
    return h.hexdigest()


def _check_images(vae, images: torch.Tensor) -> None:
    if images.ndim != 4:
        raise ValueError(f"images must be a (N, C, H, W) tensor, got shape {tuple(images.shape)}.")
    if images.shape[1] != vae.config.in_channels:
        raise ValueError(f"the VAE takes {vae.config.in_channels}-channel images, got {images.shape[1]} channels.")
    if len(images) == 0:
        raise ValueError("no images to encode.")
    lo, hi = float(images.min()), float(images.max())
    if lo < -1.001 or hi > 1.001:
        raise ValueError(f"images must be scaled to [-1, 1] (diffusers VAE convention), got values in [{lo}, {hi}].")


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 64, sample: bool = True,
                  generator: torch.Generator | None = None, device: torch.device | str | None = None,
                  progress: bool = False) -> torch.Tensor:
    """Scaled latents ``(z - shift) * scaling_factor`` of ``images`` in [-1, 1] (float32, CPU).

    ``sample=True``: z = ``latent_dist.sample(generator)`` (the research code's choice); False: the posterior mode.
    """
    _check_images(vae, images)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    sf, shift = vae_scaling(vae)
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    dtype = next(vae.parameters()).dtype
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc="encoding", disable=not progress, leave=False):
        x = images[start:start + batch_size].to(device=device, dtype=dtype)
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator=generator) if sample else dist.mode()
        z = z.float()
        if shift is not None:
            z = z - shift
        out.append((z * sf).cpu())
    return torch.cat(out)


def _shard_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"shard-{index:05d}.safetensors"


def _shard_ok(path: Path, expected: tuple[int, ...]) -> bool:
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys()) == ["latents"] and tuple(f.get_slice("latents").get_shape()) == expected
    except Exception:
        return False


def _shard_generator(seed: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)


def _latent_shape(vae, images: torch.Tensor) -> tuple[int, int, int]:
    probe = encode_images(vae, images[:1], sample=False)
    return tuple(probe.shape[1:])


def build_latent_cache(vae, images: torch.Tensor, cache_dir: str | Path, shard_size: int = 1024,
                       batch_size: int = 64, sample: bool = True, seed: int = 0,
                       device: torch.device | str | None = None, progress: bool = True) -> LatentCacheResult:
    """Encode ``images`` (N, C, H, W) in [-1, 1] into ``cache_dir`` (see the module docstring); resumable.

    Raises ValueError if ``cache_dir`` holds a cache of another VAE, dataset or settings (use a new folder).
    Finally (re)computes ``stats.safetensors`` from all shards (float64, Chan's parallel mean/variance merge).
    """
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1, got {shard_size}.")
    _check_images(vae, images)
    vae.eval()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    sf, shift = vae_scaling(vae)
    latent_shape = _latent_shape(vae, images)
    num_shards = (len(images) + shard_size - 1) // shard_size
    manifest = {
        "format": CACHE_FORMAT, "num_images": len(images), "shard_size": shard_size, "num_shards": num_shards,
        "latent_shape": list(latent_shape), "scaling_factor": sf, "shift_factor": shift, "sample": bool(sample),
        "seed": int(seed), "vae_fingerprint": vae_fingerprint(vae), "data_fingerprint": _data_fingerprint(images),
    }
    manifest_path = cache_dir / MANIFEST
    if manifest_path.is_file():
        old = json.loads(manifest_path.read_text())
        if old != manifest:
            diff = sorted(k for k in set(old) | set(manifest) if old.get(k) != manifest.get(k))
            raise ValueError(f"{cache_dir} holds a latent cache built with other settings, VAE or images (differs in "
                             f"{diff}); use another cache folder or delete this one.")
    else:
        tmp = manifest_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, manifest_path)

    result = LatentCacheResult(cache_dir, len(images), num_shards, latent_shape)
    bar = tqdm(range(num_shards), desc="latent cache", disable=not progress)
    for i in bar:
        chunk = images[i * shard_size:(i + 1) * shard_size]
        path = _shard_path(cache_dir, i)
        if _shard_ok(path, (len(chunk), *latent_shape)):
            result.skipped_shards.append(i)
            continue
        latents = encode_images(vae, chunk, batch_size=batch_size, sample=sample,
                                generator=_shard_generator(seed, i), device=device)
        tmp = path.with_name(path.name + ".tmp")
        save_file({"latents": latents.contiguous()}, str(tmp))
        os.replace(tmp, path)
        result.encoded_shards.append(i)
        bar.set_postfix(encoded=len(result.encoded_shards), skipped=len(result.skipped_shards))
    bar.close()
    _write_statistics(cache_dir, manifest)
    return result


def _read_manifest(cache_dir: Path) -> dict:
    path = cache_dir / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{cache_dir} is not a latent cache (no {MANIFEST}); build it with "
                                "build_latent_cache.")
    return json.loads(path.read_text())


def _iter_raw_shards(cache_dir: Path, manifest: dict):
    """Raw latents z of each shard (float32), after checking that every shard is present and complete."""
    shape = tuple(manifest["latent_shape"])
    n, size = manifest["num_images"], manifest["shard_size"]
    sf, shift = manifest["scaling_factor"], manifest["shift_factor"]
    for i in range(manifest["num_shards"]):
        path = _shard_path(cache_dir, i)
        expected = (min(size, n - i * size), *shape)
        if not _shard_ok(path, expected):
            raise ValueError(f"latent cache {cache_dir} is incomplete or corrupt at shard {i} (expected {expected}); "
                             "rerun build_latent_cache with the same VAE and images to finish it.")
        z = load_file(str(path))["latents"] / sf
        yield z if shift is None else z + shift


def _write_statistics(cache_dir: Path, manifest: dict) -> None:
    count, mean, m2 = 0, None, None
    for z in _iter_raw_shards(cache_dir, manifest):
        z = z.double()
        nb, mb = len(z), z.mean(0)
        m2b = (z - mb).square().sum(0)
        if mean is None:
            count, mean, m2 = nb, mb, m2b
            continue
        delta = mb - mean
        total = count + nb
        mean = mean + delta * (nb / total)
        m2 = m2 + m2b + delta.square() * (count * nb / total)
        count = total
    if count < 2:
        raise ValueError("latent statistics need at least 2 images (the per-element std is unbiased).")
    std = (m2 / (count - 1)).sqrt().clamp_min(STD_FLOOR)
    metadata = {"scaling_factor": repr(manifest["scaling_factor"]), "shift_factor": repr(manifest["shift_factor"]),
                "target_std": repr(TARGET_STD), "num_images": str(count)}
    tmp = cache_dir / (STATS + ".tmp")
    save_file({"mean": mean.float().contiguous(), "std": std.float().contiguous()}, str(tmp), metadata=metadata)
    os.replace(tmp, cache_dir / STATS)


def load_latent_normalizer(cache_dir: str | Path) -> LatentNormalizer:
    """The :class:`LatentNormalizer` of a finished cache (statistics + the VAE's scaling/shift factors)."""
    cache_dir = Path(cache_dir)
    _read_manifest(cache_dir)
    path = cache_dir / STATS
    if not path.is_file():
        raise ValueError(f"latent cache {cache_dir} has no {STATS} yet; rerun build_latent_cache to finish it.")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        mean, std = f.get_tensor("mean"), f.get_tensor("std")
    shift = meta.get("shift_factor", "None")
    return LatentNormalizer.from_statistics(
        mean, std, scaling_factor=float(meta.get("scaling_factor", "1.0")),
        shift_factor=None if shift == "None" else float(shift), target_std=float(meta.get("target_std", "0.5")))


def load_latent_cache(cache_dir: str | Path, normalize: bool = True) -> torch.Tensor:
    """All latents of a finished cache, (N, C, h, w) float32: normalised ``(z - mean) / std * 0.5`` (default), or the
    raw VAE latents z with ``normalize=False``."""
    cache_dir = Path(cache_dir)
    manifest = _read_manifest(cache_dir)
    z = torch.cat(list(_iter_raw_shards(cache_dir, manifest)))
    if not normalize:
        return z
    return load_latent_normalizer(cache_dir).normalize(z)
