"""Images whose pixels depend on how a loader reads them: EXIF orientation, and transparency in each form Pillow
knows (an alpha channel, a grey-and-alpha image, a palette with a transparent index). An RGB PNG's tRNS colour
is not here: vLLM's EXIF step drops it, so both loaders show the colour."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _noise(width: int, height: int, seed: int, channels: int = 3) -> np.ndarray:
    return (np.random.RandomState(seed).rand(height, width, channels) * 255).astype("uint8")


def exif_rotated_jpeg(orientation: int = 6) -> bytes:
    """A 96x64 JPEG whose EXIF says to turn it (6: 90 degrees clockwise, so it is shown 64x96)."""
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    Image.fromarray(_noise(96, 64, 11)).save(buf, format="JPEG", exif=exif.tobytes(), quality=95)
    return buf.getvalue()


def rgba_png() -> bytes:
    """Noise whose left half is fully transparent and right half half-transparent: what is hidden differs from
    what a loader that drops the alpha shows."""
    pixels = _noise(96, 64, 12, channels=4)
    pixels[:, :48, 3] = 0
    pixels[:, 48:, 3] = 128
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGBA").save(buf, format="PNG")
    return buf.getvalue()


def la_png() -> bytes:
    pixels = _noise(64, 64, 13, channels=2)
    pixels[:32, :, 1] = 0
    buf = io.BytesIO()
    Image.fromarray(pixels, "LA").save(buf, format="PNG")
    return buf.getvalue()


def palette_png_with_transparent_index() -> bytes:
    image = Image.fromarray(_noise(64, 64, 14)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    image.save(buf, format="PNG", transparency=3)
    return buf.getvalue()


SAMPLES = {
    "exif-rotated-jpeg": exif_rotated_jpeg,
    "rgba-png": rgba_png,
    "la-png": la_png,
    "palette-transparent-png": palette_png_with_transparent_index,
}
