"""`mmgraph up --demo`'s request: one real image (or clip) through the graph's OpenAI API, its answer printed."""

from __future__ import annotations

import base64
import io
import json
import time
import urllib.request


def demo_image() -> str:
    """A small synthetic picture as a data: URL (no network needed)."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (96, 64), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle((8, 8, 40, 56), fill="red")
    draw.ellipse((52, 12, 88, 48), fill="blue")
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def demo_part(modalities: list[str]) -> tuple[dict, str]:
    """The demo's media part for a graph that takes `modalities` (an image where it can), and what it is."""
    if "image" in modalities:
        return {"type": "image_url", "image_url": {"url": demo_image()}}, "one 96x64 PNG"
    from mmgraph_workers.media.samples import clip, tone

    if "audio" in modalities:
        data = base64.b64encode(tone(seconds=2.0)).decode()
        return {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}, "a 2 s 16 kHz WAV"
    url = "data:video/mp4;base64," + base64.b64encode(clip(seconds=2.0)).decode()
    return {"type": "video_url", "video_url": {"url": url}}, "a 2 s 160x96 MP4"


def send_demo_request(endpoint: str, model: str, modalities: list[str]) -> None:
    part, what = demo_part(modalities)
    kind = part["type"].removesuffix("_url").removeprefix("input_")
    body = {
        "model": model,
        "messages": [{"role": "user", "content": [part, {"type": "text", "text": f"describe this {kind}"}]}],
        "max_tokens": 16,
        "temperature": 0,
        "stream": True,
    }
    request = urllib.request.Request(
        f"{endpoint}/v1/chat/completions", data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    print(f"\n> POST {endpoint}/v1/chat/completions  ({what} + 'describe this {kind}', greedy, 16 tokens)")
    started, first, text = time.perf_counter(), None, []
    with urllib.request.urlopen(request, timeout=120) as response:
        for raw in response:
            line = raw.decode().strip()
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            piece = (chunk["choices"][0]["delta"].get("content") or "") if chunk["choices"] else ""
            if piece and first is None:
                first = time.perf_counter() - started
            text.append(piece)
    total = time.perf_counter() - started
    print(f"< {''.join(text)!r}")
    print(f"  time to first token {1000 * (first or total):.0f} ms, total {1000 * total:.0f} ms")
    print("  (random weights: the words are noise; the point is that every stage ran and agreed)")
