"""LLaVA (1.5-style): a CLIP/SigLIP vision tower whose hidden states at `vision_feature_layer` (one layer, or
several concatenated) are taken, with the CLS position dropped under the "default" selection strategy, and a
projector MLP into the language model's space; a fixed number of tokens per image, no extra metadata. vLLM
takes `image` embeddings [n, tokens, hidden]."""

from __future__ import annotations

from typing import Any

import torch

from mmgraph_workers.models.base import Encoded, ItemShape, ModelAdapter, skeleton


class LlavaEncoder(torch.nn.Module):
    """Tower + projector, selecting features as the model's config says (as transformers' LlavaModel does)."""

    def __init__(self, tower: torch.nn.Module, projector: torch.nn.Module, layer: int | list[int], strategy: str):
        super().__init__()
        self.tower, self.projector, self.layer, self.strategy = tower, projector, layer, strategy

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.tower(pixel_values, output_hidden_states=True, return_dict=True).hidden_states
        layers = [self.layer] if isinstance(self.layer, int) else list(self.layer)
        chosen = [hidden[i][:, 1:] if self.strategy == "default" else hidden[i] for i in layers]
        return self.projector(torch.cat(chosen, dim=-1))


class Llava(ModelAdapter):
    family = "llava"
    architectures = ("LlavaForConditionalGeneration",)

    def encoder_settings(self) -> dict[str, Any]:
        config = self.config
        return {
            **super().encoder_settings(),
            "vision_feature_layer": config.vision_feature_layer,
            "vision_feature_select_strategy": config.vision_feature_select_strategy,
            "projector_hidden_act": config.projector_hidden_act,
            "multimodal_projector_bias": getattr(config, "multimodal_projector_bias", True),
        }

    def load_encoder(self, device: str) -> torch.nn.Module:
        from transformers import AutoModel
        from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

        config = self.config
        with skeleton():
            module = LlavaEncoder(
                AutoModel.from_config(config.vision_config),
                LlavaMultiModalProjector(config),
                config.vision_feature_layer,
                config.vision_feature_select_strategy,
            )
        # Checkpoints name the CLIP tower `[model.]vision_tower.vision_model.*`; transformers 5's CLIPVisionModel
        # has no `vision_model` level (4.x has one), so map onto whichever this module has.
        nested = any(name.startswith("tower.vision_model.") for name in module.state_dict())
        tower = "tower.vision_model." if nested else "tower."
        prefixes = {
            "model.vision_tower.vision_model.": tower,
            "vision_tower.vision_model.": tower,
            "model.multi_modal_projector.": "projector.",
            "multi_modal_projector.": "projector.",
        }
        return self._load(module, prefixes, device)

    def prepare(self, processor: Any, image: Any) -> torch.Tensor:
        return processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]

    def max_item_tokens(self, processor: Any, max_pixels: int) -> int:
        """Every image is resized and cropped to the tower's input: a fixed number of patches (CLS included)."""
        vision = self.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2 + 1

    @torch.inference_mode()
    def forward(self, module: torch.nn.Module, prepared: list[torch.Tensor]) -> list[Encoded]:
        weight = next(module.parameters())
        embeds = module(torch.cat(prepared).to(device=weight.device, dtype=weight.dtype))
        return [Encoded(e.contiguous(), {}) for e in embeds]

    def embeddings_data(self, embeddings: list[torch.Tensor], items: list[ItemShape]) -> dict[str, Any]:
        return {"image": torch.stack(embeddings)}
