"""The router's in-process backend: a request to a local VLM folder (``backend: transformers``).

The model is loaded once per folder (:func:`builder.vlm.local.load_local_vlm`) and runs in a worker
thread, so the event loop keeps serving the other requests. A request with ``choices`` is answered by
probability (the reply is the JSON ``{"choice": ..., "probabilities": [...]}``); any other is generated::

    reply = await local_reply(spec, [{"role": "user", "content": [image_part(sha), {"type": "text", "text": "Describe it."}]}],
                              {sha: jpeg_bytes}, {"max_tokens": 64})
"""

from __future__ import annotations

import asyncio
import io
import json

from builder.errors import DataError
from builder.generate.model_spec import ModelSpec
from builder.generate.outcomes import Reply


def _local_messages(messages: list[dict], images: dict[str, bytes]) -> tuple[list[dict], list]:
    """The messages with each image part as a bare ``{"type": "image"}``, and the images as RGB PIL images in order."""
    from PIL import Image

    pil, local_msgs = [], []
    for msg in messages:
        content = msg["content"]
        if isinstance(content, list):
            parts = []
            for p in content:
                if p.get("type") == "image":
                    pil.append(Image.open(io.BytesIO(images[p["sha256"]])).convert("RGB"))
                    parts.append({"type": "image"})
                else:
                    parts.append(p)
            content = parts
        local_msgs.append({**msg, "content": content})
    return local_msgs, pil


async def local_reply(spec: ModelSpec, messages: list[dict], images: dict[str, bytes], params: dict) -> Reply:
    """One request to the local model of ``spec``; a model that does not load is a config error (DataError)."""
    from builder.vlm.local import load_local_vlm

    try:
        vlm = await asyncio.to_thread(load_local_vlm, spec.path)
    except Exception as exc:  # noqa: BLE001 - every request to it would fail the same way: a config error
        raise DataError(f"cannot load the model: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}",
                        field=f"models.{spec.name}.path") from None
    local_msgs, pil = _local_messages(messages, images)
    if "choices" in params:
        probs = await asyncio.to_thread(vlm.choice_probabilities, local_msgs, pil, params["choices"])
        best = max(range(len(probs)), key=probs.__getitem__)
        return Reply(json.dumps({"choice": params["choices"][best], "probabilities": [round(p, 6) for p in probs]}))
    gen = await asyncio.to_thread(
        vlm.generate, local_msgs, pil, max_new_tokens=params.get("max_tokens", 128),
        temperature=params.get("temperature", 0.0), seed=params.get("seed", 0),
        min_new_tokens=params.get("min_tokens", 1))
    return Reply(gen.text, gen.prompt_tokens, gen.completion_tokens)
