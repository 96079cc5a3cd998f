r"""FID / KID evaluation: statistics files, the Fréchet distance, and the ``fid(...)`` entry point.

FID (Heusel et al. 2017) between Gaussians fitted to features of real (r) and generated (g) images:

    FID = ||mu_r - mu_g||^2 + Tr(Sigma_r + Sigma_g - 2 (Sigma_r Sigma_g)^{1/2})

with mu the feature mean and Sigma the unbiased (N - 1) covariance. KID (Bińkowski et al. 2018) is the unbiased
MMD^2 with the cubic polynomial kernel k(x, y) = (x.y / d + 1)^3, averaged over random subsets (torchmetrics).

Protocol (printed with every result, see :class:`FIDResult`):

* images are quantised to uint8 by rounding, ``round(255 x)`` for x in [0, 1], before feature extraction (what
  PNGs on disk hold); float input outside [0, 1] is an error;
* features: ``"digits"`` = the 64-d penultimate layer of the shipped digits CNN (FID-digits), or ``"inception"`` =
  FID Inception-v3 pool3 (2048-d, pytorch-fid weights, bilinear resize to 299);
* reference ``"digits"`` = the TRAIN split (1,500 images) of the embedded digits; ``"digits:heldout"`` the
  297 held-out images; ``"digits@32"`` (or ``"digits:heldout@32"``) the same rendered at 32 px as the 32-px
  training data is, for models that generate at that size (latent models on digits upscaled for a VAE);
* generated image ``i`` uses its own generator seeded with ``seed + i`` (EDM-style per-sample seeds), so results
  do not depend on the batch size or the number of processes;
* the FID value is torchmetrics' ``FrechetInceptionDistance`` (float64 states) fed with our features; it is
  cross-checked against :func:`frechet_distance` (scipy ``sqrtm``) and both are reported;
* statistics files are ``.npz`` with ``mu``, ``sigma`` (float64; the keys pytorch-fid, EDM and clean-fid read) and
  metadata, written byte-for-byte deterministically so their sha256 identifies the reference.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import math
import warnings
import zipfile
from zlib import error as zlib_error
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.linalg
import torch
from torch import nn
from tqdm.auto import tqdm

from ._extractor_contract import to_uint8
from .features import get_feature_extractor

STATS_FORMAT_VERSION = 1
DEFAULT_KID_FEATURES = 5000  # real features kept in a stats file for KID (all of them for the digits set)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------------------------
# Fréchet distance and statistics


def feature_statistics(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mu, Sigma) in float64: mu = mean_i f_i, Sigma = sum_i (f_i - mu)(f_i - mu)^T / (N - 1)."""
    f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    f = f.astype(np.float64, copy=False)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features (N >= 2, D), got shape {f.shape}.")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
                     eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr((sigma1 sigma2)^{1/2}) in float64 (scipy ``sqrtm``).

    As pytorch-fid: if the product is singular enough that ``sqrtm`` fails, ``eps * I`` is added to both
    covariances; a small imaginary part from round-off is dropped.
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(f"statistics have different dimensions: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {sigma1.shape} vs {sigma2.shape}; compute both with the same feature extractor.")
    diff = mu1 - mu2
    covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has a large imaginary component ({np.abs(covmean.imag).max():.3g}).")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


