"""Content keys: the one identity of a media item's KV cache, from the encoder to every engine that places it.

vLLM keys prefix-cache blocks by their token ids plus, per media item, a hash of the item's data, or the
caller's `multi_modal_uuids` when given. decode is handed placeholder embeddings (zeros of the right shape: it
never computes them), so hashing its data would give two different images of one size the same key, and decode
would serve one image's KV for the other. So the encoder computes a key for every item and the engines that get
its embeddings (pd) or its placeholders (decode) pass it as the item's uuid.

A key must change whenever the item's KV could: it covers what the tower sees and what the tower is:
- the decoded media (pixels, mode and size after decoding: how bytes decode is part of it, e.g. EXIF handling);
- the adapter's processing result for the item (metadata such as Qwen's grid, and the token count);
- the encoder's identity: the tower's weights, dtype and class, the processor's settings (resizing limits,
  normalisation) and the family's (vision config, feature layer and selection, projector), so old and new
  encoders side by side in a rollout, or another model, never share keys.
It is never a URL (the same URL can serve other bytes) and never the placeholder's values.
"""

from __future__ import annotations

import json
from typing import Any

import blake3
import torch

KEY_PREFIX = "mmg1-"


def _hasher() -> Any:
    """BLAKE3, as vLLM's own multimodal hasher: ~3 GB/s on one core here (BLAKE2b: ~0.7)."""
    return blake3.blake3()


def encoder_identity(tower: torch.nn.Module, settings: dict[str, Any]) -> str:
    """Digest of everything in the encoder that changes an item's embeddings, computed once at start-up: the
    tower's tensors, and `settings` (the processor's and the family's: vision config, feature selection).

    Hashes every tensor of the tower in full (~0.3 s per GB on one core): a sample could miss a fine-tune that
    changed a few rows, and a path or a name says nothing about the bytes behind it."""
    h = _hasher()
    h.update(type(tower).__qualname__.encode())
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    for name, tensor in sorted(tower.state_dict().items()):
        h.update(f"{name}:{tensor.dtype}:{list(tensor.shape)}".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        h.update(flat.view(torch.uint8).numpy().data)
    return h.hexdigest()


DIGEST_ROWS = 256  # rows hashed at a time: a strip, not a second copy of a large image, is held at once


def media_digest(media: Any) -> bytes:
    """Digest of decoded media as the processor receives it: a PIL image (mode, size and pixels, row by row:
    the same bytes as `tobytes()`, in strips), a video's sampled frames (their shape and pixels, frame by
    frame) and their metadata (which frames, when), or a clip's samples at the model's rate."""
    from mmgraph_workers.media.audio import Audio
    from mmgraph_workers.media.video import Video

    h = _hasher()
    if isinstance(media, Audio):
        h.update(f"audio:{media.rate}:{media.samples.shape}:{media.samples.dtype}".encode())
        h.update(media.samples.view("uint8").data)
        return h.digest()
    if isinstance(media, Video):
        frames = media.frames
        # the whole metadata, not only which frames: fps and the frame count time the frames (Qwen's
        # second_per_grid_ts), so the same frames re-timed are other content
        h.update(f"video:{frames.shape}:{frames.dtype}:".encode())
        h.update(json.dumps(media.metadata, sort_keys=True, default=str).encode())
        for frame in frames:
            h.update(frame.data)
        return h.digest()
    h.update(f"{media.mode}:{media.size}".encode())
    width, height = media.size
    for top in range(0, height, DIGEST_ROWS):
        h.update(media.crop((0, top, width, min(height, top + DIGEST_ROWS))).tobytes())
    return h.digest()


def item_key(identity: str, modality: str, digest: bytes, metadata: dict[str, Any], num_tokens: int) -> str:
    """The key of one encoded item: encoder identity + modality + decoded media + the adapter's metadata."""
    h = _hasher()
    h.update(identity.encode())
    h.update(modality.encode())
    h.update(digest)
    h.update(json.dumps({"metadata": metadata, "num_tokens": num_tokens}, sort_keys=True).encode())
    return KEY_PREFIX + h.hexdigest()
