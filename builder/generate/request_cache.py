"""The request cache: successful model replies in sqlite, keyed by everything that changes the output.

``RequestCache(path)`` is the router's store (the pipeline's :class:`~builder.generate.run_store.RunStore` extends
it with images and unit records). Every reply row records the run ``session`` that stored it and its
tokens, so what a run paid for can be counted where the replies are::

    cache = RequestCache("run/run.sqlite")
    cache.store(key, "gpt-4o", Reply("text", 120, 30))
    cache.lookup(key).cached, cache.usage()     # True, {"gpt-4o": (1, 120, 30)}
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid

from builder.generate.outcomes import Reply


class RequestCache:
    """Successful replies in sqlite (WAL): committed one by one, so a SIGKILL loses at most the call in flight.

    Each reply row records the run ``session`` that stored it and its tokens, so what a run paid for is
    counted where the replies are (:meth:`usage`), even when the process that sent a request is gone.
    ``marks`` holds small named facts (stage markers, an endpoint's lack of structured output).
    """

    def __init__(self, path, session: str | None = None):
        self.path = str(path)
        self.session = session or uuid.uuid4().hex
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        self._db = sqlite3.connect(self.path, timeout=60, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS requests (key TEXT PRIMARY KEY, model TEXT, reply TEXT)")
        have = {row[1] for row in self._db.execute("PRAGMA table_info(requests)")}
        for column, kind in (("session", "TEXT"), ("prompt_tokens", "INTEGER"), ("completion_tokens", "INTEGER")):
            if column not in have:  # a store written before these columns: its rows count as earlier runs'
                self._db.execute(f"ALTER TABLE requests ADD COLUMN {column} {kind}")
        self._db.execute("CREATE TABLE IF NOT EXISTS marks (name TEXT PRIMARY KEY, value TEXT)")

    def lookup(self, key: str) -> Reply | None:
        row = self._db.execute("SELECT reply, session FROM requests WHERE key = ?", (key,)).fetchone()
        if not row:
            return None
        stored = json.loads(row[0])
        return Reply(stored["text"], stored.get("prompt_tokens", 0), stored.get("completion_tokens", 0),
                     cached=True, reused=row[1] == self.session)

    def store(self, key: str, model: str, reply: Reply) -> None:
        stored = {"text": reply.text, "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens}
        self._db.execute("INSERT OR REPLACE INTO requests VALUES (?, ?, ?, ?, ?, ?)",
                         (key, model, json.dumps(stored), self.session, reply.prompt_tokens, reply.completion_tokens))

    def usage(self) -> dict[str, tuple[int, int, int]]:
        """model -> (replies, prompt tokens, completion tokens) stored during this session."""
        rows = self._db.execute("SELECT model, COUNT(*), SUM(prompt_tokens), SUM(completion_tokens) FROM requests "
                                "WHERE session = ? GROUP BY model", (self.session,)).fetchall()
        return {model: (n, p or 0, c or 0) for model, n, p, c in rows}

    def mark(self, name: str) -> str | None:
        row = self._db.execute("SELECT value FROM marks WHERE name = ?", (name,)).fetchone()
        return row[0] if row else None

    def set_mark(self, name: str, value: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO marks VALUES (?, ?)", (name, value))

    # The router awaits these, so a Ray actor can stand in for the file (see builder.generate.ray_executor).
    async def get(self, key: str) -> Reply | None:
        return self.lookup(key)

    async def put(self, key: str, model: str, reply: Reply) -> None:
        self.store(key, model, reply)

    async def get_mark(self, name: str) -> str | None:
        return self.mark(name)

    async def put_mark(self, name: str, value: str) -> None:
        self.set_mark(name, value)

    def close(self) -> None:
        self._db.close()
