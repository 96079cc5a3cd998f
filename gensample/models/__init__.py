from .unet import UNET_PRESETS, build_unet, load_unet_config

__all__ = ["UNET_PRESETS", "build_unet", "load_unet_config"]
