"""Feature extractors for FID/KID: the digits CNN ("FID-digits") and a name -> extractor switch.

Every extractor follows one contract so torchmetrics can use it directly
(``FrechetInceptionDistance(feature=extractor)``):

* input: images (N, C, H, W), either ``uint8`` in [0, 255] or float in [0, 1]; float input is quantised to uint8 by
  rounding, ``round(255 x)``, first, so features depend on the 8-bit image only (as for PNGs on disk);
* output: (N, ``num_features``) float32 features;
* attributes ``name`` (recorded in statistics files) and ``weights_sha256`` (hash of the weights, see
  :func:`state_dict_sha256`), checked before comparing against stored statistics.

:func:`to_uint8` and :func:`state_dict_sha256` live in :mod:`._extractor_contract` (shared with ``inception`` and
``lpips``) and stay importable from here.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..assets import asset_path
from ._extractor_contract import state_dict_sha256, to_uint8

DIGITS_CLASSIFIER_FILE = "digits_classifier.safetensors"
FEATURE_NAMES = ("digits", "inception")


def to_digits_input(x: torch.Tensor) -> torch.Tensor:
    """Any (N, C, H, W) float image in [-1, 1] -> (N, 1, 8, 8): channel mean (grayscale), then bilinear resize
    (antialiased when shrinking, as :func:`gensample.data.load_digits` resizes)."""
    if x.dim() != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(x.shape)}.")
    if x.shape[1] == 3:
        x = x.mean(dim=1, keepdim=True)
    if x.shape[-2:] != (8, 8):
        x = F.interpolate(x, size=(8, 8), mode="bilinear", align_corners=False, antialias=min(x.shape[-2:]) > 8)
    return x


class DigitsClassifier(nn.Module):
    """A small CNN on 8x8 digits: 3 conv layers (two 2x2 max-pools) -> ``fc1`` (64-d features) -> ReLU -> ``fc2``.

    Input: float (N, 1, 8, 8) in [-1, 1] (other sizes / RGB are converted by :func:`to_digits_input`).
    ``features(x)`` is the pre-activation output of ``fc1``: the penultimate layer used for FID-digits.
    """

    def __init__(self, width: int = 32, num_features: int = 64, num_classes: int = 10, dropout: float = 0.3):
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, padding=1)
        self.fc1 = nn.Linear(4 * width * 2 * 2, num_features)
        self.fc2 = nn.Linear(num_features, num_classes)
        self.dropout = dropout
        self.config = {"width": width, "num_features": num_features, "num_classes": num_classes, "dropout": dropout}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = to_digits_input(x)
        h = F.relu(self.conv1(h))  # 8x8
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)  # 4x4
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)  # 2x2
        return self.fc1(h.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.dropout(F.relu(self.features(x)), self.dropout, self.training)
        return self.fc2(h)


def load_digits_classifier(path: str | Path | None = None,
                           device: str | torch.device | None = None) -> DigitsClassifier:
    """The shipped classifier (assets/digits_classifier.safetensors + .json config); safetensors only, no pickle."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else asset_path(DIGITS_CLASSIFIER_FILE)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: digits classifier weights not found; train them with "
                                "`python scripts/train_digits_classifier.py`.")
    meta_path = path.with_suffix(".json")
    config = json.loads(meta_path.read_text())["config"] if meta_path.is_file() else {}
    model = DigitsClassifier(**config)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval().requires_grad_(False).to(device or "cpu")


class DigitsFeatureExtractor(nn.Module):
    """FID-digits features: the 64-d penultimate layer of :class:`DigitsClassifier` on round(255 x) / 127.5 - 1."""

    name = "digits"

    def __init__(self, classifier: DigitsClassifier | None = None):
        super().__init__()
        self.classifier = classifier if classifier is not None else load_digits_classifier()
        self.classifier.eval().requires_grad_(False)
        self.num_features = self.classifier.fc1.out_features
        self.weights_sha256 = state_dict_sha256(self.classifier)

    def train(self, mode: bool = True) -> DigitsFeatureExtractor:
        return super().train(False)  # always in eval mode (no dropout), also when torchmetrics calls .train()

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = to_uint8(images).to(self.classifier.fc1.weight.device).float() / 127.5 - 1.0
        return self.classifier.features(x).float()


def get_feature_extractor(feature: str | nn.Module = "digits", inception_weights: str | Path | None = None,
                          device: str | torch.device | None = None) -> nn.Module:
    """``"digits"`` (shipped CNN, 64-d) or ``"inception"`` (FID Inception-v3 pool3, 2048-d, needs local weights);
    an ``nn.Module`` with ``num_features`` and ``name`` is returned as it is."""
    if isinstance(feature, nn.Module):
        for attr in ("num_features", "name"):
            if not hasattr(feature, attr):
                raise ValueError(f"a custom feature extractor needs a `{attr}` attribute.")
        return feature
    if feature == "digits":
        return DigitsFeatureExtractor(load_digits_classifier(device=device))
    if feature == "inception":
        from .inception import load_fid_inception

        return load_fid_inception(inception_weights, device=device)
    raise ValueError(f"feature must be one of {FEATURE_NAMES} (or an nn.Module), got {feature!r}.")
