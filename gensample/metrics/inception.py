"""The FID Inception-v3 (pytorch-fid's ``fid_inception_v3``), without torchvision.

Architecture = torchvision's ``Inception3(num_classes=1008, aux_logits=False)`` with the pytorch-fid patches that
reproduce the TensorFlow graph of ``inception-2015-12-05``: ``FIDInceptionA``/``FIDInceptionC``/``FIDInceptionE_1``
average-pool with ``count_include_pad=False`` and ``FIDInceptionE_2`` (``Mixed_7c``) max-pools in its pool branch.
Module and parameter names equal the public state dict ``pt_inception-2015-12-05-6726825d.pth``
(``Conv2d_1a_3x3.conv.weight``, ``Mixed_5b.branch1x1.bn.running_mean``, ..., ``fc.weight``), so it loads strictly.

Preprocessing as pytorch-fid's ``InceptionV3``: x in [0, 1] -> bilinear resize to 299x299
(``align_corners=False``) -> ``2 x - 1``; output: pool3 (the 2048-d global average pool before ``fc``).
gensample first quantises float input to uint8 (``round(255 x)``), like images saved as PNG.

This module never downloads: :func:`load_fid_inception` reads a local file.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ._extractor_contract import state_dict_sha256, to_uint8

FID_WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
FID_WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{FID_WEIGHTS_NAME}"
FID_WEIGHTS_SHA256_PREFIX = "6726825d"  # torch.hub convention: the file name carries its sha256 prefix
ENV_VAR = "GENSAMPLE_INCEPTION_WEIGHTS"


class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU; keys ``conv.*``, ``bn.*``."""

    def __init__(self, in_channels: int, out_channels: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: torch.Tensor) -> torch.Tensor:
    """3x3/1 average pool that ignores the zero padding (TensorFlow ``SAME``): the FID patch of blocks A, C, E_1."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class FIDInceptionA(nn.Module):
    def __init__(self, in_channels: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, kernel_size=1)

    pool = staticmethod(_tf_avg_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(self.pool(x))
        return torch.cat([b1, b5, b3, bp], 1)


class InceptionB(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([b3, b3d, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionC(nn.Module):
    def __init__(self, in_channels: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)

    pool = staticmethod(_tf_avg_pool)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        for layer in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            b7d = layer(b7d)
        bp = self.branch_pool(self.pool(x))
        return torch.cat([b1, b7, b7d, bp], 1)


class InceptionD(nn.Module):
    def __init__(self, in_channels: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class FIDInceptionE(nn.Module):
    """``FIDInceptionE_1`` (``max_pool=False``: TF average pool) or ``FIDInceptionE_2`` (``max_pool=True``: the
    FID graph's ``Mixed_7c`` max-pools in its pool branch)."""

    def __init__(self, in_channels: int, max_pool: bool = False):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, kernel_size=1)
        self.max_pool = max_pool

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _tf_avg_pool(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], 1)
        bp = self.branch_pool(self.pool(x))
        return torch.cat([b1, b3, b3d, bp], 1)


