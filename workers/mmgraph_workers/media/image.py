"""Images: bytes to an RGB PIL image, with Pillow restricted to common safe formats and a pixel cap checked
before any pixel is decoded (so a decompression bomb is refused, not expanded)."""

from __future__ import annotations

import io
import warnings

from PIL import Image, UnidentifiedImageError

from mmgraph_workers.media import MediaError
from mmgraph_workers.media.policy import MediaPolicy

FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")


def decode_image(data: bytes, policy: MediaPolicy) -> Image.Image:
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
            image.load()
            return image.convert("RGB")
    except MediaError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise MediaError("image is a decompression bomb (too many pixels for its size)", status=413) from None
    except UnidentifiedImageError:
        raise MediaError(f"cannot decode the image: not one of {', '.join(FORMATS)}") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise MediaError(f"cannot decode the image: {err}") from None