@dataclass(eq=False)
class FeatureStats:
    """Gaussian statistics of a feature set (+ up to ``DEFAULT_KID_FEATURES`` raw features for KID)."""

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int
    extractor: str
    extractor_sha256: str = ""
    source: str = ""
    features: np.ndarray | None = None
    path: Path | None = field(default=None, compare=False)

    @property
    def dims(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray, extractor: nn.Module | str, source: str = "",
                      keep_features: int = DEFAULT_KID_FEATURES) -> FeatureStats:
        f = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        mu, sigma = feature_statistics(f)
        name = extractor if isinstance(extractor, str) else extractor.name
        sha = "" if isinstance(extractor, str) else getattr(extractor, "weights_sha256", "")
        kept = f[:keep_features].astype(np.float32) if keep_features > 0 else None
        return cls(mu, sigma, int(f.shape[0]), name, sha, source, kept)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {
            "mu": self.mu.astype(np.float64), "sigma": self.sigma.astype(np.float64),
            "num_images": np.array(self.num_images, np.int64), "dims": np.array(self.dims, np.int64),
            "extractor": np.array(self.extractor), "extractor_sha256": np.array(self.extractor_sha256),
            "source": np.array(self.source), "format_version": np.array(STATS_FORMAT_VERSION, np.int64),
        }
        if self.features is not None:
            out["features"] = self.features.astype(np.float32)
        return out

    def to_bytes(self) -> bytes:
        return npz_bytes(self.arrays())

    def sha256(self) -> str:
        """sha256 of the exact bytes :meth:`save` writes (so a printed hash identifies a stats file)."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | Path) -> str:
        """Write the ``.npz`` (deterministic bytes); returns its sha256."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        data = self.to_bytes()
        path.write_bytes(data)
        self.path = path
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        """Read a stats ``.npz`` (``np.load(allow_pickle=False)``); files with only ``mu``/``sigma`` (pytorch-fid,
        EDM) are accepted, their extractor recorded as "unknown"."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such statistics file (make one with `gensample fid-stats`).")
        remake = "make a new one with `gensample fid-stats` or pytorch-fid's --save-stats"
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, EOFError, ValueError, zipfile.BadZipFile) as e:  # not a zip / truncated / object arrays
            raise ValueError(f"{path} is not a readable statistics .npz ({type(e).__name__}: {e}); the file is "
                             f"corrupt or of another format: {remake}.") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise ValueError(f"{path} holds a single array, not a statistics .npz with arrays 'mu' and 'sigma'; "
                             f"{remake}.")
        try:
            with data:
                if "mu" not in data or "sigma" not in data:
                    raise ValueError(f"{path} is not a statistics file: it needs arrays 'mu' and 'sigma' "
                                     f"(found {sorted(data.files)}).")
                known = ("mu", "sigma", "num_images", "extractor", "extractor_sha256", "source", "features")
                arrays = {k: data[k] for k in known if k in data.files}
                bad = sorted(k for k, v in arrays.items() if not isinstance(v, np.ndarray))
                if bad:  # a member that is not an .npy array comes back as raw bytes
                    raise ValueError(f"{path}: members {bad} are not numpy arrays; the file is corrupt: {remake}.")
                get = lambda k, default: arrays[k][()] if k in arrays else default
                mu, sigma = arrays["mu"].astype(np.float64), arrays["sigma"].astype(np.float64)
                stats = cls(mu, sigma, int(get("num_images", 0)), str(get("extractor", "unknown")),
                            str(get("extractor_sha256", "")), str(get("source", "")),
                            arrays.get("features"), path)
        except (OSError, EOFError, KeyError, TypeError, zipfile.BadZipFile, zlib_error) as e:  # a damaged member
            raise ValueError(f"{path}: cannot read its arrays ({type(e).__name__}: {e}); the file is corrupt: "
                             f"{remake}.") from None
        except ValueError as e:
            if str(path) in str(e):
                raise
            raise ValueError(f"{path}: cannot read its arrays ({e}); {remake}.") from None
        if stats.mu.ndim != 1 or stats.mu.shape[0] < 1:
            raise ValueError(f"{path}: mu must be a vector (D,), got shape {stats.mu.shape}.")
        if stats.sigma.shape != (stats.dims, stats.dims):
            raise ValueError(f"{path}: sigma has shape {stats.sigma.shape}, expected {(stats.dims,) * 2}.")
        if not (np.isfinite(stats.mu).all() and np.isfinite(stats.sigma).all()):
            raise ValueError(f"{path}: mu or sigma holds NaN or inf values; {remake}.")
        return stats

    def check_compatible(self, extractor: nn.Module) -> None:
        """ValueError (naming the fix) unless these statistics came from ``extractor``."""
        where = f"statistics {self.path or self.source!s}"
        if self.dims != extractor.num_features:
            raise ValueError(
                f"{where} hold {self.dims}-d features ({self.extractor!r}) but the {extractor.name!r} extractor gives "
                f"{extractor.num_features}-d features; pass --feature {self.extractor} if that is what they were made "
                f"with, or recompute them: `gensample fid-stats --feature {extractor.name} --data ... --output ...`."
            )
        if self.extractor not in ("unknown", extractor.name):
            raise ValueError(f"{where} were computed with the {self.extractor!r} extractor, not {extractor.name!r}; "
                             f"use --feature {self.extractor} or recompute them with `gensample fid-stats`.")
        sha = getattr(extractor, "weights_sha256", "")
        if self.extractor_sha256 and sha and self.extractor_sha256 != sha:
            raise ValueError(f"{where} were computed with different {extractor.name!r} weights "
                             f"({self.extractor_sha256[:12]} vs {sha[:12]}); recompute them with "
                             "`gensample fid-stats`.")


def npz_bytes(arrays: dict[str, np.ndarray]) -> bytes:
    """An ``np.load``-readable .npz with fixed timestamps and key order: same arrays -> same bytes -> same sha256."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.asanyarray(arrays[key]), allow_pickle=False)
    return buf.getvalue()


