"""The model-adapter seam without an engine: the family comes from config.json, the encoder loads only what it
runs (and its memory shows it), and each family's encoder output equals transformers' own for the whole model."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mmgraph_workers.models import Llava, Qwen2VL, UnsupportedModel, adapter_for
from mmgraph_workers.tiny_model import build


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    # named after the OTHER family: the family must come from config.json, never from the name
    return {
        "qwen2-vl": build(root / "llava-looking-name", family="qwen2-vl"),
        "llava": build(root / "qwen-ish", family="llava"),
    }


def images() -> list[Image.Image]:
    rng = np.random.RandomState(3)
    return [Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8")) for w, h in ((96, 64), (64, 96), (112, 112))]


def test_the_family_comes_from_config_json(tiny):
    assert isinstance(adapter_for(str(tiny["qwen2-vl"])), Qwen2VL)
    assert isinstance(adapter_for(str(tiny["llava"])), Llava)


def test_an_unsupported_family_is_refused_naming_what_is_supported(tiny, tmp_path):
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(UnsupportedModel) as err:
        adapter_for(str(other))
    assert "GPT2LMHeadModel" in str(err.value)
    assert "qwen2-vl (Qwen2VLForConditionalGeneration" in str(err.value) and "llava (Llava" in str(err.value)


@pytest.mark.parametrize("family", ["qwen2-vl", "llava"])
def test_encoder_output_equals_transformers_whole_model(tiny, family):
    """The adapter's tower (+ projector), loaded alone, gives exactly the image features of the whole model."""
    from transformers import AutoModelForImageTextToText

    adapter = adapter_for(str(tiny[family]))
    processor = adapter.load_processor()
    ours = adapter.encode(adapter.load_encoder("cpu"), processor, "image", images())
    whole = AutoModelForImageTextToText.from_pretrained(tiny[family]).eval()
    inputs = processor.image_processor(images=images(), return_tensors="pt")
    with torch.no_grad():
        if family == "qwen2-vl":
            theirs = whole.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        else:
            theirs = whole.model.get_image_features(
                inputs["pixel_values"], vision_feature_layer=-2, vision_feature_select_strategy="default"
            )
    theirs = getattr(theirs, "pooler_output", theirs)
    assert len(ours) == len(theirs) == 3
    for item, reference in zip(ours, theirs, strict=True):
        assert torch.equal(item.embeddings, reference)
    if family == "qwen2-vl":
        assert [item.metadata["grid_thw"] for item in ours] == inputs["image_grid_thw"].tolist()


def test_a_bf16_checkpoint_encodes_as_transformers_does(tiny, tmp_path):
    """Parameters keep the checkpoint's dtype and computed buffers (rotary frequencies) stay float32, as in
    transformers' own loading: casting the whole tower would round them and move the embeddings."""
    from transformers import AutoModelForImageTextToText

    whole = AutoModelForImageTextToText.from_pretrained(tiny["qwen2-vl"]).to(torch.bfloat16)
    whole.save_pretrained(tmp_path / "bf16")
    for source in tiny["qwen2-vl"].iterdir():  # the processor and tokenizer, as they were
        if not (tmp_path / "bf16" / source.name).exists():
            (tmp_path / "bf16" / source.name).write_bytes(source.read_bytes())
    adapter = adapter_for(str(tmp_path / "bf16"))
    processor = adapter.load_processor()
    ours = adapter.encode(adapter.load_encoder("cpu"), processor, "image", images())
    whole = AutoModelForImageTextToText.from_pretrained(tmp_path / "bf16", dtype="auto").eval()
    inputs = processor.image_processor(images=images(), return_tensors="pt")
    with torch.no_grad():
        theirs = whole.model.get_image_features(inputs["pixel_values"].to(torch.bfloat16), inputs["image_grid_thw"])
    theirs = getattr(theirs, "pooler_output", theirs)
    assert ours[0].embeddings.dtype == torch.bfloat16
    for item, reference in zip(ours, theirs, strict=True):
        assert torch.equal(item.embeddings, reference)


