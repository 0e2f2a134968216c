"""The model-adapter interface: everything a stage must know about one model family, and nothing else.

A family is one module in this package, chosen from the model's `config.json` (`architectures`), never from its
name. The stages, the inter-stage protocol and the frontend stay family-agnostic; each calls only this:

    stage    call                                  what the family decides
    encoder  load_encoder(device)                  which weights form the encoder (tower, projector), loaded
                                                   alone onto the stage's device: never the language model
    encoder  encoder_settings()                    what besides weights changes its output (for content keys)
    encoder  processor_settings(processor)         the same, of the processor (resizing, features)
    both     audio_format(processor)               the rate and longest clip audio is loaded for (audio)
    encoder  prepare_item(processor, modality, m)  the processor's tensors for one decoded item (or ValueError):
                                                   prepare (image), prepare_video, prepare_audio
    encoder  max_tokens(processor, policy)         the most rows one item the graph's caps allow can become
                                                   (max_item_tokens, max_video_tokens, max_audio_tokens)
    encoder  forward(module, prepared)             tower (+ projector) over prepared items -> per item:
                                                   embeddings as the language model consumes them, and the
                                                   metadata the engine needs to place them (Qwen's grid),
                                                   which travels in `EncodedItem.metadata`
    pd       embeddings_data(embeddings, items)    vLLM's `multi_modal_data` from real embeddings
    decode   placeholder_data(items, hidden, dtype) the same shape filled with zeros: decode never computes them
                                                   (the KV comes over NIXL), but positions and token counts
                                                   depend on the metadata

A family implements the calls of the modalities it takes (`modalities`); the others refuse with ValueError.
The frontend needs nothing from a family: the model's chat template renders one placeholder per media part and
vLLM expands it from the metadata. Weights come from the model's safetensors (a local directory, or the Hugging
Face Hub, where only the shards holding the encoder's weights are fetched).
"""

from __future__ import annotations

import contextlib
import json
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from mmgraph_workers.media.audio import AudioFormat


@dataclass(frozen=True)
class Encoded:
    """One media item after the encoder: [tokens, hidden] embeddings and the family's metadata for the engine."""

    embeddings: torch.Tensor
    metadata: dict[str, Any]


@dataclass(frozen=True)
class ItemShape:
    """What an engine knows of an item it receives as embeddings or as a placeholder."""

    num_tokens: int
    metadata: dict[str, Any]
    modality: str = "image"