def save_stats(stats: FeatureStats, path: str | Path) -> str:
    """Write ``stats`` to ``path``; returns the file's sha256."""
    return stats.save(path)


def load_stats(path: str | Path) -> FeatureStats:
    return FeatureStats.load(path)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Images -> features


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """uint8 images pass; float images must be finite and in [0, 1] (ValueError naming the fix); -> uint8."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        raise ValueError(f"{what} must be a tensor (N, C, H, W), got {getattr(images, 'shape', type(images))}.")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"{what} must be uint8 in [0, 255] or float in [0, 1], got dtype {images.dtype}.")
    lo, hi = images.min().item(), images.max().item()
    if not (math.isfinite(lo) and math.isfinite(hi)) or lo < -1e-6 or hi > 1 + 1e-6:
        raise ValueError(
            f"{what} must be in [0, 1] (got min {lo:.4g}, max {hi:.4g}). Images in [-1, 1] (model space): pass "
            "(x + 1) / 2; 8-bit values as float: pass them as uint8 or divide by 255."
        )
    return to_uint8(images.clamp(0, 1))


def load_image_files(folder: str | Path, num_images: int | None = None, progress: bool = True) -> torch.Tensor:
    """All images under ``folder`` (recursively, sorted by path) as uint8 (N, C, H, W), C = 1 if every file is
    grayscale else 3. No resizing: all images must have one size (save samples as PNG, never JPEG)."""
    from PIL import Image

    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder of images.")
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if num_images is not None:
        if len(files) < num_images:
            raise ValueError(f"{folder} holds {len(files)} images, fewer than the {num_images} asked for.")
        files = files[:num_images]
    if not files:
        raise ValueError(f"{folder}: no images found (looked for {', '.join(IMAGE_SUFFIXES)}).")
    arrays, gray = [], True
    for f in tqdm(files, desc=f"reading {folder.name}", disable=not progress):
        try:
            with Image.open(f) as img:
                gray &= img.mode in ("L", "1", "I;16", "LA")
                arrays.append(np.asarray(img.convert("RGB")))
        except (OSError, SyntaxError, ValueError) as e:  # UnidentifiedImageError, truncated or damaged files
            raise ValueError(f"{f} is not a readable image ({type(e).__name__}: {e}); remove or replace it, or "
                             f"evaluate a folder that holds only images.") from None
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise ValueError(f"{folder}: images have different sizes {sorted(shapes)[:4]}; resize them to one size first.")
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
    return x[:, :1].contiguous() if gray else x


@torch.no_grad()
def extract_features(images: torch.Tensor, extractor: nn.Module, batch_size: int = 250, progress: bool = True,
                     desc: str = "features") -> torch.Tensor:
    """``extractor`` over uint8 / [0, 1] images in batches -> float64 (N, D) on the CPU."""
    images = check_images(images)
    out = [extractor(images[i:i + batch_size]).double().cpu()
           for i in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress)]
    return torch.cat(out) if out else torch.zeros(0, extractor.num_features, dtype=torch.float64)


def _sample_label(seed: int, index: int, num_classes: int) -> int:
    """Uniform class label of image ``index``, from its own stream (independent of the noise seed ``seed + index``)."""
    label_seed = int(np.random.SeedSequence([seed, index, 1]).generate_state(1, np.uint64)[0] >> 1)
    return int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(label_seed)))


def per_image_inputs(pipeline, indices: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """The pipeline arguments that make image ``i`` depend on ``seed`` and ``i`` alone (not on the batch it is in):
    ``generator`` = one ``torch.Generator().manual_seed(seed + i)`` per image, and for a class-conditional UNet
    ``class_labels`` drawn uniformly per image from a separate stream. ``gensample fid`` and ``gensample sample``
    both generate with these, so image ``i`` of one is image ``i`` of the other."""
    indices = list(indices)
    out: dict[str, Any] = {"generator": [torch.Generator().manual_seed(seed + i) for i in indices]}
    unet = getattr(pipeline, "unet", None)
    num_classes = getattr(getattr(unet, "config", None), "num_class_embeds", None)
    if num_classes is not None:
        # a guidance model's last embedding is its null label (config num_classes = embeddings - 1): never drawn
        num_classes = getattr(getattr(pipeline, "config", None), "num_classes", None) or num_classes
        out["class_labels"] = torch.tensor([_sample_label(seed, i, num_classes) for i in indices])
    return out


@contextlib.contextmanager
def _sampling_mode(pipeline):
    """Components in eval mode and the pipeline's own progress bar off; both restored afterwards."""
    modules = [m for m in getattr(pipeline, "components", {}).values() if isinstance(m, nn.Module)]
    flags = [m.training for m in modules]
    bar_config = dict(getattr(pipeline, "_progress_bar_config", {}) or {})
    for m in modules:
        m.eval()
    if hasattr(pipeline, "set_progress_bar_config"):
        pipeline.set_progress_bar_config(**{**bar_config, "disable": True})
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)
        if hasattr(pipeline, "set_progress_bar_config"):
            pipeline._progress_bar_config = bar_config


