"""Qwen2-VL and Qwen2.5-VL: a vision transformer whose output is already in the language model's space (patch
merging is its last step), one item per image with a (temporal, height, width) patch grid that the language
model's M-RoPE positions depend on. vLLM takes `image_embeds` [tokens, hidden] with `image_grid_thw` [n, 3]."""

from __future__ import annotations

import math
from typing import Any

import torch

from mmgraph_workers.models.base import Encoded, ItemShape, ModelAdapter, skeleton

TOWERS = {
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
}


class Qwen2VL(ModelAdapter):
    family = "qwen2-vl"
    architectures = tuple(TOWERS)

    def load_encoder(self, device: str) -> torch.nn.Module:
        import importlib

        module_name, class_name = TOWERS[self.config.architectures[0]]
        tower_class = getattr(
            importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}"), class_name
        )
        with skeleton():
            tower = tower_class._from_config(self.config.vision_config)
        # transformers >= 4.52 saves the tower as `model.visual.*`; Qwen's own checkpoints as `visual.*`
        return self._load(tower, {"model.visual.": "", "visual.": ""}, device)

    def prepare(self, processor: Any, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        return inputs["pixel_values"], inputs["image_grid_thw"]

    def max_item_tokens(self, processor: Any, max_pixels: int) -> int:
        """The processor resizes an image to at most its own pixel limit; each merged patch is one row."""
        image_processor = processor.image_processor
        size = getattr(image_processor, "size", None) or {}
        own = getattr(image_processor, "max_pixels", None) or size.get("longest_edge") or max_pixels
        patch = image_processor.patch_size * image_processor.merge_size
        # each side is rounded to a multiple of `patch`, up as well as down; sides are at most 200:1 (the
        # processor refuses more), so rounding adds at most patch * (longest side + 1) pixels
        rounded = max_pixels + patch * (math.isqrt(200 * max_pixels) + 1 + patch)
        return max(1, -(-min(rounded, own) // patch**2))

    @torch.inference_mode()
    def forward(self, module: torch.nn.Module, prepared: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Encoded]:
        pixels, grid = torch.cat([p for p, _ in prepared]), torch.cat([g for _, g in prepared])
        weight = next(module.parameters())
        out = module(pixels.to(device=weight.device, dtype=weight.dtype), grid_thw=grid.to(weight.device))
        embeds = getattr(out, "pooler_output", out)
        sizes = (grid.prod(-1) // module.spatial_merge_size**2).tolist()
        return [
            Encoded(e.contiguous(), {"grid_thw": g})
            for e, g in zip(torch.split(embeds, sizes), grid.tolist(), strict=True)
        ]

    def embeddings_data(self, embeddings: list[torch.Tensor], items: list[ItemShape]) -> dict[str, Any]:
        grid = torch.tensor([item.metadata["grid_thw"] for item in items])  # 2-D, one row per image
        return {"image": {"image_embeds": torch.cat(embeddings), "image_grid_thw": grid}}
