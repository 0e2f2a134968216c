"""Qwen2-VL and Qwen2.5-VL: a vision transformer whose output is already in the language model's space (patch
merging is its last step), one item per image or video with a (temporal, height, width) patch grid that the
language model's M-RoPE positions depend on. vLLM takes `image_embeds` [tokens, hidden] with `image_grid_thw`
[n, 3], and `video_embeds` with `video_grid_thw` the same way: a video is frames, two at a time (the temporal
patch), through the same tower."""

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
    modalities = ("image", "video")

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

    def prepare(self, processor: Any, image: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        inputs = processor.image_processor(images=[image], return_tensors="pt")
        return inputs["pixel_values"], inputs["image_grid_thw"], {}

    def prepare_video(self, processor: Any, video: Any) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
        """The frames as they are (the loader sampled them: the processor's own sampling stays off, as vLLM
        leaves it); an odd count is padded with the last frame by the processor. Qwen2.5-VL places a video's
        frames in time: the seconds between two temporal patches (`second_per_grid_ts`, from the frames' rate as
        sampled, as transformers computes it) go with the embeddings, or vLLM would assume 1 s."""
        inputs = processor.video_processor(videos=[video.frames], return_tensors="pt")
        extra = {}
        if self.config.architectures[0] == "Qwen2_5_VLForConditionalGeneration":
            meta = video.metadata
            sampled_fps = len(meta["frames_indices"]) / meta["total_num_frames"] * meta["fps"]
            if sampled_fps <= 0:
                raise ValueError("the video has no frame rate, and Qwen2.5-VL places frames in time")
            extra["second_per_grid_ts"] = processor.video_processor.temporal_patch_size / sampled_fps
        return inputs["pixel_values_videos"], inputs["video_grid_thw"], extra

    def max_item_tokens(self, processor: Any, max_pixels: int) -> int:
        """The processor resizes an image to at most its own pixel limit; each merged patch is one row."""
        return _rows_per_frame(processor.image_processor, max_pixels)

    def max_video_tokens(self, processor: Any, max_pixels: int, frames: int) -> int:
        """Frames go through the tower two at a time (the temporal patch), each pair as many rows as a frame."""
        video_processor = processor.video_processor
        pairs = -(-frames // video_processor.temporal_patch_size)
        return pairs * _rows_per_frame(video_processor, max_pixels)

    @torch.inference_mode()
    def forward(
        self, module: torch.nn.Module, prepared: list[tuple[torch.Tensor, torch.Tensor, dict[str, Any]]]
    ) -> list[Encoded]:
        pixels, grid = torch.cat([p for p, _, _ in prepared]), torch.cat([g for _, g, _ in prepared])
        weight = next(module.parameters())
        out = module(pixels.to(device=weight.device, dtype=weight.dtype), grid_thw=grid.to(weight.device))
        embeds = getattr(out, "pooler_output", out)
        sizes = (grid.prod(-1) // module.spatial_merge_size**2).tolist()
        return [
            Encoded(e.contiguous(), {"grid_thw": g, **extra})
            for e, g, (_, _, extra) in zip(torch.split(embeds, sizes), grid.tolist(), prepared, strict=True)
        ]

    def embeddings_data(self, embeddings: list[torch.Tensor], items: list[ItemShape]) -> dict[str, Any]:
        """Per modality, in prompt order: the embeddings end to end and one grid row per item."""
        out: dict[str, Any] = {}
        for modality in self.modalities:
            picked = [(e, item) for e, item in zip(embeddings, items, strict=True) if item.modality == modality]
            if picked:
                grid = torch.tensor([item.metadata["grid_thw"] for _, item in picked])
                out[modality] = {
                    f"{modality}_embeds": torch.cat([e for e, _ in picked]),
                    f"{modality}_grid_thw": grid,
                }
                if "second_per_grid_ts" in picked[0][1].metadata:
                    seconds = [item.metadata["second_per_grid_ts"] for _, item in picked]
                    out[modality]["second_per_grid_ts"] = torch.tensor(seconds)
        return out


def _rows_per_frame(processor: Any, max_pixels: int) -> int:
    """The most rows one image or frame becomes: the processor resizes it to at most its own pixel limit (and
    the graph's cap), rounding each side to a multiple of the merged patch."""
    size = getattr(processor, "size", None) or {}
    own = getattr(processor, "max_pixels", None) or size.get("longest_edge") or max_pixels
    patch = processor.patch_size * processor.merge_size
    # each side is rounded to a multiple of `patch`, up as well as down; sides are at most 200:1 (the
    # processor refuses more), so rounding adds at most patch * (longest side + 1) pixels
    rounded = max_pixels + patch * (math.isqrt(200 * max_pixels) + 1 + patch)
    return max(1, -(-min(rounded, own) // patch**2))