class FIDInceptionV3(nn.Module):
    """FID Inception-v3: images (N, 1 or 3, H, W), uint8 or float in [0, 1] -> pool3 features (N, 2048).

    ``fc`` (1008 classes) is kept only so the public state dict loads strictly; it is not used.
    """

    name = "inception"
    num_features = 2048

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = FIDInceptionA(192, pool_features=32)
        self.Mixed_5c = FIDInceptionA(256, pool_features=64)
        self.Mixed_5d = FIDInceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = FIDInceptionC(768, channels_7x7=128)
        self.Mixed_6c = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6d = FIDInceptionC(768, channels_7x7=160)
        self.Mixed_6e = FIDInceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = FIDInceptionE(1280, max_pool=False)
        self.Mixed_7c = FIDInceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)
        self.weights_sha256 = ""

    def train(self, mode: bool = True) -> FIDInceptionV3:
        return super().train(False)  # BatchNorm always uses the stored running statistics

    @staticmethod
    def preprocess(images: torch.Tensor) -> torch.Tensor:
        """uint8 / [0, 1] float (float rounded to uint8 first) -> 3 x 299 x 299 in [-1, 1], as pytorch-fid:
        ``2 * interpolate(x / 255, 299, bilinear, align_corners=False) - 1``."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}.")
        x = to_uint8(images).float() / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        return 2 * x - 1

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.preprocess(images.to(self.fc.weight.device))
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # 64 x 147 x 147
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 64 x 73 x 73
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))  # 192 x 71 x 71
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # 192 x 35 x 35
        for block in (self.Mixed_5b, self.Mixed_5c, self.Mixed_5d, self.Mixed_6a, self.Mixed_6b, self.Mixed_6c,
                      self.Mixed_6d, self.Mixed_6e, self.Mixed_7a, self.Mixed_7b, self.Mixed_7c):
            x = block(x)  # ... -> 2048 x 8 x 8
        return x.mean(dim=(2, 3)).float()  # pool3: global average pool, (N, 2048)


def inception_weights_candidates(path: str | Path | None = None) -> list[Path]:
    """Where :func:`load_fid_inception` looks, in order: ``path``; $GENSAMPLE_INCEPTION_WEIGHTS; the hub cache."""
    if path is not None:
        return [Path(path).expanduser()]
    candidates = []
    if os.environ.get(ENV_VAR):
        candidates.append(Path(os.environ[ENV_VAR]).expanduser())
    candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_NAME)
    return candidates


def _unpickler_reason(message: str) -> str:
    """The specific part of torch's weights-only refusal ("Unsupported global: GLOBAL x.Y", "Unsupported operand
    103"), without its advice to load with weights_only=False."""
    match = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \S+|invalid load key[^\n]*)", message)
    if match:
        return match.group(1).rstrip(".,")
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    return lines[-1][:200] if lines else "UnpicklingError"


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of ``path`` (.safetensors, or a torch file read with ``weights_only=True``); ValueError naming the
    file when it is damaged, holds pickled objects other than tensors, or is not a state dict."""
    original = (f"pass the original {FID_WEIGHTS_NAME} (pytorch-fid's release, {FID_WEIGHTS_URL}), or a "
                "safetensors file of its state dict")
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{path} is not a readable safetensors file ({e}); {original}.") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors only: no arbitrary unpickling
    except pickle.UnpicklingError as e:  # weights_only refused an object (a pickled model, a foreign class)
        reason = _unpickler_reason(str(e))
        raise ValueError(f"{path} is not a plain state dict of tensors: torch.load(weights_only=True) refused it "
                         f"({reason}) and gensample never unpickles arbitrary objects; {original}.") from None
    except (EOFError, RuntimeError) as e:  # truncated file, not a torch file
        raise ValueError(f"{path} is not a readable torch weights file ({type(e).__name__}: "
                         f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}); {original}.") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not hold a state dict (got {type(state).__name__}); {original}.")
    return state


def load_fid_inception(path: str | Path | None = None, device: str | torch.device | None = None) -> FIDInceptionV3:
    """Build :class:`FIDInceptionV3` and load ``pt_inception-2015-12-05-6726825d.pth`` strictly from the first
    existing file among :func:`inception_weights_candidates`. Never downloads."""
    candidates = inception_weights_candidates(path)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        looked = ", ".join(str(p) for p in candidates)
        raise FileNotFoundError(
            f"FID Inception weights not found (looked at: {looked}). gensample never downloads them: get "
            f"{FID_WEIGHTS_NAME} (pytorch-fid's port of TF inception-2015-12-05) from {FID_WEIGHTS_URL} on a machine "
            f"with internet, then pass --inception-weights PATH (inception_weights=PATH), set {ENV_VAR}=PATH, or copy "
            f"it to {Path(torch.hub.get_dir()) / 'checkpoints'}/. Or use --feature digits."
        )
    model = FIDInceptionV3()
    state = dict(_read_state_dict(found))
    for key in model.state_dict():  # files saved before BatchNorm had num_batches_tracked lack it
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.tensor(0, dtype=torch.long)
    model.load_state_dict(state, strict=True)
    if found.name == FID_WEIGHTS_NAME:
        digest = hashlib.sha256(found.read_bytes()).hexdigest()
        if not digest.startswith(FID_WEIGHTS_SHA256_PREFIX):
            warnings.warn(f"{found}: sha256 {digest[:8]}... does not match the {FID_WEIGHTS_SHA256_PREFIX} of the "
                          "public pytorch-fid file; FIDs from it are not comparable with published ones.")
    model.weights_sha256 = state_dict_sha256(model)
    return model.eval().requires_grad_(False).to(device or "cpu")
