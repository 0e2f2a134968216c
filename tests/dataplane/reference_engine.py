"""The oracle: one in-process vLLM engine (no disaggregation, no HTTP) computing greedy tokens for prompts.

Run as a subprocess by the test session (`python reference_engine.py MODEL REQUESTS.json OUT.json`), so that its
in-process engine (VLLM_ENABLE_V1_MULTIPROCESSING=0) and its memory are gone once the references are known.
Each request: {"messages": [...OpenAI messages...], "max_tokens": N}. Images are data: URLs decoded with Pillow,
videos data: URLs sampled by mmgraph's own loader (8 frames: the engine is given the same frames as the
encoder, so this checks the pipeline, not the loader), audio (input_audio) loaded by mmgraph's loader at the
model's rate (input_audio, or audio_url data: URLs); the prompt is the model's own chat template with one
placeholder per item, exactly what the frontend builds.
"""

import base64
import io
import json
import os
import sys
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")


def main() -> None:
    model, requests_file, out_file = sys.argv[1:4]
    from PIL import Image
    from transformers import AutoTokenizer
    from vllm import LLM, SamplingParams

    from mmgraph_contract.graph import MediaSpec
    from mmgraph_workers.media.audio import decode_audio
    from mmgraph_workers.media.video import decode_video
    from mmgraph_workers.models import adapter_for

    tokenizer = AutoTokenizer.from_pretrained(model)
    family = adapter_for(model)
    audio_format = family.audio_format(family.load_processor())
    limits = {m: n for m, n in {"image": 8, "video": 2, "audio": 2}.items() if m in family.modalities}
    llm = LLM(
        model=model,
        dtype="float32",
        enforce_eager=True,
        block_size=32,
        max_model_len=1024,
        kv_cache_memory_bytes=64 << 20,
        limit_mm_per_prompt=limits,
    )
    prompts, params = [], []
    with open(requests_file) as f:
        requests = json.load(f)
    for request in requests:
        conversation, images, videos, audios = [], [], [], []
        for message in request["messages"]:
            content = message["content"]
            if isinstance(content, str):
                content = [{"type": "text", "text": content}]
            parts = []
            for part in content:
                if part["type"] == "image_url":
                    data = part["image_url"]["url"].split(",", 1)[1]
                    images.append(Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB"))
                    parts.append({"type": "image"})
                elif part["type"] == "video_url":
                    data = base64.b64decode(part["video_url"]["url"].split(",", 1)[1])
                    video = decode_video(data, MediaSpec(), 8)
                    videos.append((video.frames, video.metadata))
                    parts.append({"type": "video"})
                elif part["type"] in ("input_audio", "audio_url"):
                    inline = part.get("input_audio", {}).get("data")
                    data = base64.b64decode(inline or part["audio_url"]["url"].split(",", 1)[1])
                    audio = decode_audio(data, MediaSpec(), audio_format, time.monotonic() + 60)
                    audios.append((audio.samples, audio.rate))
                    parts.append({"type": "audio"})
                else:
                    parts.append(part)
            conversation.append({"role": message["role"], "content": parts})
        ids = tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=False)
        prompt = {"prompt_token_ids": list(ids)}
        media = {"image": images, "video": videos, "audio": audios}
        if images or videos or audios:
            prompt["multi_modal_data"] = {k: v if len(v) > 1 else v[0] for k, v in media.items() if v}
        prompts.append(prompt)
        params.append(SamplingParams(temperature=0, max_tokens=request["max_tokens"]))
    outputs = llm.generate(prompts, params, use_tqdm=False)
    with open(out_file, "w") as f:
        json.dump([list(o.outputs[0].token_ids) for o in outputs], f)


if __name__ == "__main__":
    main()
