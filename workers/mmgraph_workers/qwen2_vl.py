"""The model adapter for Qwen2-VL-style models: how media become processor inputs, how the vision tower turns
them into embeddings, and how many placeholder tokens an image expands to. The encoder and the engines call
only these functions, so another model family is another adapter, not another worker."""

from __future__ import annotations

from typing import Any

import torch


def load_processor(model: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)


def load_vision_tower(model: str, revision: str | None = None, trust_remote_code: bool = False) -> torch.nn.Module:
    """Only the vision tower stays in memory: the language model and lm_head are dropped after loading."""
    from transformers import AutoModelForImageTextToText

    full = AutoModelForImageTextToText.from_pretrained(
        model, revision=revision, trust_remote_code=trust_remote_code, dtype="auto"
    )
    tower = full.model.visual.eval()
    del full
    return tower


def pixel_inputs(processor: Any, images: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
    out = processor.image_processor(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


@torch.inference_mode()
def encode(tower: torch.nn.Module, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> list[torch.Tensor]:
    """Embeddings per image, [tokens, hidden] each, as the language model consumes them."""
    pixel_values = pixel_values.to(dtype=next(tower.parameters()).dtype, device=next(tower.parameters()).device)
    out = tower(pixel_values, grid_thw=grid_thw.to(pixel_values.device))
    embeds = getattr(out, "pooler_output", out)
    merge = tower.spatial_merge_size**2
    sizes = (grid_thw.prod(-1) // merge).tolist()
    return list(torch.split(embeds, sizes))


def tokens_for(grid_thw: list[int], merge_size: int = 2) -> int:
    t, h, w = grid_thw
    return t * h * w // (merge_size * merge_size)
