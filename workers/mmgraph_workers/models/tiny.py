"""What every family's tiny model shares (`mmgraph tiny-model`; each family module builds its own): a byte-level BPE
tokenizer trained here, a small language model, and two deliberate tweaks that make it a useful test oracle: q/k
projections scaled up so attention is sharp (a position bug, e.g. wrong M-RoPE grids, changes the tokens), and
lm_head scaled up so greedy decoding is decisive (token equality is stable across engines). No download."""

from __future__ import annotations

from pathlib import Path

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


def rename_tensors(path: Path, rename) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(path))
    save_file({rename(name): tensor for name, tensor in tensors.items()}, str(path), metadata={"format": "pt"})


def sharpen_and_save(
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
            reseed(model, part, vision_seed)
        reseed(model, "language_model", text_seed)
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    model.save_pretrained(out, safe_serialization=True)


def reseed(model, part: str, seed: int | None) -> None:
    """Redraw the weights of one part (vision tower or language model) from another seed."""
    if seed is None:
        return
    import torch

    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if part in name and param.dim() > 1:
            param.copy_(torch.randn(param.shape, generator=generator) * param.std())
