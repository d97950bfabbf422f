"""``kimi-pool models`` and the kimi-web and kimi-ai-chat sides of ``accounts``, on real SQLite files."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jwt
import pytest

from tests.cli.test_main import Cli, write

SIGNING_KEY = "a-signing-key-kimi-pool-does-not-have-" * 2


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path, capsys)


def kimi_token(expires_in: float) -> str:
    now = int(time.time())
    claims = {"iss": "user-center", "typ": "access", "app_id": "kimi", "sub": "user-0000000000000001",
              "iat": now, "exp": now + int(expires_in)}
    return jwt.encode(claims, SIGNING_KEY, algorithm="HS512")


def test_aliases_are_listed_with_the_accounts_that_serve_them(cli: Cli) -> None:
    cli.ok("accounts", "add", "m", "--kind", "moonshot", "--api-key", "sk-test-0123456789abcdef", "--no-discover")
    cli.ok("accounts", "add", "c", "--kind", "kimi-ai-chat")
    out = cli.ok("models", "alias", "fast", "--moonshot", "kimi-k2-turbo-preview", "--kimi-ai-chat", "kimi-k2-instruct")
    assert out == "alias fast created: kimi-ai-chat as kimi-k2-instruct, moonshot as kimi-k2-turbo-preview\n"
    views = {v["model"]: v for v in json.loads(cli.ok("models", "list", "--json"))}
    assert views["fast"]["accounts"] == ["m as kimi-k2-turbo-preview", "c as kimi-k2-instruct"]
    assert views["kimi-k2"]["accounts"] == ["m as kimi-k2-0905-preview", "c as kimi-k2-instruct-0905"]
    assert views["kimi-k2-instruct"]["accounts"] == ["c"] and views["kimi-k2-instruct"]["alias"] is None
    table = cli.ok("models", "list")
    assert "fast" in table and "m as kimi-k2-turbo-preview" in table


def test_unalias_removes_an_alias_and_hides_a_builtin_one(cli: Cli) -> None:
    cli("models", "alias", "fast", "--moonshot", "kimi-k2-turbo-preview", "--force")  # no account serves it yet
    assert cli.ok("models", "unalias", "fast") == "removed alias fast\n"
    assert cli.ok("models", "unalias", "kimi-k2") == "removed alias kimi-k2\n"
    names = {v["model"] for v in json.loads(cli.ok("models", "list", "--json"))}
    assert not names & {"fast", "kimi-k2"}
    assert cli.fails("models", "unalias", "fast") == "no alias named fast"


def test_alias_mistakes_are_one_line(cli: Cli) -> None:
    assert cli.fails("models", "alias", "x") == "give at least one of --moonshot, --kimi-web, --kimi-ai-chat"
    assert "bad alias name" in cli.fails("models", "alias", "bad name", "--moonshot", "kimi-k2.5")


def test_accounts_file_aliases_are_imported(cli: Cli, tmp_path: Path) -> None:
    path = write(tmp_path, '[aliases.k2]\nmoonshot = "kimi-k2-0905-preview"\n')
    assert cli.ok("accounts", "import", path) == f"imported {path}: 0 created, 0 updated, 0 unchanged; 1 alias(es)\n"
    views = {v["model"]: v for v in json.loads(cli.ok("models", "list", "--json"))}
    assert views["k2"]["alias"] == {"moonshot": "kimi-k2-0905-preview"}


def test_a_kimi_web_account_shows_when_its_token_lapses(cli: Cli) -> None:
    token = kimi_token(30 * 86400)
    out = cli.ok("accounts", "add", "web", "--kind", "kimi-web", "--token", token)
    assert out.startswith("added account web (kimi-web, token expires ") and out.endswith("(in 29d))\n")
    [view] = cli.accounts()
    assert abs(view["token_expires"] - (time.time() + 30 * 86400)) < 60  # type: ignore[operator]
    table = cli.ok("accounts", "list")
    assert "(in 29d)" in table and token not in table + json.dumps(view)


def test_expired_and_malformed_kimi_web_tokens_are_refused(cli: Cli, tmp_path: Path) -> None:
    expired = kimi_token(-3600)
    message = cli.fails("accounts", "add", "web", "--kind", "kimi-web", "--token", expired)
    assert message.startswith("account web: the kimi-web token expired on ") and expired not in message
    assert "is not a JWT" in cli.fails("accounts", "add", "web", "--kind", "kimi-web", "--token", "abc.def")
    path = write(tmp_path, f'[[accounts]]\nname = "web"\nkind = "kimi-web"\ntoken = "{expired}"\n')
    assert "the kimi-web token expired" in cli.fails("accounts", "import", path)
    assert cli.accounts() == []


def test_kind_options_on_the_command_line(cli: Cli) -> None:
    cli.ok("accounts", "add", "c", "--kind", "kimi-ai-chat", "--max-message-chars", "4000")
    cli.ok("accounts", "add", "web", "--kind", "kimi-web", "--token", kimi_token(86400 * 10), "--keep-chats")
    options = {v["name"]: v["options"] for v in cli.accounts()}
    assert options == {"c": {"max_message_chars": 4000}, "web": {"keep_chats": True}}
    assert cli.fails("accounts", "add", "m", "--kind", "moonshot", "--api-key", "sk-test-0123456789abcdef",
                     "--keep-chats") == "account m: option keep_chats is for kimi-web accounts, not moonshot"


def test_an_alias_to_a_model_no_account_offers_is_refused_unless_forced(cli: Cli) -> None:
    cli.ok("accounts", "add", "c", "--kind", "kimi-ai-chat")
    assert cli.fails("models", "alias", "chat", "--kimi-ai-chat", "kimi-k2-instruct-0999") == (
        "alias chat: no account serves it (kimi-ai-chat accounts do not offer kimi-k2-instruct-0999); see what is "
        f"served with 'kimi-pool models list', or give --force to keep the alias anyway (database {cli.path})")
    assert "chat" not in {v["model"] for v in json.loads(cli.ok("models", "list", "--json"))}
    assert cli.fails("models", "alias", "web", "--kimi-web", "kimi-k2.6").startswith(
        "alias web: no account serves it (no kimi-web account)")

    code, out, err = cli("models", "alias", "chat", "--kimi-ai-chat", "kimi-k2-instruct-0999", "--force")
    assert (code, out) == (0, "alias chat created: kimi-ai-chat as kimi-k2-instruct-0999\n")
    assert err == ("kimi-pool: warning: alias chat: no account serves it (kimi-ai-chat accounts do not offer "
                   "kimi-k2-instruct-0999)\n")
    # served by one kind, stale for another: accepted, with a warning
    code, out, err = cli("models", "alias", "k2", "--kimi-ai-chat", "kimi-k2-instruct", "--kimi-web", "kimi-k2")
    assert code == 0 and err == ""
    assert cli.ok("models", "alias", "k2", "--kimi-ai-chat", "kimi-k2-instruct") == \
        "alias k2 updated: kimi-ai-chat as kimi-k2-instruct\n"


def test_models_list_flags_aliases_no_account_serves(cli: Cli) -> None:
    cli.ok("accounts", "add", "c", "--kind", "kimi-ai-chat")
    cli("models", "alias", "chat", "--kimi-ai-chat", "kimi-k2-instruct-0999", "--force")
    views = {v["model"]: v for v in json.loads(cli.ok("models", "list", "--json"))}
    assert views["chat"]["warning"] == \
        "no account serves it (kimi-ai-chat accounts do not offer kimi-k2-instruct-0999)"
    assert views["kimi-k2"]["warning"] is None, "served by the kimi-ai-chat account; no other kind in the pool"
    assert views["kimi-k2-thinking"]["warning"] == "no account serves it (no moonshot or kimi-web account)"
    assert views["kimi-k2-instruct"]["warning"] is None
    table = cli.ok("models", "list")
    assert "warning" in table.splitlines()[1] and "no account serves it" in table
