"""Images: bytes to an RGB PIL image, with Pillow restricted to common safe formats and a pixel cap checked
before any pixel is decoded (so a decompression bomb is refused, not expanded). The pixels are the ones vLLM's
loader gives its model for the same bytes: turned upright by their EXIF orientation, transparency composited
onto white."""

from __future__ import annotations

import contextlib
import io
import warnings

from PIL import Image, ImageOps, UnidentifiedImageError

from mmgraph_contract.graph import MediaSpec
from mmgraph_workers.media import MediaError

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
# Processors resize an image's short side up to the tower's input (LLaVA: 336 px, so 4000x16 would become
# 84000x336, a memory spike no pixel cap sees); Qwen2-VL's refuses a ratio over 200 outright. So do we, for all.
MAX_ASPECT_RATIO = 200


def decode_image(data: bytes, policy: MediaSpec) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
            width, height = image.size
            if width * height > policy.max_pixels:
                raise MediaError(
                    f"image is {width}x{height} = {width * height} pixels, more than the {policy.max_pixels} "
                    "pixel limit (spec.media.maxPixels)",
                    status=413,
                )
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise MediaError(
                    f"image is {width}x{height}: an aspect ratio over {MAX_ASPECT_RATIO} is refused (models scale "
                    "the short side up, so a thin image becomes a huge one); crop or pad it"
                )
            with contextlib.suppress(Exception):  # as vLLM: a broken EXIF block leaves the image as stored
                image = ImageOps.exif_transpose(image)
            image.load()
            return to_rgb(image)
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError("image is a decompression bomb (too many pixels for its size)", status=413) from None
    except UnidentifiedImageError:
        raise MediaError(f"cannot decode the image: not one of {', '.join(FORMATS)}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"cannot decode the image: {err}") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """RGB as vLLM's `convert_image_mode` makes it: an image with transparency (an alpha channel, or a palette or
    tRNS transparent colour) is composited onto white, not stripped of its alpha (which shows what was hidden)."""
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        out = Image.new("RGB", rgba.size, (255, 255, 255))
        out.paste(rgba, mask=rgba.split()[3])
        return out
    return image.convert("RGB")
