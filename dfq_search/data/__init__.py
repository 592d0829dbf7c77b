"""Labelled images decoded once to uint8 tensors, and noise batches for data-free calibration."""

from dfq_search.data.digits import load_digits_split
from dfq_search.data.folder import clear_memo, load_image_folder
from dfq_search.data.image_data import ImageData, gaussian_batches
from dfq_search.data.mnist import load_mnist_split

__all__ = [
    "ImageData",
    "clear_memo",
    "gaussian_batches",
    "load_digits_split",
    "load_image_folder",
    "load_mnist_split",
]
