"""LLaVA (1.5-style): a CLIP/SigLIP vision tower whose hidden states at `vision_feature_layer` (one layer, or
several concatenated) are taken, with the CLS position dropped under the "default" selection strategy, and a
projector MLP into the language model's space; a fixed number of tokens per image, no extra metadata. vLLM
takes `image` embeddings [n, tokens, hidden]."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmgraph_workers.models.base import Encoded, ItemShape, ModelAdapter, skeleton
from mmgraph_workers.models.tiny import TINY_TEXT, build_tokenizer, rename_tensors, sharpen_and_save


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
    tiny = {"llava": {}}
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


# ---- its tiny model (`mmgraph tiny-model`): random weights, built here ----

LLAVA_SPECIAL_TOKENS = ["<pad>", "</s>", "<image>"]
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] | upper }}: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<image>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def build_tiny(out: Path, seed: int, vision_seed: int | None, text_seed: int | None) -> None:
    """LLaVA-1.5-style: CLIP tower (56x56 input, 14-pixel patches: 16 tokens per image after dropping CLS),
    features from the second-to-last layer, a GELU projector, a Llama-style language model."""
    import torch
    from transformers import (
        AutoProcessor,
        CLIPImageProcessor,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    tokenizer, ids = build_tokenizer(out, LLAVA_SPECIAL_TOKENS, LLAVA_CHAT_TEMPLATE, "</s>", "<pad>")
    text = LlamaConfig(
        **TINY_TEXT,
        bos_token_id=ids["<pad>"],
        eos_token_id=ids["</s>"],
        pad_token_id=ids["<pad>"],
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        projection_dim=64,
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids["<image>"],
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=16,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    vision_parts = ("vision_tower", "multi_modal_projector")
    sharpen_and_save(model, out, vision_parts, vision_seed, text_seed, ids["</s>"], ids["<pad>"])
    _as_llava_hf_checkpoint(out / "model.safetensors")
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56}, do_center_crop=True
    )
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token="<image>",
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    AutoProcessor.from_pretrained(out)


def _as_llava_hf_checkpoint(path: Path) -> None:
    """Write the tower's tensors as published LLaVA checkpoints (llava-hf/*) name them, which vLLM reads:
    `vision_tower.vision_model.*`. transformers 5 saves a CLIP tower without the `vision_model.` level."""

    def rename(name: str) -> str:
        if name.startswith("vision_tower.") and not name.startswith("vision_tower.vision_model."):
            return "vision_tower.vision_model." + name.removeprefix("vision_tower.")
        return name

    rename_tensors(path, rename)
