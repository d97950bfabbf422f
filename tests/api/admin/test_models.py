"""``/admin/models``: an alias no account would serve is refused unless forced, and flagged in the catalogue."""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.api.test_errors import assert_error
from tests.conftest import MASTER_KEY, run_stack


async def test_an_alias_no_account_serves_is_refused_unless_forced_and_then_flagged(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, httpx.AsyncClient(
            base_url=stack.url + "/admin", headers={"Authorization": f"Bearer {MASTER_KEY}"}) as admin:
        refused = await admin.put("/models/fast", json={"moonshot": "kimi-k9-turbo"})
        assert_error(refused, 400, "invalid_request_error", param="moonshot")
        assert refused.json()["error"]["message"] == (
            "alias fast: no account serves it (moonshot accounts do not offer kimi-k9-turbo); see what is served "
            "with 'kimi-pool models list', or give \"force\": true to keep the alias anyway")
        assert (await admin.get("/models/fast")).status_code == 404, "nothing was stored"
        assert_error(await admin.put("/models/fast", json={"moonshot": "kimi-k9-turbo", "force": "yes"}), 400,
                     "invalid_request_error", param="force")

        forced = await admin.put("/models/fast", json={"moonshot": "kimi-k9-turbo", "force": True})
        assert forced.status_code == 201, forced.text
        assert forced.json()["warning"] == "no account serves it (moonshot accounts do not offer kimi-k9-turbo)"
        models = {m.id async for m in stack.client().models.list()}
        assert "fast" not in models

        # the upstream starts serving it: the alias is served after the next refresh, and no longer flagged
        stack.emulator.configure({"models": ["kimi-k3", "kimi-k9-turbo:262144:none"]})
        discovery = stack.app.state.discovery
        runs = discovery.runs
        stack.clock.advance(stack.gateway.settings.models_refresh)
        await discovery.wait_runs(runs + 1)
        entry = (await admin.get("/models/fast")).json()
        assert entry["warning"] is None and entry["accounts"] == [f"acct-{i} as kimi-k9-turbo" for i in (1, 2, 3)]
        assert "fast" in {m.id async for m in stack.client().models.list()}
