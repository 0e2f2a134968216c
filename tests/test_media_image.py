"""Image decoding (mmgraph_workers.media.image): size and aspect-ratio caps checked from the header, the formats
that open, and the pixels vLLM's own loader gives."""

from __future__ import annotations

import io

import numpy as np
import pytest
from media_samples import SAMPLES
from PIL import Image

from mmgraph_contract.graph import MediaSpec
from mmgraph_workers.media import MediaError
from mmgraph_workers.media.image import decode_image


def test_pixel_cap_checked_before_any_pixel_is_decoded(monkeypatch):
    """A size just over the graph's cap and far under Pillow's own bomb limit: refused from the header alone."""
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="PNG")
    loads = []
    original = Image.Image.load
    monkeypatch.setattr(Image.Image, "load", lambda self: loads.append(self.size) or original(self))
    with pytest.raises(MediaError, match="300x200 = 60000 pixels"):
        decode_image(buf.getvalue(), MediaSpec(max_pixels=59_999))
    assert loads == [], "pixels were decoded before the cap refused the image"
    decode_image(buf.getvalue(), MediaSpec(max_pixels=60_000))
    assert loads, "control: an image within the cap is decoded"


def test_pixel_cap_checked_before_decoding():
    buf = io.BytesIO()
    Image.new("RGB", (300, 200)).save(buf, format="PNG")
    with pytest.raises(MediaError, match="300x200"):
        decode_image(buf.getvalue(), MediaSpec(max_pixels=50_000))
    assert decode_image(buf.getvalue(), MediaSpec()).size == (300, 200)


@pytest.mark.parametrize(("size", "refused"), [((4000, 16), True), ((16, 4000), True), ((3200, 16), False)])
def test_an_aspect_ratio_over_200_is_refused_before_decoding(size, refused):
    """Processors scale the short side up (LLaVA to 336 px: 4000x16 would be 84000x336 in memory), so a thin image
    is refused from its header, for every family, as Qwen2-VL's processor would."""
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format="PNG")
    if refused:
        with pytest.raises(MediaError, match="aspect ratio over 200") as info:
            decode_image(buf.getvalue(), MediaSpec())
        assert info.value.status == 400
    else:
        assert decode_image(buf.getvalue(), MediaSpec()).size == size


@pytest.mark.parametrize("sample", SAMPLES)
def test_an_image_decodes_to_the_pixels_vllms_loader_gives(sample):
    """EXIF orientation applied and transparency composited onto white, as vLLM's loader does; the control (what
    mmgraph did before: Pillow's plain RGB conversion) differs, so the comparison can fail."""
    from vllm.multimodal.media.image import ImageMediaIO

    data = SAMPLES[sample]()
    theirs = np.asarray(ImageMediaIO().load_bytes(data).media)
    assert np.array_equal(np.asarray(decode_image(data, MediaSpec())), theirs)
    naive = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    assert naive.shape != theirs.shape or not np.array_equal(naive, theirs), "the sample shows nothing"


def test_only_safe_image_formats_open():
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="TIFF")
    with pytest.raises(MediaError, match="not one of PNG"):
        decode_image(buf.getvalue(), MediaSpec())
