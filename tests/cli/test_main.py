"""The command line, run in-process on real SQLite files: good paths, and one line per mistake."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from pathlib import Path

import pytest

from app.cli import run
from app.store.db import SCHEMA_HEAD, Database
from app.store.repository import AccountRepository, hash_key

SECRET = "sk-live-0123456789abcdefSECRET"


class Cli:
    def __init__(self, tmp_path: Path, capsys: pytest.CaptureFixture[str], *, create: bool = True) -> None:
        """``create``: make the database first (``db upgrade``), as an operator would before any command."""
        self.path = tmp_path / "data" / "kimi-pool.db"
        self.url = f"sqlite+aiosqlite:///{self.path}"
        self._capsys = capsys
        if create:
            assert run(["--db", self.url, "db", "upgrade"]) == 0
            capsys.readouterr()

    def __call__(self, *args: str, db: bool = True) -> tuple[int, str, str]:
        code = run([*(["--db", self.url] if db else []), *args])
        out, err = self._capsys.readouterr()
        return code, out, err

    def ok(self, *args: str) -> str:
        code, out, err = self(*args)
        assert (code, err) == (0, ""), err
        return out

    def fails(self, *args: str, code: int = 1, db: bool = True) -> str:
        """Run a command that must fail; return its one-line message."""
        status, out, err = self(*args, db=db)
        assert status == code, (status, out, err)
        assert err.count("\n") == 1 and err.startswith("kimi-pool: error: "), err
        assert "Traceback" not in err + out
        return err.removeprefix("kimi-pool: error: ").rstrip("\n")

    def accounts(self) -> list[dict[str, object]]:
        return json.loads(self.ok("accounts", "list", "--json"))  # type: ignore[no-any-return]

    def stored_bytes(self) -> bytes:
        return b"".join(p.read_bytes() for p in self.path.parent.iterdir() if p.is_file())


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path, capsys)


def write(tmp_path: Path, text: str, name: str = "accounts.toml") -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


# --- accounts: good paths -------------------------------------------------------------------------


def test_add_then_list_masks_the_secret(cli: Cli) -> None:
    out = cli.ok("accounts", "add", "main", "--kind", "moonshot", "--api-key", SECRET, "--rpm", "60",
                 "--tpm", "100000", "--concurrency", "4", "--model", "kimi-k2.5", "--model", "moonshot-v1-8k",
                 "--weight", "2", "--proxy", "http://user:hunter2@proxy.test:8080")
    assert out == "added account main (moonshot)\n"
    table = cli.ok("accounts", "list")
    for expected in ("main", "moonshot", "active", "kimi-k2.5, moonshot-v1-8k", "rpm=60", "tpm=100000",
                     "concurrency=4", "sk-l…CRET"):
        assert expected in table
    [view] = cli.accounts()
    assert view["key"] == "sk-l…CRET" and view["proxy"] == "http://***@proxy.test:8080"
    assert (view["rpm"], view["tpd"], view["weight"]) == (60, None, 2.0)
    assert view["models"] == ["kimi-k2.5", "moonshot-v1-8k"]
    assert SECRET not in table + json.dumps(view) and "hunter2" not in table + json.dumps(view)


def test_list_empty_names_the_database(cli: Cli) -> None:
    assert f"no accounts yet in {cli.path}: add one with 'kimi-pool accounts add'" in cli.ok("accounts", "list")
    assert cli.accounts() == []


@pytest.mark.parametrize("args", [["accounts", "list"], ["accounts", "add", "x", "--kind", "kimi-ai-chat"],
                                  ["accounts", "import", "accounts.example.toml"], ["accounts", "check"],
                                  ["keys", "create", "k"], ["models", "list"], ["sessions", "list"], ["usage"]])
def test_a_command_never_creates_a_database(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             args: list[str]) -> None:
    cli = Cli(tmp_path, capsys, create=False)
    line = cli.fails(*args)
    assert line.startswith(f"no database at {cli.path}: point at yours with --db URL or KIMI_POOL_DB "), line
    assert "create one with 'kimi-pool db upgrade'" in line
    assert not cli.path.parent.exists(), "neither the file nor its directory"


def test_a_file_without_kimi_pools_tables_is_refused_and_left_alone(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cli = Cli(tmp_path, capsys, create=False)
    cli.path.parent.mkdir()
    with sqlite3.connect(cli.path) as other:
        other.execute("CREATE TABLE notes (x)")
    line = cli.fails("accounts", "list")
    assert line.startswith(f"no kimi-pool tables in {cli.path}: point at yours with --db URL or KIMI_POOL_DB")
    with sqlite3.connect(cli.path) as other:
        assert other.execute("SELECT name FROM sqlite_master").fetchall() == [("notes",)]


def test_disable_enable_remove(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIMI_TOKEN", "set-in-this-shell")
    cli.ok("accounts", "add", "w1", "--kind", "kimi-web", "--token", "env:KIMI_TOKEN")
    assert cli.ok("accounts", "disable", "w1", "--reason", "token expired") == "disabled account w1\n"
    [view] = cli.accounts()
    assert (view["state"], view["reason"], view["key"]) == ("disabled", "token expired", "env:KIMI_TOKEN")
    assert "token expired" in cli.ok("accounts", "list")
    assert cli.ok("accounts", "enable", "w1").startswith("enabled account w1")
    [view] = cli.accounts()
    assert (view["state"], view["reason"], view["config_rev"]) == ("active", None, 3)
    assert cli.ok("accounts", "remove", "w1") == "removed account w1\n"
    assert cli.accounts() == []


def test_enable_revives_a_dead_account_and_list_shows_runtime_state(cli: Cli) -> None:
    cli.ok("accounts", "add", "a", "--kind", "kimi-ai-chat")

    async def server_marks_it() -> None:  # what the running server does through the write-behind
        db = Database(cli.url)
        try:
            async with db.session() as session, session.begin():
                repo = AccountRepository(session)
                await repo.save_state("a", "cooling_down", time.time() + 300, "429 burst")
        finally:
            await db.dispose()

    asyncio.run(server_marks_it())
    table = cli.ok("accounts", "list")
    assert "cooling_down" in table and "429 burst" in table and "(in 4m)" in table
    cli.ok("accounts", "enable", "a")
    [view] = cli.accounts()
    assert (view["state"], view["until"], view["reason"]) == ("active", None, None)


def test_database_from_the_environment(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KIMI_POOL_DB", cli.url)
    assert run(["accounts", "add", "x", "--kind", "kimi-ai-chat"]) == 0
    assert cli.path.is_file()


def test_default_database_is_in_the_working_directory(tmp_path: Path, cli: Cli,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KIMI_POOL_DB", raising=False)
    monkeypatch.chdir(tmp_path)
    assert cli.fails("accounts", "list", db=False).startswith(f"no database at {tmp_path / 'kimi-pool.db'}: ")
    assert not (tmp_path / "kimi-pool.db").exists()
    code, _, err = cli("db", "upgrade", db=False)
    assert (code, err) == (0, "")
    assert (tmp_path / "kimi-pool.db").is_file()
    assert f"no accounts yet in {tmp_path / 'kimi-pool.db'}" in cli("accounts", "list", db=False)[1]


def test_db_upgrade(cli: Cli) -> None:
    assert f"schema at revision {SCHEMA_HEAD}" in cli.ok("db", "upgrade")
    assert f"schema at revision {SCHEMA_HEAD}" in cli.ok("db", "upgrade")


def test_help_is_the_docstring(cli: Cli) -> None:
    out = cli.ok("accounts", "--help")
    assert "Take an account out of the pool" in out and "import" in out
    assert "Create a client API key" in cli.ok("keys", "--help")


# --- accounts: one line per mistake ---------------------------------------------------------------


ADD = ["accounts", "add", "x", "--kind"]


@pytest.mark.parametrize(("args", "message"), [
    (["accounts", "disable", "nope"], "no account named nope"),
    (["accounts", "enable", "nope"], "no account named nope"),
    (["accounts", "remove", "nope"], "no account named nope"),
    (["accounts", "add", "x", "--kind", "claude"], "account x: unknown kind 'claude'"),
    (["accounts", "add", "x", "--kind", "moonshot"], "account x: kind moonshot needs an API key"),
    (["accounts", "add", "x y", "--kind", "kimi-ai-chat"], "bad account name 'x y'"),
    ([*ADD, "moonshot", "--api-key", "k", "--base-url", "ftp://h"], "bad base URL"),
    ([*ADD, "moonshot", "--api-key", "k", "--base-url", "nohost"], "bad base URL"),
    (["accounts", "add", "x", "--kind", "kimi-ai-chat", "--proxy", "gopher://p"], "bad proxy"),
    (["accounts", "add", "x", "--kind", "kimi-ai-chat", "--rpm", "0"], "rpm must be a positive whole number"),
    ([*ADD, "kimi-ai-chat", "--weight", "-1"], "weight must be a positive number"),
    (["accounts", "add", "x", "--kind", "kimi-web", "--api-key", "a", "--token", "b"], "only one of"),
    (["accounts", "import", "/nonexistent/accounts.toml"], "cannot read /nonexistent/accounts.toml"),
])
def test_bad_input_is_one_line_exit_1(cli: Cli, args: list[str], message: str) -> None:
    assert message in cli.fails(*args)


@pytest.mark.parametrize(("args", "message", "command"), [
    (["accounts", "add", "x", "--kind", "moonshot", "--rpm", "many"], "'--rpm'", "kimi-pool accounts add"),
    ([*ADD, "moonshot", "--weight", "heavy"], "'--weight'", "kimi-pool accounts add"),
    (["accounts", "add", "x", "--kind", "moonshot", "--colour", "red"], "No such option: --colour",
     "kimi-pool accounts add"),
    (["accounts", "add", "--kind", "moonshot"], "Missing argument", "kimi-pool accounts add"),
    (["accounts", "add", "x"], "Missing option '--kind'", "kimi-pool accounts add"),
    (["accounts", "disable"], "Missing argument", "kimi-pool accounts disable"),
    (["accounts", "frobnicate"], "No such command 'frobnicate'", "kimi-pool accounts"),
    (["--nope", "accounts", "list"], "No such option: --nope", "kimi-pool"),
])
def test_usage_errors_are_one_line_exit_2(cli: Cli, args: list[str], message: str, command: str) -> None:
    line = cli.fails(*args, code=2)
    assert message in line and line.endswith(f"(see '{command} --help')")


def test_duplicate_name_is_one_line(cli: Cli) -> None:
    cli.ok("accounts", "add", "x", "--kind", "kimi-ai-chat")
    assert cli.fails("accounts", "add", "x", "--kind", "kimi-ai-chat") == (
        f"an account named x already exists (database {cli.path})")
    assert cli.fails("accounts", "disable", "y") == f"no account named y (database {cli.path})"
    assert cli.fails("accounts", "enable", "y") == f"no account named y (database {cli.path})"
    assert cli.fails("accounts", "remove", "y") == f"no account named y (database {cli.path})"


@pytest.mark.parametrize(("url", "message"), [
    ("not-a-url", "bad database URL 'not-a-url'"),
    ("sqlite:///plain.db", "async driver"),
    ("mysql+nosuchdriver://u:topsecret@h/db", "u:***@h/db"),
])
def test_bad_database_url_is_one_line(cli: Cli, url: str, message: str) -> None:
    line = cli.fails("--db", url, "accounts", "list", db=False)
    assert message in line and "topsecret" not in line


def test_unreachable_database_is_one_line(cli: Cli, tmp_path: Path) -> None:
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not sqlite" * 500)
    assert "file is not a database" in cli.fails("--db", f"sqlite+aiosqlite:///{junk}", "accounts", "list",
                                                 db=False)


def test_no_arguments_shows_help(cli: Cli) -> None:
    code, out, err = cli(db=False)
    assert code == 2 and "accounts" in out + err and "Traceback" not in out + err
    assert cli.fails(code=2) == "Missing command. (see 'kimi-pool --help')"


# --- import ---------------------------------------------------------------------------------------

GOOD = """
[[accounts]]
name = "one"
kind = "moonshot"
api_key = "env:KP_TEST_KEY_ONE"
rpm = 100

