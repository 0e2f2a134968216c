"""Qwen2-VL and Qwen2.5-VL: a vision transformer whose output is already in the language model's space (patch
merging is its last step), one item per image or video with a (temporal, height, width) patch grid that the
language model's M-RoPE positions depend on. vLLM takes `image_embeds` [tokens, hidden] with `image_grid_thw`
[n, 3], and `video_embeds` with `video_grid_thw` the same way: a video is frames, two at a time (the temporal
patch), through the same tower."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from mmgraph_workers.models.base import Encoded, ItemShape, ModelAdapter, skeleton
from mmgraph_workers.models.tiny import TINY_TEXT, build_tokenizer, sharpen_and_save

TOWERS = {
    "Qwen2VLForConditionalGeneration": ("qwen2_vl", "Qwen2VisionTransformerPretrainedModel"),
    "Qwen2_5_VLForConditionalGeneration": ("qwen2_5_vl", "Qwen2_5_VisionTransformerPretrainedModel"),
}


class Qwen2VL(ModelAdapter):
    family = "qwen2-vl"
    tiny = {"qwen2-vl": {"version": "2"}, "qwen2.5-vl": {"version": "2.5"}}
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


# ---- its tiny model (`mmgraph tiny-model`): random weights, built here ----

QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] in ('video', 'video_url') %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112


def build_tiny(out: Path, seed: int, vision_seed: int | None, text_seed: int | None, version: str = "2") -> None:
    """Qwen2-VL, or (version "2.5") Qwen2.5-VL: its windowed tower, and video positions in seconds (the temporal
    grid's spacing, second_per_grid_ts, times tokens_per_second), which a test needs to see."""
    import torch
    from transformers import (
        AutoProcessor,
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2_5_VLProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    vision: dict = {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "num_heads": 2, "depth": 2}
    if version == "2.5":
        config_class, model_class, processor_class = (
            Qwen2_5_VLConfig,
            Qwen2_5_VLForConditionalGeneration,
            Qwen2_5_VLProcessor,
        )
        vision |= {"hidden_size": 64, "intermediate_size": 128, "out_hidden_size": TINY_TEXT["hidden_size"]}
        vision |= {"window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2}
    else:
        config_class, model_class, processor_class = Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor
        vision |= {"embed_dim": 64, "hidden_size": TINY_TEXT["hidden_size"], "mlp_ratio": 2}

    tokenizer, ids = build_tokenizer(out, QWEN_SPECIAL_TOKENS, QWEN_CHAT_TEMPLATE, "<|im_end|>", "<|endoftext|>")
    config = config_class(
        text_config={
            **TINY_TEXT,
            "rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = model_class(config)
    sharpen_and_save(model, out, ("visual",), vision_seed, text_seed, ids["<|im_end|>"], ids["<|endoftext|>"])
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=QWEN_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    AutoProcessor.from_pretrained(out)  # fail here, not in a worker, if what we wrote does not load
