"""`mmgraph tiny-model DIR [--family qwen2-vl|qwen2.5-vl|llava|qwen2-audio]`: a tiny model of a supported family
with random weights, built locally with no download.

Each is a real transformers model (config, safetensors weights, a byte-level BPE tokenizer trained here with
Qwen's special tokens, a Qwen-style chat template, an image, video or audio processor), small enough to load in
seconds on a CPU and to run through vLLM. Two deliberate tweaks make it a useful test oracle: q/k projections are
scaled up so attention is sharp (a position bug, e.g. wrong M-RoPE grids, changes the tokens), and lm_head is
scaled up so greedy decoding is decisive (token equality is stable across engines).
"""

from __future__ import annotations

import json
from pathlib import Path

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
AUDIO_SPECIAL_TOKENS = [*QWEN_SPECIAL_TOKENS[:3], "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
# Qwen2-Audio-Instruct's template numbers the clips ("Audio 1: ..."), as this one does
AUDIO_CHAT_TEMPLATE = (
    "{% set audios = namespace(n=0) %}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('audio', 'audio_url', 'input_audio') %}{% set audios.n = audios.n + 1 %}"
    "Audio {{ audios.n }}: <|audio_bos|><|AUDIO|><|audio_eos|>\n"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
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
FAMILIES = ("qwen2-vl", "qwen2.5-vl", "llava", "qwen2-audio")
VOCAB = 512
# The language model of every tiny family: small enough for seconds on a CPU, large enough for distinct answers.
TINY_TEXT = {
    "vocab_size": VOCAB,
    "hidden_size": 128,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "max_position_embeddings": 4096,
}
MIN_PIXELS, MAX_PIXELS = 56 * 56, 112 * 112
SEED = 1234


def _corpus() -> list[str]:
    words = (
        "the a an image picture photo shows red green blue yellow black white cat dog bird car tree house sky "
        "sea road person man woman child is are on in of with and describe what color this that there here "
        "left right top bottom small large one two three many very bright dark light shape square circle line "
        "hello world please answer question model tiny test mmgraph encode prefill decode"
    ).split()
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) for i in range(400)]


def build_tokenizer(
    out: Path, special_tokens: list[str], chat_template: str, eos: str, pad: str
) -> tuple[object, dict[str, int]]:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 64,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eos,
        pad_token=pad,
        additional_special_tokens=[t for t in special_tokens if t not in (eos, pad)],
        model_max_length=4096,
    )
    fast.chat_template = chat_template
    fast.save_pretrained(out)
    return fast, {t: fast.convert_tokens_to_ids(t) for t in special_tokens}


def build(
    out: str | Path,
    *,
    family: str = "qwen2-vl",
    seed: int = SEED,
    vision_seed: int | None = None,
    text_seed: int | None = None,
) -> Path:
    """Write the model to `out`; `vision_seed`/`text_seed` give variants whose vision or language weights differ
    (the controls that prove embeddings and KV really travel between stages)."""
    if family not in FAMILIES:
        raise ValueError(f"no tiny model for family {family!r}; families: {', '.join(FAMILIES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if family == "llava":
        _llava(out, seed, vision_seed, text_seed)
    elif family == "qwen2-audio":
        _qwen2_audio(out, seed, vision_seed, text_seed)
    else:
        _qwen2_vl(out, seed, vision_seed, text_seed, version=family.removeprefix("qwen").removesuffix("-vl"))
    (out / "mmgraph-tiny.json").write_text(
        json.dumps({"family": family, "seed": seed, "vision_seed": vision_seed, "text_seed": text_seed})
    )
    return out


def _qwen2_vl(out: Path, seed: int, vision_seed: int | None, text_seed: int | None, version: str = "2") -> None:
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
    _sharpen_and_save(model, out, ("visual",), vision_seed, text_seed, ids["<|im_end|>"], ids["<|endoftext|>"])
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


def _llava(out: Path, seed: int, vision_seed: int | None, text_seed: int | None) -> None:
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
    _sharpen_and_save(model, out, vision_parts, vision_seed, text_seed, ids["</s>"], ids["<pad>"])
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


def _qwen2_audio(out: Path, seed: int, tower_seed: int | None, text_seed: int | None) -> None:
    """Qwen2-Audio: a Whisper-style audio encoder (128 mel bins, 30 s windows: 3000 mel frames, 750 tokens at
    most; 25 per second), a linear projector, a Qwen2 language model; Whisper's feature extractor at 16 kHz."""
    import torch
    from transformers import (
        AutoProcessor,
        Qwen2AudioConfig,
        Qwen2AudioForConditionalGeneration,
        Qwen2AudioProcessor,
        WhisperFeatureExtractor,
    )

    tokenizer, ids = build_tokenizer(out, AUDIO_SPECIAL_TOKENS, AUDIO_CHAT_TEMPLATE, "<|im_end|>", "<|endoftext|>")
    config = Qwen2AudioConfig(
        audio_config={
            "d_model": 64,
            "encoder_layers": 2,
            "encoder_attention_heads": 2,
            "encoder_ffn_dim": 128,
            "num_mel_bins": 128,
            "max_source_positions": 1500,
        },
        text_config={
            "model_type": "qwen2",
            **TINY_TEXT,
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        audio_token_index=ids["<|AUDIO|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2AudioForConditionalGeneration(config)
    tower_parts = ("audio_tower", "multi_modal_projector")
    _sharpen_and_save(model, out, tower_parts, tower_seed, text_seed, ids["<|im_end|>"], ids["<|endoftext|>"])
    _as_qwen2_audio_checkpoint(out / "model.safetensors")
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
        chat_template=AUDIO_CHAT_TEMPLATE,
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

    _rename_tensors(path, rename)


def _as_qwen2_audio_checkpoint(path: Path) -> None:
    """Write the language model's tensors as Qwen's Qwen2-Audio checkpoints name them, which vLLM reads:
    `language_model.model.*`. transformers 5 saves them one `model.` level deeper."""
    _rename_tensors(path, lambda name: name.replace("language_model.model.model.", "language_model.model.", 1))


def _rename_tensors(path: Path, rename) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file({rename(name): tensor for name, tensor in tensors.items()}, str(path), metadata={"format": "pt"})


def _sharpen_and_save(
    model, out: Path, vision_parts: tuple[str, ...], vision_seed: int | None, text_seed: int | None, eos: int, pad: int
) -> None:
    """float32, sharp attention in the language model (a position bug changes the tokens), a decisive lm_head
    (token equality is stable across engines), optional reseeded parts; then save."""
    import torch

    model = model.to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            is_vision = any(part in name for part in vision_parts)
            if name.endswith(("q_proj.weight", "k_proj.weight")) and not is_vision:
                param.mul_(4.0)
        model.lm_head.weight.mul_(20.0)
        for part in vision_parts:
            _reseed(model, part, vision_seed)
        _reseed(model, "language_model", text_seed)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out, safe_serialization=True)


def _reseed(model, part: str, seed: int | None) -> None:
    """Redraw the weights of one part (vision tower or language model) from another seed."""
    if seed is None:
        return
    import torch

    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if part in name and param.dim() > 1:
            param.copy_(torch.randn(param.shape, generator=generator) * param.std())


def ensure(path: str | Path, family: str = "qwen2-vl") -> Path:
    """Build the tiny model at `path` unless one is already there (what `mmgraph up` calls)."""
    path = Path(path)
    if not (path / "config.json").exists() or not (path / "mmgraph-tiny.json").exists():
        build(path, family=family)
    return path
