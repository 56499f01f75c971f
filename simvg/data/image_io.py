"""Reading images safely: one function that returns an 8-bit RGB ``PIL.Image`` or raises ``UserError``.

Every image the project reads (datasets, ``data check``, ``ground``, the server) goes through ``load_image`` so
that all of them agree on orientation and colour handling:

- EXIF orientation is applied (``ImageOps.exif_transpose``), as OpenCV's ``imread`` does in the official code.
- Grayscale, palette, CMYK, YCbCr, LAB and HSV images are converted to RGB by Pillow.
- Transparency (RGBA, LA, PA, palette with a transparent index) is composited on WHITE, not dropped: dropping the
  alpha channel shows whatever colour the encoder left under transparent pixels (often black), which a photo
  model has never seen as "background".
- 16-bit images (``I;16``, ``I;16B``, ``I;16L``, ``I``) are scaled by 255/65535, so full range stays full range
  (Pillow's own ``convert("L")`` clips everything above 255 to white). ``I`` is taken as 16-bit because that is
  what Pillow produces for 16-bit PNG/PGM/TIFF. ``F`` (float) images are taken as [0, 1] when their largest finite
  value is <= 1, else as [0, 255], then clipped; NaN is black, infinities are clipped.
- Missing, empty, truncated, corrupt and non-image files, and images with more than ``max_pixels`` pixels
  (decompression bombs) raise ``UserError`` naming the file.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from simvg.errors import UserError

DEFAULT_MAX_PIXELS = 64_000_000
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_SIXTEEN_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I"}


def load_image(src: str | Path | bytes, max_pixels: int = DEFAULT_MAX_PIXELS, exif: bool = True) -> Image.Image:
    """Open ``src`` (a path or the encoded bytes of an image) as an 8-bit RGB image.

    Args:
        src: file path, or the raw bytes of an encoded image (named ``<bytes>`` in errors).
        max_pixels: images with more pixels (width * height) are refused as decompression bombs.
        exif: apply the EXIF orientation tag (turn off only for annotations made on the raw pixel grid).
    """
    name, stream = _open_source(src)
    try:
        # Pillow warns above MAX_IMAGE_PIXELS and raises above twice that; we enforce our own limit instead.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(stream)
            if image.width * image.height > max_pixels:
                raise UserError(
                    f"{name}: image is {image.width}x{image.height} = {image.width * image.height} pixels, "
                    f"over the limit of {max_pixels} (decompression bomb?)"
                )
            image.load()
            if exif:
                ImageOps.exif_transpose(image, in_place=True)
    except Image.DecompressionBombError as exc:
        raise UserError(f"{name}: refusing a decompression bomb ({exc})") from None
    except UnidentifiedImageError:
        raise UserError(f"{name}: not an image file (or a format Pillow cannot read)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise UserError(f"{name}: unreadable image (truncated or corrupt: {exc})") from None
    return to_rgb(image)


def _open_source(src: str | Path | bytes) -> tuple[str, io.BytesIO]:
    """Name used in error messages and the encoded bytes; checks existence and emptiness.

    Reading the whole file first means no file handle outlives the call (Pillow keeps multi-frame files such as
    camera MPO JPEGs open after ``load``).
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        if len(src) == 0:
            raise UserError("<bytes>: empty image data (0 bytes)")
        return "<bytes>", io.BytesIO(bytes(src))
    path = Path(src)
    if not path.is_file():
        raise UserError(f"{path}: image not found" if not path.exists() else f"{path}: not a file")
    if path.stat().st_size == 0:
        raise UserError(f"{path}: empty image file (0 bytes)")
    try:
        return str(path), io.BytesIO(path.read_bytes())
    except OSError as exc:
        raise UserError(f"{path}: cannot read ({exc.strerror})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB (alpha composited on white, 16-bit scaled; see the module docstring)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in _SIXTEEN_BIT_MODES or mode == "F":
        return Image.fromarray(_to_uint8(np.asarray(image), mode)).convert("RGB")
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _to_uint8(array: np.ndarray, mode: str) -> np.ndarray:
    """High-bit-depth or float pixel array -> uint8 with the full input range mapped to 0..255."""
    values = array.astype(np.float64)
    if mode == "F":
        finite = values[np.isfinite(values)]  # NaN and infinities (all of them, possibly) must not warn or decide
        scale = 255.0 if finite.size and finite.max() <= 1.0 else 1.0
        values = np.nan_to_num(values, nan=0.0, posinf=255.0, neginf=0.0) * scale
    else:
        values = values * (255.0 / 65535.0)
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)
