"""Operator input that would leak or break a request is refused where it comes in (``accounts add``,
``accounts import``, the admin API): a base URL with ``user:password@``, a secret or URL with a
space or control character. A proxy may carry its own login; it is masked wherever it is shown."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.api.test_errors import assert_error
from tests.cli.test_main import Cli, write
from tests.conftest import MASTER_KEY, run_stack

ADD = ["accounts", "add", "x", "--kind"]


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path, capsys)


@pytest.mark.parametrize(("args", "message"), [
    ([*ADD, "moonshot", "--api-key", "sk-abc\ndef0123456789"], "the secret has a space or a control character"),
    ([*ADD, "moonshot", "--api-key", "sk-abc\x00def0123456789"], "the secret has a space or a control character"),
    ([*ADD, "moonshot", "--api-key", "sk-abc def0123456789"], "the secret has a space or a control character"),
    ([*ADD, "moonshot", "--api-key", "sk-k", "--base-url", "https://me:hunter2@api.example/v1"],
     "bad base URL for account x 'https://***@api.example/v1': a user or password in it is not allowed"),
    ([*ADD, "moonshot", "--api-key", "sk-k", "--base-url", "https://token@api.example/v1"], "is not allowed"),
    ([*ADD, "moonshot", "--api-key", "sk-k", "--base-url", "https://api.example/v1\r\nX-Evil: 1"],
     "a space or a control character"),
    ([*ADD, "kimi-ai-chat", "--proxy", "http://proxy.example:3128/\n"], "a space or a control character"),
])
def test_a_secret_or_url_that_would_leak_or_break_requests_is_refused(cli: Cli, args: list[str],
                                                                      message: str) -> None:
    error = cli.fails(*args)
    assert message in error
    assert "hunter2" not in error
    assert cli.accounts() == []


def test_an_accounts_file_with_a_line_break_in_a_key_is_refused(cli: Cli, tmp_path: Path) -> None:
    path = write(tmp_path, '[[accounts]]\nname = "a"\nkind = "moonshot"\napi_key = "sk-live-0123\\nX-Injected: 1"\n')
    assert "account a: the secret has a space or a control character" in cli.fails("accounts", "import", path)


def test_a_proxy_may_carry_its_login_and_it_is_masked(cli: Cli) -> None:
    cli.ok(*ADD, "kimi-ai-chat", "--proxy", "http://egress:hunter2@proxy.example:3128")
    listed = cli.ok("accounts", "list", "--json")
    assert "http://***@proxy.example:3128" in listed and "hunter2" not in listed
    assert "hunter2" not in cli.ok("accounts", "list")


async def test_the_admin_api_refuses_them_with_the_field_named(tmp_path: Path) -> None:
    async with run_stack(tmp_path) as stack, httpx.AsyncClient(
            base_url=stack.url + "/admin", headers={"Authorization": f"Bearer {MASTER_KEY}"}) as admin:
        for body, param in (({"api_key": "sk-abc\ndef0123456789"}, "api_key"),
                            ({"api_key": "sk-k", "base_url": "https://me:hunter2@api.example/v1"}, "base_url")):
            refused = await admin.post("/accounts", json={"name": "x", "kind": "moonshot", **body})
            assert_error(refused, 400, "invalid_request_error", code="invalid_config", param=param)
            assert "hunter2" not in refused.text
            changed = await admin.patch("/accounts/acct-1", json=body)
            assert_error(changed, 400, "invalid_request_error", code="invalid_config", param=param)
        assert [a["name"] for a in (await admin.get("/accounts")).json()["data"]] == ["acct-1", "acct-2", "acct-3"]
