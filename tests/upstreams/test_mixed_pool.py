"""One pool of all three kinds serving one model name through the catalogue's aliases."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

from app.clock import ManualClock
from app.emulator.kimi_ai_chat import KimiAiChatEmulatorConfig, create_kimi_ai_chat_emulator
from app.emulator.kimi_web import KimiWebEmulatorConfig, create_kimi_web_emulator
from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
from tests.conftest import reload, run_gateway, serve
from tests.test_sync import cli


async def test_a_mixed_pool_of_all_three_kinds_serves_one_alias(tmp_path: Path) -> None:
    clock = ManualClock()
    moonshot = create_moonshot_emulator(MoonshotEmulatorConfig.simple(keys=1), clock=clock)
    web = create_kimi_web_emulator(KimiWebEmulatorConfig.simple(1), clock=clock)
    chat = create_kimi_ai_chat_emulator(KimiAiChatEmulatorConfig(), clock=clock)
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(serve(app)) for app in (moonshot, web, chat)]
        [key] = sorted(moonshot.state.emulator.config.keys)
        token = web.state.emulator.token(web.state.emulator.config.users[0])
        toml = (f'[[accounts]]\nname = "m"\nkind = "moonshot"\napi_key = "{key}"\nbase_url = "{urls[0]}/v1"\n\n'
                f'[[accounts]]\nname = "w"\nkind = "kimi-web"\ntoken = "{token}"\nbase_url = "{urls[1]}"\n\n'
                f'[[accounts]]\nname = "c"\nkind = "kimi-ai-chat"\nbase_url = "{urls[2]}"\n')
        gateway = await stack.enter_async_context(run_gateway(tmp_path, toml, clock=clock))
        client = gateway.client()
        models = {m.id for m in (await client.models.list()).data}
        assert {"kimi-k2", "kimi-k2-0905-preview", "kimi-k2.5", "kimi-k2-instruct-0905"} <= models

        async def ask(i: int) -> str:
            response = await client.chat.completions.with_raw_response.create(
                model="kimi-k2", messages=[{"role": "user", "content": f"hello {i}"}])
            assert response.parse().choices[0].message.content
            return response.headers["x-kimi-pool-account"]

        served = [await ask(i) for i in range(6)]  # one after another: plain round robin
        assert sorted(served) == ["c", "c", "m", "m", "w", "w"]
        concurrent = await asyncio.gather(*(ask(i) for i in range(6)))
        assert set(concurrent) == {"c", "m", "w"}, "kimi-web takes one at a time; the others take the rest"
        assert moonshot.state.emulator.snapshot()["keys"][key]["requests"] >= 3
        assert web.state.emulator.stats.chat_requests >= 3
        assert {c.messages[0].scenario for c in web.state.emulator.chats.values()} <= {"SCENARIO_K2"}
        assert chat.state.emulator.stats.last_model == "moonshotai/Kimi-K2-Instruct-0905"

        # an alias made with the CLI reaches the running server
        assert await cli(gateway.db_url, "models", "alias", "house", "--moonshot", "kimi-k2-turbo-preview",
                         "--kimi-ai-chat", "kimi-k2-instruct") == 0
        await reload(gateway)
        served = await asyncio.gather(*(client.chat.completions.with_raw_response.create(
            model="house", messages=[{"role": "user", "content": "hi"}]) for _ in range(2)))
        assert sorted(r.headers["x-kimi-pool-account"] for r in served) == ["c", "m"]
        assert chat.state.emulator.stats.last_model == "moonshotai/Kimi-K2-Instruct"
