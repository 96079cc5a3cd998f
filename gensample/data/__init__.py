from .digits import DIGITS_PATH, load_digits
from .images import image_dataset, load_image_folder

__all__ = ["DIGITS_PATH", "load_digits", "load_image_folder", "image_dataset"]