def test_the_encoder_loads_only_the_tower_not_the_language_model(tmp_path):
    """A model whose language weights are ~400 MB and whose tower is ~1 MB: loading the encoder raises the
    process's peak RSS by far less than the language model (loading the whole model would add all of it)."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    config = Qwen2VLConfig(
        text_config={
            "vocab_size": 32000,
            "hidden_size": 1024,
            "intermediate_size": 2816,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "num_key_value_heads": 8,
            "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24], "rope_theta": 10000.0},
        },
        vision_config={"depth": 2, "embed_dim": 64, "hidden_size": 1024, "num_heads": 2, "mlp_ratio": 2},
        architectures=["Qwen2VLForConditionalGeneration"],
    )
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    language_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "visual" not in n)
    tower_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "visual" in n)
    model.save_pretrained(tmp_path / "big-text", safe_serialization=True)
    del model
    probe = textwrap.dedent(
        f"""
        import resource, torch, transformers  # imports first: they are not what is measured
        from mmgraph_workers.models import adapter_for
        adapter = adapter_for({str(tmp_path / "big-text")!r})
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        module = adapter.load_encoder("cpu")
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print((after - before) * 1024, next(module.parameters()).device)
        """
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300, check=True)
    grown, device = out.stdout.split()
    assert language_bytes > 350e6 and tower_bytes < 30e6
    assert int(grown) < 60e6, f"peak RSS grew {int(grown) / 1e6:.0f} MB loading a {tower_bytes / 1e6:.0f} MB tower"
    assert device == "cpu"


@pytest.mark.parametrize("family", ["qwen2-vl", "llava"])
def test_max_item_tokens_bounds_what_an_image_becomes(tiny, family):
    """The encoder sizes its transfer pool from `max_item_tokens`: no image within the pixel cap may become more
    rows than it says, whatever its shape."""
    adapter = adapter_for(str(tiny[family]))
    processor, module = adapter.load_processor(), adapter.load_encoder("cpu")
    for cap, shapes in ((2000 * 1500, [(2000, 1500), (1500, 2000), (56, 56)]), (100 * 100, [(100, 100), (99, 101)])):
        bound = adapter.max_item_tokens(processor, cap)  # the second cap is below the processor's own: sides round up
        encoded = [adapter.encode(module, processor, "image", [Image.new("RGB", size)])[0] for size in shapes]
        rows = [item.embeddings.shape[0] for item in encoded]
        assert max(rows) <= bound, (cap, rows, bound)


def clips(adapter, processor, seconds=(2.0, 0.7, 30.0)) -> list:
    import time

    from mmgraph_contract.graph import MediaSpec
    from mmgraph_workers.media.audio import decode_audio
    from mmgraph_workers.media.samples import tone

    fmt = adapter.audio_format(processor)
    return [decode_audio(tone(seconds=s), MediaSpec(), fmt, time.monotonic() + 30) for s in seconds]


def test_audio_encoder_output_equals_transformers_whole_model(tmp_path):
    """Qwen2-Audio's tower + projector, loaded alone and batched over clips of other lengths, gives transformers'
    whole model's audio features for each clip, its padding's rows dropped; 25 rows a second, 750 for 30 s."""
    from transformers import Qwen2AudioForConditionalGeneration
    from transformers.masking_utils import create_bidirectional_mask

    adapter = adapter_for(str(build(tmp_path / "audio", family="qwen2-audio")))
    processor = adapter.load_processor()
    audio = clips(adapter, processor)
    ours = adapter.encode(adapter.load_encoder("cpu"), processor, "audio", audio)
    whole = Qwen2AudioForConditionalGeneration.from_pretrained(tmp_path / "audio").eval()
    rows = [item.embeddings.shape[0] for item in ours]
    assert rows == [50, 17, 750] == [item.metadata["num_tokens"] for item in ours]
    assert adapter.max_audio_tokens(processor, 600) == 750 and adapter.max_audio_tokens(processor, 2.0) == 50
    for clip, item in zip(audio, ours, strict=True):
        inputs = processor.feature_extractor(
            clip.samples, sampling_rate=16000, return_attention_mask=True, padding="max_length", return_tensors="pt"
        )
        with torch.no_grad():
            lengths, rows = whole.model.audio_tower._get_feat_extract_output_lengths(inputs["attention_mask"].sum(-1))
            keep = (torch.arange(1500) < lengths).long()[None]
            mask = create_bidirectional_mask(
                config=whole.model.audio_tower.config, inputs_embeds=torch.zeros(1, 1500, 1), attention_mask=keep
            )
            hidden = whole.model.audio_tower(inputs["input_features"], attention_mask=mask).last_hidden_state
            theirs = whole.model.multi_modal_projector(hidden)[0, : int(rows)]
        torch.testing.assert_close(item.embeddings, theirs, rtol=0, atol=1e-5)
