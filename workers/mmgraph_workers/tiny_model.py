"""`mmgraph tiny-model DIR`: a tiny Qwen2-VL with random weights, built locally with no download.

It is a real transformers model (config, safetensors weights, a byte-level BPE tokenizer trained here with
Qwen's special tokens, a Qwen-style chat template, an image processor), small enough to load in seconds on a CPU
and to run through vLLM. Two deliberate tweaks make it a useful test oracle: q/k projections are scaled up so
attention is sharp (a position bug, e.g. wrong M-RoPE grids, changes the tokens), and lm_head is scaled up so
greedy decoding is decisive (token equality is stable across engines).
"""

from __future__ import annotations

import json
from pathlib import Path

SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
VOCAB = 512
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


def build_tokenizer(out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB - 64,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=4096,
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    return fast


def build(out: str | Path, *, seed: int = SEED, vision_seed: int | None = None, text_seed: int | None = None) -> Path:
    """Write the model to `out`; `vision_seed`/`text_seed` give variants whose vision or language weights differ
    (the controls that prove embeddings and KV really travel between stages)."""
    import torch
    from transformers import (
        AutoProcessor,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessor,
        Qwen2VLProcessor,
        Qwen2VLVideoProcessor,
    )

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(out)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    config = Qwen2VLConfig(
        text_config={
            "vocab_size": VOCAB,
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "max_position_embeddings": 4096,
            "rope_parameters": {"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 10000.0},
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": ids["<|im_end|>"],
            "pad_token_id": ids["<|endoftext|>"],
            "tie_word_embeddings": False,
        },
        vision_config={
            "depth": 2,
            "embed_dim": 64,
            "hidden_size": 128,
            "num_heads": 2,
            "mlp_ratio": 2,
            "patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
        },
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")) and "visual" not in name:
                param.mul_(4.0)  # sharp attention: positions matter
        model.lm_head.weight.mul_(20.0)  # decisive greedy decoding
        _reseed(model, "visual", vision_seed)
        _reseed(model, "language_model", text_seed)
    model.generation_config.eos_token_id = ids["<|im_end|>"]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    model.save_pretrained(out, safe_serialization=True)
    image_processor = Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS}, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS
    )
    video_processor = Qwen2VLVideoProcessor(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    processor = Qwen2VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    AutoProcessor.from_pretrained(out)  # fail here, not in a worker, if what we wrote does not load
    (out / "mmgraph-tiny.json").write_text(
        json.dumps({"seed": seed, "vision_seed": vision_seed, "text_seed": text_seed})
    )
    return out


def _reseed(model, part: str, seed: int | None) -> None:
    """Redraw the weights of one part (vision tower or language model) from another seed."""
    if seed is None:
        return
    import torch

    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if part in name and param.dim() > 1:
            param.copy_(torch.randn(param.shape, generator=generator) * param.std())


def ensure(path: str | Path) -> Path:
    """Build the tiny model at `path` unless one is already there (what `mmgraph up` calls)."""
    path = Path(path)
    if not (path / "config.json").exists() or not (path / "mmgraph-tiny.json").exists():
        build(path)
    return path