[[accounts]]
name = "two"
kind = "kimi-ai-chat"
enabled = false
"""


def test_import_creates_then_updates_then_leaves_alone(cli: Cli, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KP_TEST_KEY_ONE", SECRET)
    path = write(tmp_path, GOOD)
    assert cli.ok("accounts", "import", path) == f"imported {path}: 2 created, 0 updated, 0 unchanged\n"
    assert cli.ok("accounts", "import", path).endswith("0 created, 0 updated, 2 unchanged\n")
    three = '[[accounts]]\nname = "three"\nkind = "kimi-ai-chat"\n'
    write(tmp_path, GOOD.replace("rpm = 100", "rpm = 200") + three)
    assert cli.ok("accounts", "import", path).endswith("1 created, 1 updated, 1 unchanged\n")
    views = {v["name"]: v for v in cli.accounts()}
    assert (views["one"]["rpm"], views["one"]["config_rev"]) == (200, 2)
    assert views["two"]["state"] == "disabled"


def test_import_keeps_env_references_not_their_values(cli: Cli, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KP_TEST_KEY_ONE", SECRET)
    cli.ok("accounts", "import", write(tmp_path, GOOD))
    assert cli.accounts()[0]["key"] == "env:KP_TEST_KEY_ONE"
    assert SECRET.encode() not in cli.stored_bytes()
    assert b"env:KP_TEST_KEY_ONE" in cli.stored_bytes()


@pytest.mark.parametrize(("text", "message"), [
    ('[[accounts]]\nname = "x"\nkind = ', "is not valid TOML"),
    ('[[accounts]]\nname = "x"\nkind = "kimi-ai-chat"\ncolour = "red"\n',
     "account #3: unknown key(s): colour"),
    ('[[accounts]]\nname = "x"\nkind = "kimi-ai-chat"\n[[accounts]]\nname = "x"\nkind = "kimi-ai-chat"\n',
     "duplicate account name 'x'"),
    ('[[accounts]]\nname = "x"\nkind = "gpt"\n', "unknown kind 'gpt'"),
    ('[[accounts]]\nname = "x"\nkind = "moonshot"\napi_key = "env:not valid"\n', "bad secret reference"),
])
def test_bad_files_are_one_line_and_change_nothing(cli: Cli, tmp_path: Path, text: str, message: str) -> None:
    path = write(tmp_path, GOOD.replace('"one"', '"first"') + text)
    line = cli.fails("accounts", "import", path)
    assert message in line and line.startswith(path)
    assert cli.accounts() == []


def test_import_of_the_example_file(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("MOONSHOT_API_KEY_MAIN", "KIMI_WEB_TOKEN_ALICE"):
        monkeypatch.delenv(variable, raising=False)
    example = Path(__file__).resolve().parents[2] / "accounts.example.toml"
    code, out, err = cli("accounts", "import", str(example))
    assert code == 0 and out.endswith("3 created, 0 updated, 0 unchanged; 1 alias(es)\n")
    # its secrets are env:VAR references this shell does not have: one warning line each, and the import goes on
    assert [line.split(":")[2].strip() for line in err.splitlines()] == ["account moonshot-main", "account web-alice"]
    assert all("env:" in line and "unset environment variable in this shell" in line for line in err.splitlines())
    kinds = {v["kind"] for v in cli.accounts()}
    assert kinds == {"moonshot", "kimi-web", "kimi-ai-chat"}
    models = {v["model"]: v for v in json.loads(cli.ok("models", "list", "--json"))}
    assert models["kimi-latest"]["alias"] == {"kimi-web": "kimi-k2.5", "moonshot": "kimi-k2.5"}


# --- keys -----------------------------------------------------------------------------------------


def test_keys_create_shows_the_key_once_and_stores_its_hash(cli: Cli) -> None:
    code, out, err = cli("keys", "create", "batch-jobs")
    key = out.strip()
    assert code == 0 and key.startswith("kp-") and out == key + "\n"
    assert "will not be shown again" in err
    listing = cli.ok("keys", "list") + cli.ok("keys", "list", "--json")
    assert key not in listing and key[:8] in listing and "batch-jobs" in listing
    with sqlite3.connect(cli.path) as conn:
        stored = conn.execute("SELECT key_hash, key_prefix FROM client_keys").fetchall()
    assert stored == [(hash_key(key), key[:8])]
    assert key.encode() not in cli.stored_bytes()


def test_keys_revoke_and_errors(cli: Cli) -> None:
    assert cli("keys", "create", "k")[0] == 0
    assert cli.fails("keys", "create", "k").startswith("a key named k already exists")
    assert "bad key name" in cli.fails("keys", "create", "no spaces")
    assert cli.ok("keys", "revoke", "k") == "revoked key k\n"
    assert cli.ok("keys", "revoke", "k") == "key k was already revoked\n"
    assert cli.fails("keys", "revoke", "nope") == f"no key named nope (database {cli.path})"
    [view] = json.loads(cli.ok("keys", "list", "--json"))
    assert view["revoked_at"] is not None
    assert "revoked" in cli.ok("keys", "list")


def test_serve_refuses_a_public_address_without_a_key(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KIMI_POOL_MASTER_KEY", raising=False)
    monkeypatch.delenv("API_MASTER_KEY", raising=False)
    assert "refusing to listen on 0.0.0.0 without a key" in cli.fails("serve", "--host", "0.0.0.0")


@pytest.mark.parametrize(("args", "message"), [
    (["serve", "--accounts", "/nonexistent/accounts.toml"], "cannot read /nonexistent/accounts.toml"),
    (["serve", "--log-level", "loud"], "bad log level 'loud'"),
    (["serve", "--log-format", "xml"], "bad log format 'xml': use text or json"),
])
def test_serve_and_emulate_misuse_is_one_line(cli: Cli, args: list[str], message: str) -> None:
    assert message in cli.fails(*args)


@pytest.mark.parametrize(("args", "message"), [
    (["emulate", "kimi-nope"], "No such command 'kimi-nope'"),
    (["emulate", "kimi-ai-chat", "--page-mode", "sideways"], "page_mode"),
    (["emulate", "moonshot", "--model", "kimi-k9"], "unknown model 'kimi-k9': give its traits as ID or "
                                                    "ID:CONTEXT:THINKING[:vision][:forced-tools]"),
    (["emulate", "moonshot", "--model", "kimi-k4:many:none"], "bad model 'kimi-k4:many:none'"),
    (["emulate", "moonshot", "--model", "kimi-k4:1000:sometimes"], "thinking is one of always, default_on, none"),
])
def test_emulate_misuse_is_one_line(cli: Cli, args: list[str], message: str) -> None:
    status, _, err = cli(*args)
    assert status in (1, 2) and message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("args", [["serve", "--port", "70000"], ["emulate", "moonshot", "--keys", "0"]])
def test_serve_and_emulate_bad_numbers_are_usage_errors(cli: Cli, args: list[str]) -> None:
    assert "--" in cli.fails(*args, code=2)


# --- sessions -------------------------------------------------------------------------------------

from app.pool.sessions import Binding  # noqa: E402
from app.store.sessions import SessionRepository  # noqa: E402


def store_sessions(cli: Cli, *bindings: Binding) -> None:
    """What the running server writes through the write-behind."""

    async def write() -> None:
        db = Database(cli.url)
        try:
            await db.upgrade()
            async with db.session() as session, session.begin():
                await SessionRepository(session).upsert_many(bindings)
        finally:
            await db.dispose()

    asyncio.run(write())


def session(key: str, account: str, *, used_ago: float, expires_in: float) -> Binding:
    now = time.time()
    return Binding(key=key, account=account, last_used=now - used_ago, expires_at=now + expires_in)


HOUR = 3600.0
LONG_KEY = "h:team-a:" + "x" * 100


def test_sessions_list(cli: Cli) -> None:
    assert cli.ok("sessions", "list") == "no sessions\n"
    store_sessions(cli, session(LONG_KEY, "acct-1", used_ago=60, expires_in=23 * HOUR),
                   session("u:team-a:alice", "acct-2", used_ago=2 * HOUR, expires_in=22 * HOUR + 30),
                   session("c:0123456789abcdef0123456789abcdef", "acct-1", used_ago=30 * HOUR, expires_in=-6 * HOUR))
    table = cli.ok("sessions", "list")
    assert "h:team-a:xxxx" in table and LONG_KEY not in table and "…" in table  # long keys are shortened
    assert "u:team-a:alice" in table and "(1m ago)" in table and "(in 22h00m)" in table
    assert "expired " in table and "(6h00m ago)" in table
    views = json.loads(cli.ok("sessions", "list", "--json"))
    assert [(v["key"], v["account"], v["expired"]) for v in views] == [
        (LONG_KEY, "acct-1", False), ("u:team-a:alice", "acct-2", False),
        ("c:0123456789abcdef0123456789abcdef", "acct-1", True)]
    assert {"chat_id", "parent_id", "last_used", "expires_at"} <= set(views[0])
    only = json.loads(cli.ok("sessions", "list", "--account", "acct-1", "--limit", "1", "--json"))
    assert [v["key"] for v in only] == [LONG_KEY]
    assert cli.ok("sessions", "list", "--account", "nobody") == "no sessions of account nobody\n"


def test_sessions_purge_expired_then_by_age(cli: Cli) -> None:
    store_sessions(cli, session("expired", "a", used_ago=25 * HOUR, expires_in=-HOUR),
                   session("idle", "a", used_ago=3 * HOUR, expires_in=21 * HOUR),
                   session("recent", "a", used_ago=10 * 60, expires_in=23 * HOUR))
    assert cli.ok("sessions", "purge") == "purged 1 session\n"
    assert cli.ok("sessions", "purge") == "purged 0 sessions\n"
    assert cli.ok("sessions", "purge", "--older-than", "12h") == "purged 0 sessions\n"
    assert cli.ok("sessions", "purge", "--older-than", "2h") == "purged 1 session\n"
    assert [v["key"] for v in json.loads(cli.ok("sessions", "list", "--json"))] == ["recent"]
    assert cli.ok("sessions", "purge", "--older-than", "5m") == "purged 1 session\n"
    assert cli.ok("sessions", "list") == "no sessions\n"


@pytest.mark.parametrize("duration", ["30m", "12h", "7d", "90s", "1w", "1.5h", " 2D "])
def test_sessions_purge_accepts_durations(cli: Cli, duration: str) -> None:
    assert cli.ok("sessions", "purge", "--older-than", duration) == "purged 0 sessions\n"


@pytest.mark.parametrize("duration", ["", "7", "d", "7 days", "-1h", "1y", "1h30m", "tomorrow"])
def test_sessions_purge_bad_duration_is_one_line_exit_1(cli: Cli, duration: str) -> None:
    line = cli.fails("sessions", "purge", "--older-than", duration)
    assert line.startswith(f"bad duration {duration!r}") and "30m, 12h or 7d" in line


def test_sessions_help_is_the_docstring(cli: Cli) -> None:
    out = cli.ok("sessions", "--help")
    assert "List conversation sessions" in out and "Delete expired sessions" in out
    assert "may write a purged one back until restarted" in " ".join(cli.ok("sessions", "purge", "--help").split())
    assert "--older-than" in cli.fails("sessions", "purge", "--older-than", code=2)


# --- accounts check: one free upstream request per account, against the emulator -------------------

import socket  # noqa: E402

from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator  # noqa: E402
from tests.conftest import serve  # noqa: E402

NEVER_ISSUED = "sk-never-issued-0123456789"


async def test_accounts_check_exit_status_table_and_json(cli: Cli) -> None:
    app = create_moonshot_emulator(MoonshotEmulatorConfig.simple(2))
    async with serve(app) as url:

        async def call(*args: str) -> tuple[int, str, str]:
            return await asyncio.to_thread(cli, *args)  # the CLI runs its own event loop

        for name, key in (("good", "sk-emu-0001"), ("spare", "sk-emu-0002"), ("revoked", NEVER_ISSUED)):
            assert (await call("accounts", "add", name, "--kind", "moonshot", "--api-key", key,
                               "--base-url", url + "/v1"))[0] == 0

        code, out, err = await call("accounts", "check", "good")
        assert (code, err) == (0, "")
        assert "good" in out and "active" in out and "spare" not in out

        code, out, err = await call("accounts", "check")
        assert (code, err) == (1, ""), "a dead key makes the check fail, for scripts to alert on"
        assert "active → auth_dead" in out and "rejected the API key" in out
        assert NEVER_ISSUED not in out and "sk-emu-0001" not in out

        code, out, err = await call("accounts", "check", "--json")
        assert (code, err) == (1, "")
        views = {view["name"]: view for view in json.loads(out)}
        assert {name: (v["before"], v["after"], v["outcome"]) for name, v in views.items()} == {
            "good": ("active", "active", "ok"), "spare": ("active", "active", "ok"),
            "revoked": ("auth_dead", "auth_dead", "failed")}
        assert NEVER_ISSUED not in out

        code, out, err = await call("accounts", "list", "--json")
        assert {v["name"]: v["state"] for v in json.loads(out)}["revoked"] == "auth_dead"

        code, out, err = await call("accounts", "check", "nope")
        assert (code, out, err) == (1, "", f"kimi-pool: error: no account named nope (database {cli.path})\n")

        totals = app.state.emulator.snapshot()["totals"]
        assert totals["requests"] == 0 and totals["tokens_used"] == 0, "probing spends no chat request"


def test_accounts_check_with_nothing_to_check(cli: Cli) -> None:
    assert cli.ok("accounts", "check") == "no enabled accounts to check\n"
    assert json.loads(cli.ok("accounts", "check", "--json")) == []


def test_accounts_check_of_an_unreachable_upstream_fails_and_leaves_the_state(cli: Cli) -> None:
    with socket.socket() as closed:  # bound, never listening: connections are refused
        closed.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
        cli.ok("accounts", "add", "gone", "--kind", "moonshot", "--api-key", SECRET, "--base-url", url,
               "--no-discover")
        code, out, err = cli("accounts", "check", "gone")
    assert (code, err) == (1, "")
    assert "unreachable" in out and SECRET not in out
    [view] = cli.accounts()
    assert (view["state"], view["config_rev"]) == ("active", 1)
