"""The one place that names the adapters: kind → adapter instance."""

from __future__ import annotations

import aiohttp

from app.clock import Clock
from app.errors import ConfigError
from app.upstreams.base import Upstream
from app.upstreams.kimi_ai_chat import KimiAiChatUpstream
from app.upstreams.kimi_web import KimiWebUpstream
from app.upstreams.moonshot import MoonshotUpstream


class Registry:
    def __init__(self, adapters: dict[str, Upstream]) -> None:
        self._adapters = adapters

    @classmethod
    def default(cls, session: aiohttp.ClientSession, clock: Clock) -> Registry:
        return cls({
            "moonshot": MoonshotUpstream(session, clock),
            "kimi-web": KimiWebUpstream(session, clock),
            "kimi-ai-chat": KimiAiChatUpstream(session, clock),
        })

    def get(self, kind: str) -> Upstream:
        try:
            return self._adapters[kind]
        except KeyError:
            raise ConfigError(f"no adapter for account kind {kind!r} in this build") from None

    async def close(self) -> None:
        for adapter in self._adapters.values():
            await adapter.close()
