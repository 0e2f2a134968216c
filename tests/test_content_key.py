"""The encoder's content key (mmgraph_workers.content_key): what changes it, and hashing a large image without
copying it."""

from __future__ import annotations

from PIL import Image


def test_content_key_changes_with_whatever_changes_the_kv():
    """The key covers the decoded media, the adapter's metadata and token count, and the encoder's identity
    (tower weights and processor settings); the same item through the same encoder keeps its key."""
    import copy

    import torch

    from mmgraph_workers.content_key import encoder_identity, item_key, media_digest

    tower = torch.nn.Linear(4, 4)
    identity = encoder_identity(tower, {"max_pixels": 12544})
    image = Image.new("RGB", (96, 64), (10, 20, 30))
    digest = media_digest(image)
    key = item_key(identity, "image", digest, {"grid_thw": [1, 4, 6]}, 6)
    assert key == item_key(
        encoder_identity(tower, {"max_pixels": 12544}), "image", media_digest(image.copy()), {"grid_thw": [1, 4, 6]}, 6
    )
    other_pixels = image.copy()
    other_pixels.putpixel((0, 0), (10, 20, 31))
    retrained = torch.nn.Linear(4, 4)
    variants = [
        item_key(identity, "image", media_digest(other_pixels), {"grid_thw": [1, 4, 6]}, 6),
        item_key(identity, "image", media_digest(image.convert("L").convert("RGB")), {"grid_thw": [1, 4, 6]}, 6),
        item_key(identity, "image", digest, {"grid_thw": [1, 6, 4]}, 6),
        item_key(identity, "image", digest, {"grid_thw": [1, 4, 6]}, 8),
        item_key(identity, "video", digest, {"grid_thw": [1, 4, 6]}, 6),
        item_key(encoder_identity(tower, {"max_pixels": 50176}), "image", digest, {"grid_thw": [1, 4, 6]}, 6),
        item_key(encoder_identity(retrained, {"max_pixels": 12544}), "image", digest, {"grid_thw": [1, 4, 6]}, 6),
        item_key(
            encoder_identity(copy.deepcopy(tower).double(), {"max_pixels": 12544}),
            "image",
            digest,
            {"grid_thw": [1, 4, 6]},
            6,
        ),
    ]
    assert len({key, *variants}) == len(variants) + 1
    assert "http" not in key and len(key) == len("mmg1-") + 64


def test_the_content_key_of_a_large_image_does_not_copy_it_whole():
    """The digest reads the pixels in strips: hashing a 4096x4096 image (48 MB decoded, the default maxPixels)
    holds a few MB at once, not a second copy of the image."""
    import tracemalloc

    from mmgraph_workers.content_key import media_digest

    image = Image.new("RGB", (4096, 4096), (1, 2, 3))
    tracemalloc.start()
    try:
        media_digest(image)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 16e6, f"{peak / 1e6:.0f} MB held while hashing a 48 MB image"
