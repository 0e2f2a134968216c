"""Model families, one module each (base.py is the interface). `adapter_for` picks one from the model's
`config.json` `architectures`; a model of another family is refused at start-up, naming what is supported."""

from __future__ import annotations

from mmgraph_workers.models.base import Encoded, ItemShape, ModelAdapter
from mmgraph_workers.models.llava import Llava
from mmgraph_workers.models.qwen2_audio import Qwen2Audio
from mmgraph_workers.models.qwen2_vl import Qwen2VL

FAMILIES: tuple[type[ModelAdapter], ...] = (Qwen2VL, Llava, Qwen2Audio)
__all__ = ["FAMILIES", "Encoded", "ItemShape", "ModelAdapter", "UnsupportedModel", "adapter_for", "supported"]


class UnsupportedModel(ValueError):
    pass


def supported() -> str:
    return "; ".join(f"{f.family} ({', '.join(f.architectures)})" for f in FAMILIES)


def adapter_for(model: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelAdapter:
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model, revision=revision, trust_remote_code=trust_remote_code)
    architectures = list(getattr(config, "architectures", None) or [])
    for family in FAMILIES:
        if any(a in family.architectures for a in architectures):
            config.architectures = [a for a in architectures if a in family.architectures]
            return family(model, config, revision, trust_remote_code)
    raise UnsupportedModel(
        f"{model}: architectures {architectures or '(none in config.json)'} are not supported; mmgraph serves: "
        f"{supported()}"
    )
