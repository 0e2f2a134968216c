"""Qwen2-Audio: Whisper's log-mel features (16 kHz, always padded to one 30 s window of 3000 frames), an audio
encoder that halves them twice (25 rows per second of audio, 750 at most), a linear projector into the language
model's space. vLLM takes `audio_embeds`, one [rows, hidden] tensor per clip: the rows of the clip's real
frames, the padding's rows dropped, exactly as its own forward drops them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from mmgraph_workers.media.audio import Audio, AudioFormat
from mmgraph_workers.models.base import Encoded, ItemShape, ModelAdapter, skeleton
from mmgraph_workers.models.tiny import TINY_TEXT, build_tokenizer, rename_tensors, sharpen_and_save


class AudioEncoder(torch.nn.Module):
    """The tower and the projector, named as in the checkpoint (`audio_tower.*`, `multi_modal_projector.*`)."""

    def __init__(self, config: Any):
        from transformers.models.qwen2_audio.modeling_qwen2_audio import (
            Qwen2AudioEncoder,
            Qwen2AudioMultiModalProjector,
        )

        super().__init__()
        self.audio_tower = Qwen2AudioEncoder(config.audio_config)  # as vLLM builds it (its attention too)
        self.multi_modal_projector = Qwen2AudioMultiModalProjector(config)


class Qwen2Audio(ModelAdapter):
    family = "qwen2-audio"
    tiny = {"qwen2-audio": {}}
    architectures = ("Qwen2AudioForConditionalGeneration",)
    modalities = ("audio",)

    def load_encoder(self, device: str) -> torch.nn.Module:
        with skeleton():
            module = AudioEncoder(self.config)
        prefixes = {"audio_tower.": "audio_tower.", "multi_modal_projector.": "multi_modal_projector."}
        return self._load(module, prefixes, device)

    def encoder_settings(self) -> dict[str, Any]:
        return {"family": self.family, "audio_config": self.config.audio_config.to_dict()}

    def processor_settings(self, processor: Any) -> dict[str, Any]:
        return {"feature_extractor": processor.feature_extractor.to_dict()}

    def audio_format(self, processor: Any) -> AudioFormat:
        """16 kHz; the seconds one window holds (vLLM's processor truncates longer clips, so they are refused)."""
        extractor = processor.feature_extractor
        return AudioFormat(extractor.sampling_rate, float(min(extractor.chunk_length, 30)))

    def prepare_audio(self, processor: Any, audio: Audio) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-mel features of one clip padded to the window, and which of their frames are real: the feature
        extractor's call as vLLM's processor makes it."""
        extractor = processor.feature_extractor
        if audio.rate != extractor.sampling_rate:
            raise ValueError(f"audio at {audio.rate} Hz; the model takes {extractor.sampling_rate} Hz")
        inputs = extractor(
            audio.samples,
            sampling_rate=extractor.sampling_rate,
            return_attention_mask=True,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        )
        mask = inputs["attention_mask"]
        if _output_lengths(mask.sum(-1))[1].item() < 1:
            raise ValueError(f"the clip ({audio.seconds:.3f} s) is too short to be represented by the model")
        return inputs["input_features"], mask

    def max_audio_tokens(self, processor: Any, max_seconds: float) -> int:
        extractor = processor.feature_extractor
        seconds = min(max_seconds, self.audio_format(processor).max_seconds)
        frames = int(seconds * extractor.sampling_rate) // extractor.hop_length
        return int(_output_lengths(torch.tensor(frames))[1])

    @torch.inference_mode()
    def forward(self, module: torch.nn.Module, prepared: list[tuple[torch.Tensor, torch.Tensor]]) -> list[Encoded]:
        """vLLM's own computation: padded frames are masked out of attention (an additive -inf mask over keys),
        and each clip keeps the rows of its real frames."""
        features, mask = torch.cat([f for f, _ in prepared]), torch.cat([m for _, m in prepared])
        tower = module.audio_tower
        weight = tower.conv1.weight
        feature_lengths, output_lengths = _output_lengths(mask.sum(-1))
        batch, _, mel_frames = features.shape
        rows = (mel_frames - 2) // 2 + 1
        padded = torch.arange(rows).expand(batch, rows) >= feature_lengths.unsqueeze(-1)
        padded = padded.view(batch, 1, 1, rows).expand(batch, 1, rows, rows).to(weight.device)
        attention = torch.zeros(batch, 1, rows, rows, dtype=weight.dtype, device=weight.device)
        attention.masked_fill_(padded, float("-inf"))
        hidden = tower(features.to(weight), attention_mask=attention).last_hidden_state
        embeds = module.multi_modal_projector(hidden)
        return [
            Encoded(e[:n].contiguous(), {"num_tokens": n}) for e, n in zip(embeds, output_lengths.tolist(), strict=True)
        ]

    def embeddings_data(self, embeddings: list[torch.Tensor], items: list[ItemShape]) -> dict[str, Any]:
        """One [rows, hidden] tensor per clip, in prompt order (vLLM counts each clip's tokens from its rows)."""
        return {"audio": {"audio_embeds": list(embeddings)}}


def _output_lengths(mel_frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows after the encoder's strided convolution, and after its pooling (Qwen2-Audio's own arithmetic)."""
    after_conv = (mel_frames - 1) // 2 + 1
    return after_conv, (after_conv - 2) // 2 + 1


# ---- its tiny model (`mmgraph tiny-model`): random weights, built here ----

AUDIO_SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|audio_bos|>", "<|AUDIO|>", "<|audio_eos|>"]
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


def build_tiny(out: Path, seed: int, tower_seed: int | None, text_seed: int | None) -> None:
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
    sharpen_and_save(model, out, tower_parts, tower_seed, text_seed, ids["<|im_end|>"], ids["<|endoftext|>"])
    _as_qwen2_audio_checkpoint(out / "model.safetensors")
    processor = Qwen2AudioProcessor(
        feature_extractor=WhisperFeatureExtractor(feature_size=128),
        tokenizer=tokenizer,
        chat_template=AUDIO_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    AutoProcessor.from_pretrained(out)


def _as_qwen2_audio_checkpoint(path: Path) -> None:
    """Write the language model's tensors as Qwen's Qwen2-Audio checkpoints name them, which vLLM reads:
    `language_model.model.*`. transformers 5 saves them one `model.` level deeper."""
    rename_tensors(path, lambda name: name.replace("language_model.model.model.", "language_model.model.", 1))
