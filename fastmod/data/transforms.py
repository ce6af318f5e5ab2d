"""Image transforms: resize to the model's input and ImageNet normalisation."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
_STD = torch.tensor(IMAGENET_STD).view(3, 1, 1)


def resize_uint8(img: Image.Image, image_size: int) -> np.ndarray:
    """RGB ``image_size`` x ``image_size`` uint8 array [3, S, S] (bilinear, aspect not kept,
    as clevr-iep does for CLEVR's 480x320 images)."""
    img = img.convert("RGB")
    if img.size != (image_size, image_size):
        img = img.resize((image_size, image_size), Image.BILINEAR)
    return np.ascontiguousarray(np.asarray(img, dtype=np.uint8).transpose(2, 0, 1))


def normalize(chw_uint8) -> torch.Tensor:
    """uint8 [3, H, W] (array or tensor) -> float32 [3, H, W], ImageNet mean/std normalised."""
    t = torch.as_tensor(np.asarray(chw_uint8)).float().div_(255.0)
    return (t - _MEAN) / _STD
