"""Lua scripts from ``scripts/lua/``: read once, loaded into Redis once, called by SHA.

A Redis that restarted has forgotten its scripts; :meth:`Scripts.call` reloads on NOSCRIPT and
retries once, and :meth:`Scripts.call_in` lets a pipeline carry EVALSHA calls that the caller
retries the same way.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError

from hub.redis_client import load_scripts

SCRIPTS_DIR = Path(__file__).resolve().parent.parent / "scripts" / "lua"


@dataclass(frozen=True)
class Script:
    name: str
    source: str
    sha: str


_INCLUDE = re.compile(r"^--! include ([a-z_]+)$", re.MULTILINE)


def _expand(source: str, library: Path) -> str:
    """Replace each ``--! include NAME`` line with ``lib/NAME.lua`` (Redis scripts cannot import)."""
    return _INCLUDE.sub(lambda m: (library / f"{m.group(1)}.lua").read_text(encoding="utf-8").rstrip("\n"), source)


def read_scripts(directory: Path = SCRIPTS_DIR) -> dict[str, Script]:
    """Every ``*.lua`` operation script of ``directory`` (libraries in ``lib/`` are only included)."""
    scripts = {}
    for path in sorted(directory.glob("*.lua")):
        source = _expand(path.read_text(encoding="utf-8"), directory / "lib")
        scripts[path.stem] = Script(path.stem, source, hashlib.sha1(source.encode()).hexdigest())
    if not scripts:
        raise FileNotFoundError(f"no Lua scripts in {directory}")
    return scripts


class Scripts:
    def __init__(self, redis: Redis, directory: Path = SCRIPTS_DIR) -> None:
        self.redis = redis
        self.by_name = read_scripts(directory)

    async def load(self) -> None:
        """SCRIPT LOAD every script (idempotent), on every master of a Redis Cluster."""
        await load_scripts(self.redis, [script.source for script in self.by_name.values()])

    async def call(self, name: str, keys: list[str], args: list[Any]) -> Any:
        script = self.by_name[name]
        try:
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            await self.load()
            return await self.redis.evalsha(script.sha, len(keys), *keys, *args)

    def call_in(self, pipe: Pipeline, name: str, keys: list[str], args: list[Any]) -> None:
        """Queue an EVALSHA on ``pipe``; a NoScriptError result means: load() and retry."""
        script = self.by_name[name]
        # (Not pipe.evalsha: redis-py's cluster pipeline refuses that method, but routes this by the keys.)
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