def generate_images(pipeline, indices: Sequence[int], seed: int = 0, num_inference_steps: int = 1,
                    batch_size: int = 250, progress: bool = True, **pipeline_kwargs) -> Iterable[torch.Tensor]:
    """Yield uint8 batches; image ``i`` uses ``torch.Generator().manual_seed(seed + i)`` (one generator per image);
    class-conditional UNets get per-image uniform labels from a separate seed stream."""
    indices = list(indices)
    with _sampling_mode(pipeline):
        for start in tqdm(range(0, len(indices), batch_size), desc=f"generating ({num_inference_steps}-step)",
                          disable=not progress):
            idx = indices[start:start + batch_size]
            kwargs = {**per_image_inputs(pipeline, idx, seed), **pipeline_kwargs}
            images = pipeline(batch_size=len(idx), num_inference_steps=num_inference_steps, output_type="pt",
                              **kwargs).images
            yield check_images(images, "pipeline output").cpu()


def generate_features(pipeline, extractor: nn.Module, indices: Sequence[int], seed: int = 0,
                      num_inference_steps: int = 1, batch_size: int = 250, progress: bool = True) -> torch.Tensor:
    """Features (len(indices), D) float64 of the images :func:`generate_images` makes."""
    feats = [extractor(batch).double().cpu()
             for batch in generate_images(pipeline, indices, seed, num_inference_steps, batch_size, progress)]
    return torch.cat(feats) if feats else torch.zeros(0, extractor.num_features, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------------------------
# Multi-process helpers (accelerate); no-ops in a single process


def split_indices(num_images: int) -> list[int]:
    """This process's contiguous share of ``range(num_images)`` (accelerate ``split_between_processes``)."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == 1:
        return list(range(num_images))
    with state.split_between_processes(list(range(num_images))) as local:
        return list(local)


def gather_features(features: torch.Tensor, indices: Sequence[int]) -> torch.Tensor:
    """All processes' features in global index order (pad to equal length, ``accelerate.utils.gather``, unpad)."""
    from accelerate import PartialState
    from accelerate.utils import gather, pad_across_processes

    state = PartialState()
    if state.num_processes == 1:
        return features
    device = state.device
    idx = torch.as_tensor(list(indices), dtype=torch.long, device=device)
    feats = pad_across_processes(features.to(device), dim=0, pad_index=0)
    idx = pad_across_processes(idx, dim=0, pad_index=-1)
    feats, idx = gather(feats).cpu(), gather(idx).cpu()
    keep = idx >= 0
    order = torch.argsort(idx[keep])
    return feats[keep][order]


# ----------------------------------------------------------------------------------------------------------------
# Metrics


class PrecomputedFeatures(nn.Module):
    """Identity "feature extractor" for torchmetrics: lets FID/KID run on features we extracted (and gathered)
    once, instead of torchmetrics extracting them again for each metric."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def compute_metrics(gen_features: torch.Tensor, reference: FeatureStats, kid_subsets: int = 100,
                    kid_subset_size: int = 1000, seed: int = 0) -> dict[str, float]:
    """FID via torchmetrics (float64 states; the reference's state is set from ``mu``/``sigma``), its scipy
    cross-check :func:`frechet_distance`, and KID mean/std (NaN when the reference kept no features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    gen = gen_features.detach().cpu().double()
    if gen.shape[1] != reference.dims:
        raise ValueError(f"generated features are {gen.shape[1]}-d but the reference statistics are "
                         f"{reference.dims}-d; use the extractor the statistics were made with.")
    if len(gen) < 2:
        raise ValueError("need at least 2 generated images for FID.")
    d, n = reference.dims, reference.num_images
    # torchmetrics computes mu = sum / n and Sigma = (cov_sum - n mu mu^T) / (n - 1): any n >= 2 gives back mu and
    # Sigma, so a file with only mu/sigma (pytorch-fid / EDM layout, num_images unknown = 0) uses n = 2
    n = n if n >= 2 else 2
    # sync_on_compute=False: features are already gathered; a torchmetrics all-gather here would double-count them
    # (and deadlock when only the main process computes)
    metric = FrechetInceptionDistance(feature=PrecomputedFeatures(d), sync_on_compute=False)
    mu_r = torch.from_numpy(reference.mu)
    metric.real_features_sum = mu_r * n  # sum f = n mu;  sum f f^T = (n - 1) Sigma + n mu mu^T
    metric.real_features_cov_sum = torch.from_numpy(reference.sigma) * (n - 1) + n * torch.outer(mu_r, mu_r)
    metric.real_features_num_samples = torch.tensor(n, dtype=torch.long)
    metric.update(gen, real=False)
    fid_tm = float(metric.compute())
    mu_g, sigma_g = feature_statistics(gen)
    fid_scipy = frechet_distance(reference.mu, reference.sigma, mu_g, sigma_g)
    if abs(fid_tm - fid_scipy) > 1e-3 * max(1.0, abs(fid_scipy)):
        warnings.warn(f"torchmetrics FID {fid_tm:.6g} and scipy FID {fid_scipy:.6g} disagree (ill-conditioned "
                      "covariances? use more images).")
    out = {"fid": fid_tm, "fid_scipy": fid_scipy, "kid_mean": float("nan"), "kid_std": float("nan"),
           "kid_subset_size": 0, "kid_subsets": kid_subsets}
    if reference.features is not None and len(reference.features) >= 2:
        real = torch.from_numpy(np.asarray(reference.features)).double()
        size = min(kid_subset_size, len(real), len(gen))
        with warnings.catch_warnings():  # "will save all extracted features in buffer": we hold them anyway
            warnings.simplefilter("ignore", UserWarning)
            kid = KernelInceptionDistance(feature=PrecomputedFeatures(d), subsets=kid_subsets, subset_size=size,
                                          sync_on_compute=False)
        kid.update(real, real=True)
        kid.update(gen, real=False)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # KID's random subsets
            kid_mean, kid_std = kid.compute()
        out.update(kid_mean=float(kid_mean), kid_std=float(kid_std), kid_subset_size=size)
    return out


@dataclass
class FIDResult:
    """``fid``, ``kid_mean``, ``kid_std`` and the ``protocol`` needed to reproduce/compare them."""

    fid: float
    kid_mean: float
    kid_std: float
    protocol: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"fid": self.fid, "kid_mean": self.kid_mean, "kid_std": self.kid_std, "protocol": self.protocol}

    def summary(self) -> str:
        p = self.protocol
        steps = f"{p['num_inference_steps']}-step " if p.get("num_inference_steps") else ""
        return f"{steps}FID-{p['extractor']} {self.fid:.4f}  KID {self.kid_mean:.6f} ± {self.kid_std:.6f}"

    def __str__(self) -> str:
        lines = [self.summary()] + [f"  {k}: {v}" for k, v in self.protocol.items()]
        return "\n".join(lines)


def _torchmetrics_version() -> str:
    import torchmetrics

    return torchmetrics.__version__


_DIGITS_STATS: dict[tuple[str, str, str], FeatureStats] = {}  # the embedded set is fixed: cache per extractor


def _check_count(value: Any, name: str) -> None:
    """``value`` is an integer >= 1, else a ValueError naming ``name``."""
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
        raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")


class FIDEvaluator:
    """Reference statistics computed once; then FID/KID of pipelines, image tensors or folders against them.

    Training hook: ``evaluator = FIDEvaluator("digits", "digits", num_images=1000, steps=(1, 2))`` then
    ``logs.update(evaluator(pipeline))`` -> ``{"fid_1step": ..., "kid_1step": ..., "fid_2step": ..., ...}``.
    ``distributed=True`` (under ``accelerate launch``): every process generates its share of the seeds, features are
    gathered, and every process returns the same numbers; all processes must call it.
    """

    def __init__(self, reference: str | Path | torch.Tensor | FeatureStats = "digits",
                 feature: str | nn.Module = "digits", num_images: int = 2000, steps: Sequence[int] = (1, 2),
                 batch_size: int = 250, seed: int = 0, inception_weights: str | Path | None = None,
                 progress: bool = False, device: str | torch.device | None = None, distributed: bool = False,
                 kid_subset_size: int = 1000, kid_subsets: int = 100):
        _check_count(num_images, "num_images")
        _check_count(batch_size, "batch_size")
        self.reference = reference
        self.extractor = get_feature_extractor(feature, inception_weights, device)
        self.num_images, self.steps, self.batch_size, self.seed = num_images, tuple(steps), batch_size, seed
        self.progress, self.distributed = progress, distributed
        self.kid_subset_size, self.kid_subsets = kid_subset_size, kid_subsets
        self._stats: FeatureStats | None = None

    # -- reference ------------------------------------------------------------------------------------------------
    @property
    def reference_stats(self) -> FeatureStats:
        if self._stats is None:
            self._stats = self._reference_stats(self.reference)
        return self._stats

    def _features(self, images: torch.Tensor, desc: str) -> torch.Tensor:
        if not self.distributed:
            return extract_features(images, self.extractor, self.batch_size, self.progress, desc)
        idx = split_indices(len(images))
        local = extract_features(images[idx], self.extractor, self.batch_size, self.progress, desc)
        return gather_features(local, idx)

    def _reference_stats(self, reference) -> FeatureStats:
        if isinstance(reference, FeatureStats):
            stats = reference
        elif isinstance(reference, torch.Tensor):
            stats = FeatureStats.from_features(self._features(reference, "reference features"), self.extractor,
                                               f"tensor ({len(reference)} images)")
        else:
            ref = str(reference)
            if ref == "digits" or ref.startswith(("digits:", "digits@")):  # a folder called digits: pass ./digits
                split, resolution = parse_digits_reference(ref)
                key = (split, resolution, self.extractor.name, getattr(self.extractor, "weights_sha256", ""))
                if key not in _DIGITS_STATS or not key[3]:
                    feats = self._features(digits_images(split, resolution), "reference features")
                    name = f"digits:{split}" + (f"@{resolution}" if resolution != 8 else "")
                    _DIGITS_STATS[key] = FeatureStats.from_features(feats, self.extractor, name)
                stats = dataclasses.replace(_DIGITS_STATS[key])  # a copy: callers may set .path / .features
            elif Path(ref).suffix == ".npz":
                stats = FeatureStats.load(ref)
            elif Path(ref).is_dir():
                images = load_image_files(ref, progress=self.progress)
                stats = FeatureStats.from_features(self._features(images, "reference features"), self.extractor,
                                                   f"folder {ref}")
            else:
                raise ValueError(f"reference {ref!r} is neither 'digits', 'digits:heldout', a stats .npz nor a "
                                 "folder of images.")
        stats.check_compatible(self.extractor)
        return stats

    # -- generated / given images ---------------------------------------------------------------------------------
    def source_features(self, source, num_images: int | None = None, num_inference_steps: int = 1) -> torch.Tensor:
        if num_images is not None:
            _check_count(num_images, "num_images")
        if isinstance(source, torch.Tensor):
            if num_images is not None and num_images > len(source):
                raise ValueError(f"asked for {num_images} images but the tensor holds {len(source)}.")
            return self._features(source[:num_images], "features")
        if isinstance(source, (str, Path)):
            if not Path(source).is_dir():
                raise FileNotFoundError(f"{source}: not a folder of images (load a pipeline with "
                                        "gensample.load_pipeline to evaluate it).")
            return self._features(load_image_files(source, num_images, self.progress), "features")
        if not callable(source):
            raise TypeError(f"source must be a pipeline, an image tensor or a folder, got {type(source).__name__}.")
        n = num_images or self.num_images
        idx = split_indices(n) if self.distributed else list(range(n))
        local = generate_features(source, self.extractor, idx, self.seed, num_inference_steps, self.batch_size,
                                  self.progress)
        return gather_features(local, idx) if self.distributed else local

    def evaluate(self, source, num_images: int | None = None, num_inference_steps: int = 1) -> FIDResult:
        """FID/KID of a pipeline (``num_images`` made with ``num_inference_steps``), an image tensor or a folder."""
        self.reference_stats  # noqa: B018  (a mismatched reference fails before any image is generated)
        gen = self.source_features(source, num_images, num_inference_steps)
        if isinstance(source, (torch.Tensor, str, Path)):
            desc = f"tensor ({len(gen)} images)" if isinstance(source, torch.Tensor) else str(source)
            return self.evaluate_features(gen, source=desc)
        return self.evaluate_features(gen, num_inference_steps, type(source).__name__)

    def evaluate_features(self, gen: torch.Tensor, num_inference_steps: int | None = None,
                          source: str = "features") -> FIDResult:
        """FID/KID of already extracted (and gathered) features; ``num_inference_steps`` given = generated ones."""
        ref = self.reference_stats
        m = compute_metrics(gen, ref, self.kid_subsets, self.kid_subset_size, self.seed)
        generated = num_inference_steps is not None
        protocol = {
            "tool": f"gensample.metrics; torchmetrics {_torchmetrics_version()} FrechetInceptionDistance / "
                    "KernelInceptionDistance on precomputed features (float64)",
            "extractor": self.extractor.name,
            "extractor_sha256": getattr(self.extractor, "weights_sha256", ""),
            "dims": ref.dims,
            "quantisation": "uint8, round(255 x)",
            "reference": ref.source or str(self.reference),
            "n_real": ref.num_images,
            "n_gen": len(gen),
            "stats_file": str(ref.path) if ref.path else None,
            "stats_sha256": file_sha256(ref.path) if ref.path else ref.sha256(),
            "num_inference_steps": num_inference_steps,
            "seeds": f"{self.seed}..{self.seed + len(gen) - 1} (one generator per image)" if generated else None,
            "source": source,
            "fid_scipy": m["fid_scipy"],
            "kid": f"subset_size {m['kid_subset_size']}, {m['kid_subsets']} subsets, "
                   f"n_real {0 if ref.features is None else len(ref.features)}",
        }
        return FIDResult(m["fid"], m["kid_mean"], m["kid_std"], protocol)

    def __call__(self, pipeline) -> dict[str, float]:
        out = {}
        for steps in self.steps:
            r = self.evaluate(pipeline, num_inference_steps=steps)
            out[f"fid_{steps}step"], out[f"kid_{steps}step"] = r.fid, r.kid_mean
        return out


def parse_digits_reference(ref: str) -> tuple[str, int]:
    """"digits[:split][@resolution]" -> (split, resolution); e.g. "digits:heldout@32" -> ("heldout", 32)."""
    body, _, res = ref.partition("@")
    split = body.partition(":")[2] or "train"
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"reference {ref!r}: the digits split must be train, heldout or all.")
    try:
        resolution = int(res) if res else 8
    except ValueError:
        raise ValueError(f"reference {ref!r}: the part after '@' must be a resolution in pixels, e.g. digits@32.") \
            from None
    if resolution < 1:
        raise ValueError(f"reference {ref!r}: resolution must be >= 1.")
    return split, resolution


def digits_reference_for(size: int) -> str:
    """The train-digits reference for generated images of ``size`` pixels: "digits" at the native 8 px, else
    "digits@size", so both sides pass through the same resize (see :func:`parse_digits_reference`)."""
    return "digits" if size == 8 else f"digits@{size}"


def digits_images(split: str = "train", resolution: int = 8) -> torch.Tensor:
    """The embedded digits as uint8 (N, 1, r, r): round(255 (x + 1) / 2), at ``resolution`` as the training data
    at that size is made (:func:`gensample.data.load_digits`, bilinear).

    A model trained on digits upscaled to 32 px is compared with "digits@32": both sides then go through the same
    resize to the feature net's 8x8, so the metric sees the model's errors rather than the resampling blur (the
    real train digits rendered at 32 px score about 385 against the 8 px reference).
    """
    from ..data.digits import load_digits

    return to_uint8((load_digits(split, resolution=resolution) + 1) / 2)


def fid(source, reference: str | Path | torch.Tensor | FeatureStats = "digits", feature: str | nn.Module = "digits",
        num_images: int | None = None, num_inference_steps: int = 1, batch_size: int = 250, seed: int = 0,
        inception_weights: str | Path | None = None, progress: bool = True,
        device: str | torch.device | None = None) -> FIDResult:
    """FID/KID of ``source`` (a pipeline, images (N, C, H, W) uint8 or float in [0, 1], or a folder) against
    ``reference`` ("digits" = train split, "digits:heldout", a folder, a stats ``.npz``, or an image tensor).

    A pipeline generates ``num_images`` (default 2000) images with ``num_inference_steps`` steps, image ``i`` from
    seed ``seed + i``. See the module docstring for the protocol.
    """
    if num_images is not None:
        _check_count(num_images, "num_images")
    if device is None and not isinstance(source, (torch.Tensor, str, Path)):
        device = getattr(source, "device", None)
    evaluator = FIDEvaluator(reference, feature, 2000 if num_images is None else num_images, (num_inference_steps,), batch_size, seed,
                             inception_weights, progress, device)
    return evaluator.evaluate(source, num_images, num_inference_steps)


# ----------------------------------------------------------------------------------------------------------------
# Baselines


def gaussian_pixel_samples(num_images: int, seed: int = 0, split: str = "train") -> torch.Tensor:
    """The naive baseline: x ~ N(mean, full covariance) fitted to the digits' pixels (64-d, in [-1, 1]), clipped to
    [-1, 1], returned in [0, 1] as (N, 1, 8, 8)."""
    from ..data.digits import load_digits

    x = load_digits(split).reshape(-1, 64).double().numpy()
    rng = np.random.default_rng(seed)
    samples = rng.multivariate_normal(x.mean(0), np.cov(x, rowvar=False), size=num_images, method="eigh")
    return torch.from_numpy((np.clip(samples, -1, 1) + 1) / 2).float().reshape(-1, 1, 8, 8)


def digits_baselines(feature: str | nn.Module = "digits", gaussian_sizes: Sequence[int] = (297, 2000),
                     seed: int = 0, inception_weights: str | Path | None = None,
                     progress: bool = False) -> dict[str, FIDResult]:
    """Reference points against the digits TRAIN split: the floor (the 297 held-out digits, real images the
    model never saw) and a naive baseline (pixel-space Gaussian samples, :func:`gaussian_pixel_samples`)."""
    evaluator = FIDEvaluator("digits", feature, seed=seed, inception_weights=inception_weights, progress=progress)
    out = {"floor (heldout vs train)": evaluator.evaluate(digits_images("heldout"))}
    for n in gaussian_sizes:
        out[f"gaussian pixels n={n} vs train"] = evaluator.evaluate(gaussian_pixel_samples(n, seed))
    return out
