"""Reading what a model wrote: the JSON object in a reply, the reply without its echo of the prompt, and a
server's message without any API key in it.

Example::

    parse_json_reply('Sure! ```json\\n{"better": "A", "reason": "declines"}\\n```', ("better",))  # {"better": "A", ...}
    strip_echo(reply_text, prompt)            # a server that echoes the request gives "" here, not the prompt
    redact("Incorrect API key provided: sk-abc***xyz", key)   # 'Incorrect API key provided: [key redacted]'
"""

from __future__ import annotations

import json
import re

# What looks like an API key in a server's message (OpenAI quotes a masked key in its 401): never shown.
KEYLIKE = re.compile(r"\b(?:sk|hf|pk|rk|gsk|api[_-]?key)[-_][A-Za-z0-9*._-]{6,}", re.I)


def parse_json_reply(text: str, keys: tuple[str, ...]) -> dict | None:
    """The first JSON object in ``text`` that has all ``keys``: tolerant of code fences and prose around it."""
    for match in re.finditer(r"\{", text):
        try:
            obj, _ = json.JSONDecoder().raw_decode(text[match.start():])
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict) and all(k in obj for k in keys):
            return obj
    return None


def strip_echo(reply: str, prompt: str) -> str:
    """``reply`` without the lines it repeats from ``prompt``: a server that echoes the request (or a model
    that restates its instructions) must not have the prompt's own example read as its answer."""
    said = {line.strip() for line in prompt.splitlines() if line.strip()}
    kept = "\n".join(line for line in reply.splitlines() if line.strip() not in said)
    for line in sorted((s for s in said if len(s) >= 20), key=len, reverse=True):  # echoes with other line breaks
        kept = kept.replace(line, "")
    return kept.strip()


def redact(text: str, *secrets: str | None) -> str:
    """``text`` without the given secrets and without anything shaped like an API key."""
    for secret in secrets:
        if secret and len(secret) >= 6:
            text = text.replace(secret, "[key redacted]")
    return KEYLIKE.sub("[key redacted]", text)
