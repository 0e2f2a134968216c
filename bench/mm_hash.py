"""What pd pays to key its prefix cache: vLLM hashing the embeddings it is given vs taking the encoder's content key.

pd in e-pd / e-p-d receives real embeddings. Without `multi_modal_uuids` vLLM hashes every item's data (the
embedding tensor) with its multimodal hasher before the request is scheduled; with the content key the encoder
computed (docs/architecture.md, "Content keys"), the key is the item's hash and nothing is hashed. This runs vLLM's
own hasher (`MultiModalHasher.hash_kwargs`, the configured default algorithm) on embedding sizes of real models and
prints the cost per item against the baseline of passing a key. Writes bench/out/mm_hash.json.

    .venv/bin/python bench/mm_hash.py [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

OUT = Path(__file__).resolve().parent.parent / "bench" / "out"
# (what, tokens, hidden, dtype): one image's embeddings as the language model consumes them
SIZES = [
    ("tiny Qwen2-VL, 96x64 image", 6, 128, torch.float32),
    ("Qwen2-VL-7B, 448x448 image", 256, 3584, torch.bfloat16),
    ("Qwen2.5-VL-7B, 1280x720 image", 1196, 3584, torch.bfloat16),
    ("Qwen2.5-VL-72B, 1280x720 image", 1196, 8192, torch.bfloat16),
    ("Qwen2.5-VL-72B, 16-image request", 16 * 1196, 8192, torch.bfloat16),
]


def main() -> None:
    from vllm.config.multimodal import MultiModalConfig
    from vllm.multimodal.hasher import MultiModalHasher

    parser = argparse.ArgumentParser()
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    algorithm = MultiModalConfig().mm_hasher_algorithm
    rows = []
    for what, tokens, hidden, dtype in SIZES:
        embeds = torch.randn(tokens, hidden).to(dtype)
        grid = torch.tensor([[1, 2, tokens * 2]])
        item = {"image_embeds": embeds, "image_grid_thw": grid}
        key = "0" * 64
        hashed, keyed = [], []
        for _ in range(args.repeat):
            started = time.perf_counter()
            MultiModalHasher.hash_kwargs(algorithm, model_id="m", image=item)
            hashed.append(time.perf_counter() - started)
            started = time.perf_counter()
            MultiModalHasher.hash_kwargs(algorithm, model_id="m", image=key)
            keyed.append(time.perf_counter() - started)
        mb = embeds.numel() * embeds.element_size() / 1e6
        row = {
            "what": what,
            "megabytes": round(mb, 2),
            "hash_embeddings_ms": statistics.median(hashed) * 1e3,
            "content_key_ms": statistics.median(keyed) * 1e3,
        }
        rows.append(row)
        print(
            f"{what:36s} {mb:8.1f} MB   vLLM hashes the embeddings {row['hash_embeddings_ms']:8.2f} ms   "
            f"content key {row['content_key_ms']:.3f} ms   "
            f"ratio {row['hash_embeddings_ms'] / row['content_key_ms']:.0f}x"
        )
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "mm_hash.json").write_text(json.dumps({"algorithm": algorithm, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