class ModelAdapter(ABC):
    """One model family. Subclasses name the `architectures` they serve and implement the calls above."""

    family: ClassVar[str]
    architectures: ClassVar[tuple[str, ...]]
    modalities: ClassVar[tuple[str, ...]] = ("image",)
    # the tiny models (`mmgraph tiny-model --family NAME`) its module's `build_tiny` makes, with their arguments
    tiny: ClassVar[dict[str, dict[str, str]]] = {}

    def __init__(self, model: str, config: Any, revision: str | None = None, trust_remote_code: bool = False):
        self.model, self.config, self.revision, self.trust_remote_code = model, config, revision, trust_remote_code

    def load_processor(self) -> Any:
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(
            self.model, revision=self.revision, trust_remote_code=self.trust_remote_code
        )

    @abstractmethod
    def load_encoder(self, device: str) -> torch.nn.Module:
        """The encoder's module (tower and projector) with the checkpoint's weights and dtype, on `device`."""

    def encoder_settings(self) -> dict[str, Any]:
        """Everything besides weights and the processor that changes the encoder's output (content_key.py):
        the vision tower's config; families add how features are selected and projected."""
        return {"family": self.family, "vision_config": self.config.vision_config.to_dict()}

    def processor_settings(self, processor: Any) -> dict[str, Any]:
        """The processor's settings that change the encoder's output (content_key.py)."""
        settings = {"processor": processor.image_processor.to_dict()}
        if "video" in self.modalities:
            settings["video_processor"] = processor.video_processor.to_dict()
        return settings

    def audio_format(self, processor: Any) -> AudioFormat | None:
        """The sampling rate audio is loaded at and the longest clip the model takes (None: it takes no audio)."""
        return None

    def prepare_item(self, processor: Any, modality: str, media: Any) -> Any:
        """One decoded item (media/load.py) as the tower takes it; ValueError if the processor refuses it (an
        aspect ratio it cannot tile, a modality the family lacks). The encoder runs this per item, off the tower's
        thread, so a bad item is refused before any pass, alone."""
        if modality not in self.modalities:
            raise ValueError(f"the {self.family} family takes no {modality}")
        prepare = {"image": self.prepare, "video": self.prepare_video, "audio": self.prepare_audio}[modality]
        return prepare(processor, media)

    def prepare(self, processor: Any, image: Any) -> Any:
        """One image as the tower takes it (the processor's tensors)."""
        raise ValueError(f"the {self.family} family takes no image")

    def prepare_video(self, processor: Any, video: Any) -> Any:
        """A video's sampled frames (media/video.py's Video) as the tower takes them."""
        raise ValueError(f"the {self.family} family takes no video")

    def prepare_audio(self, processor: Any, audio: Any) -> Any:
        """A clip (media/audio.py's Audio, at `audio_format`'s rate) as the tower takes it."""
        raise ValueError(f"the {self.family} family takes no audio")

    def max_tokens(self, processor: Any, policy: Any) -> int:
        """The most embedding rows one item the graph's caps (MediaPolicy) allow can become, over the modalities
        the graph and the family both take: it sizes the encoder's transfer pool."""
        rows = {
            "image": lambda: self.max_item_tokens(processor, policy.max_pixels),
            "video": lambda: self.max_video_tokens(processor, policy.max_pixels, policy.video_frames),
            "audio": lambda: self.max_audio_tokens(processor, policy.max_seconds),
        }
        return max([rows[m]() for m in policy.modalities if m in self.modalities] or [1])

    def max_item_tokens(self, processor: Any, max_pixels: int) -> int:
        """The most embedding rows one image can become, given the graph's pixel cap."""
        return 0

    def max_video_tokens(self, processor: Any, max_pixels: int, frames: int) -> int:
        """The most embedding rows one video of `frames` frames can become."""
        return 0

    def max_audio_tokens(self, processor: Any, max_seconds: float) -> int:
        """The most embedding rows one clip of at most `max_seconds` (the graph's cap) can become."""
        return 0

    @abstractmethod
    def forward(self, module: torch.nn.Module, prepared: list[Any]) -> list[Encoded]:
        """Embeddings and metadata per prepared item, in order, in one pass of the tower (and projector)."""

    def encode(self, module: torch.nn.Module, processor: Any, modality: str, items: list[Any]) -> list[Encoded]:
        """`prepare_item` then `forward`: what transformers' whole model computes for these items."""
        return self.forward(module, [self.prepare_item(processor, modality, item) for item in items])

    @abstractmethod
    def embeddings_data(self, embeddings: list[torch.Tensor], items: list[ItemShape]) -> dict[str, Any]:
        """vLLM's `multi_modal_data` for real embeddings (pd)."""

    def placeholder_data(self, items: list[ItemShape], hidden_size: int, dtype: torch.dtype) -> dict[str, Any]:
        """vLLM's `multi_modal_data` for placeholders (decode): zeros of the shapes real embeddings would have."""
        zeros = [torch.zeros(item.num_tokens, hidden_size, dtype=dtype) for item in items]
        return self.embeddings_data(zeros, items)

    def _load(self, module: torch.nn.Module, prefixes: dict[str, str], device: str) -> torch.nn.Module:
        """Fill `module` (built under `skeleton()`) with the checkpoint tensors under `prefixes` (checkpoint
        prefix -> module prefix) and nothing else, then move it to `device`."""
        state = read_weights(self.model, self.revision, prefixes)
        missing = set(module.state_dict()) - set(state)
        if missing:
            raise RuntimeError(
                f"{self.model}: the checkpoint has no {sorted(missing)[:3]}... for the {self.family} encoder "
                f"(looked under {sorted(prefixes)})"
            )
        module.load_state_dict(state, strict=True, assign=True)
        # parameters keep the checkpoint's dtype; computed buffers (rotary frequencies) stay float32, as in
        # transformers and vLLM: casting the whole module would round them
        return module.to(device=device).eval()


@contextlib.contextmanager
def skeleton() -> Iterator[None]:
    """Build a module without initialising its weights (the checkpoint's replace them): parameters are allocated
    on the CPU but not filled, so building costs the tower's size once and no random-number work; buffers that
    are computed, not stored (rotary frequencies), are computed as usual."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    with no_init_weights():
        yield


def read_weights(model: str, revision: str | None, prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors checkpoint whose names start with one of `prefixes`, renamed. Only those
    tensors are read (and, from the Hub, only the shards that hold them are fetched)."""
    from safetensors import safe_open

    def matches(name: str) -> str | None:
        for prefix, to in prefixes.items():
            if name.startswith(prefix):
                return to + name[len(prefix) :]
        return None

    index = _file(model, revision, "model.safetensors.index.json", required=False)
    if index is not None:
        weight_map: dict[str, str] = json.loads(Path(index).read_text())["weight_map"]
        shards = sorted({shard for name, shard in weight_map.items() if matches(name)})
    else:
        shards = ["model.safetensors"]
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        path = _file(model, revision, shard, required=True)
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                target = matches(name)
                if target is not None:
                    state[target] = f.get_tensor(name)
    return state


def _file(model: str, revision: str | None, name: str, required: bool) -> Path | None:
    local = Path(model)
    if local.is_dir():
        path = local / name
        if path.exists() or not required:
            return path if path.exists() else None
        raise FileNotFoundError(f"{path} is missing: the encoder reads the model's safetensors")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        return Path(hf_hub_download(model, name, revision=revision))
    except EntryNotFoundError:
        if required:
            raise
        return None
