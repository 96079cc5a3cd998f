"""FID / KID evaluation on torchmetrics: feature extractors (digits CNN, FID Inception-v3), statistics files,
``fid(...)``, a training-hook evaluator (the ``gensample fid`` / ``fid-stats`` commands are in ``gensample.cli.fid``);
the LPIPS distance from user-supplied weights (``metrics.lpips``)."""
from .features import DigitsClassifier, DigitsFeatureExtractor, get_feature_extractor, load_digits_classifier
from .fid import (
    FeatureStats,
    FIDEvaluator,
    FIDResult,
    digits_baselines,
    extract_features,
    feature_statistics,
    fid,
    file_sha256,
    frechet_distance,
    load_stats,
    save_stats,
)
from .inception import FIDInceptionV3, load_fid_inception
from .lpips import LPIPS, load_lpips, save_lpips_weights

__all__ = [
    "LPIPS",
    "DigitsClassifier",
    "DigitsFeatureExtractor",
    "FIDEvaluator",
    "FIDInceptionV3",
    "FIDResult",
    "FeatureStats",
    "digits_baselines",
    "extract_features",
    "feature_statistics",
    "fid",
    "file_sha256",
    "frechet_distance",
    "get_feature_extractor",
    "load_digits_classifier",
    "load_fid_inception",
    "load_lpips",
    "load_stats",
    "save_lpips_weights",
    "save_stats",
]
