"""Image files and pictures into the core's layout: float [1, C, H, W] in [0, 1] at the file's depth.

Pillow's ``convert("RGB")`` clips 16-bit and float pictures to 8 bits, so a 16-bit PNG comes out
almost white and a float TIFF black. Pictures of those modes are scaled here by their own range:

* 16-bit (``I;16``, ``I;16B``, ...) and 32-bit integer (``I``, which is how 16-bit PNGs used to
  decode) by 65535, clamped to [0, 1];
* float (``F``) as [0, 1] when the values lie within it, else as 8-bit (up to 255) or 16-bit values.

Every other mode goes through Pillow's conversion, as before. A file is checked before it is
decoded: more than :data:`~wuerstchen.inputs.limits.MAX_IMAGE_PIXELS` pixels is refused (decompression
bombs), and anything Pillow cannot read is one :class:`~wuerstchen.inputs.limits.RequestError` line.
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch

from .limits import MAX_IMAGE_PIXELS, RequestError

HIGH_DEPTH_MODES = ("I", "I;16", "I;16L", "I;16B", "I;16N", "F")


def _scaled(arr: np.ndarray, mode: str) -> np.ndarray:
    """A one-channel high-depth picture as float32 in [0, 1] (see the module docstring)."""
    values = arr.astype(np.float32)
    if mode == "F":
        finite = values[np.isfinite(values)]
        top = float(finite.max()) if finite.size else 0.0
        scale = 1.0 if top <= 1.0 else 255.0 if top <= 255.0 else 65535.0
        values = np.nan_to_num(values / scale, nan=0.0, posinf=1.0, neginf=0.0)
    else:
        values = values / 65535.0
    return np.clip(values, 0.0, 1.0)


def picture_to_array(picture, mode: str = "RGB") -> np.ndarray:
    """A PIL picture as float32 [H, W, C] in [0, 1] (C = 3 for "RGB", 1 for "L"), high depths scaled."""
    if picture.mode in HIGH_DEPTH_MODES:
        grey = _scaled(np.asarray(picture), picture.mode)[..., None]
        return np.repeat(grey, 3, axis=2) if mode == "RGB" else grey
    arr = np.asarray(picture.convert(mode), dtype=np.float32) / 255.0
    return arr[..., None] if arr.ndim == 2 else arr


def read_image(path: os.PathLike | str, mode: str = "RGB", what: str = "image") -> torch.Tensor:
    """The picture in a file as float [1, C, H, W] in [0, 1] (C = 3 for "RGB", 1 for a grey "L" mask).

    Refused with one line naming ``what`` and the path: a missing file, a folder, a file that is
    not a picture, and a picture of more than MAX_IMAGE_PIXELS pixels (checked before decoding)."""
    from PIL import Image, UnidentifiedImageError

    if not os.path.exists(path):
        raise RequestError(f"{what} {str(path)!r}: no such file")
    if os.path.isdir(path):
        raise RequestError(f"{what} {str(path)!r} is a folder; give a picture file (PNG, JPEG, WebP, ...)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as picture:
                width, height = picture.size
                if width * height > MAX_IMAGE_PIXELS:
                    raise RequestError(f"{what} {str(path)!r} is {width}x{height} pixels, more than the "
                                       f"{MAX_IMAGE_PIXELS // 1_000_000} megapixels read here; scale it down first")
                picture.load()
                arr = picture_to_array(picture, mode)
    except Image.DecompressionBombError as exc:
        raise RequestError(f"{what} {str(path)!r} has more than the {MAX_IMAGE_PIXELS // 1_000_000} megapixels read "
                           f"here ({exc}); scale it down first") from None
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
        if isinstance(exc, RequestError):
            raise
        raise RequestError(f"{what} {str(path)!r}: cannot read the image ({exc.__class__.__name__}: {exc})") from None
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(2, 0, 1).unsqueeze(0)
