"""`mmgraph tiny-model DIR [--family qwen2-vl|qwen2.5-vl|llava|qwen2-audio]`: a tiny model of a supported family
with random weights, built locally with no download: a real transformers model (config, safetensors weights, a
tokenizer trained here with the family's special tokens and chat template, its image, video or audio processor),
small enough to load in seconds on a CPU and to run through vLLM. Each family builds its own (`build_tiny` in its
module under models/; models/tiny.py holds what they share); this module picks one by name.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

SEED = 1234


def families() -> dict[str, tuple[object, dict]]:
    """Tiny model name -> (the family's builder, its arguments): the adapters' `tiny` names (imported when asked:
    `mmgraph` itself must not import torch)."""
    from mmgraph_workers.models import FAMILIES

    builders = {family: importlib.import_module(family.__module__).build_tiny for family in FAMILIES}
    return {name: (builders[family], args) for family in FAMILIES for name, args in family.tiny.items()}


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
    known = families()
    if family not in known:
        raise ValueError(f"no tiny model for family {family!r}; families: {', '.join(known)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    builder, args = known[family]
    builder(out, seed, vision_seed, text_seed, **args)
    (out / "mmgraph-tiny.json").write_text(
        json.dumps({"family": family, "seed": seed, "vision_seed": vision_seed, "text_seed": text_seed})
    )
    return out


def ensure(path: str | Path, family: str = "qwen2-vl") -> Path:
    """Build the tiny model at `path` unless one is already there (what `mmgraph up` calls)."""
    path = Path(path)
    if not (path / "config.json").exists() or not (path / "mmgraph-tiny.json").exists():
        build(path, family=family)
    return path
