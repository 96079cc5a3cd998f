from .ctm_unet import CTMUNet2DModel, init_from_teacher
from .discriminator import Discriminator
from .latent_normalizer import LatentNormalizer
from .nsln import NonScalingLayerNorm, NsLNUNet2DModel, build_nsln_unet, replace_group_norm
from .unet import UNET_PRESETS, build_unet, load_unet_config

__all__ = ["UNET_PRESETS", "build_unet", "load_unet_config", "CTMUNet2DModel", "init_from_teacher", "Discriminator",
           "LatentNormalizer", "NonScalingLayerNorm", "NsLNUNet2DModel", "build_nsln_unet", "replace_group_norm"]
