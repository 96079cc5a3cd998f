from .ctm_unet import CTMUNet2DModel, init_from_teacher
from .discriminator import Discriminator
from .unet import UNET_PRESETS, build_unet, load_unet_config

__all__ = ["UNET_PRESETS", "build_unet", "load_unet_config", "CTMUNet2DModel", "init_from_teacher", "Discriminator"]
