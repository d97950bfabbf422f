"""The model catalogue: which names an account answers to, and under which upstream id."""

from __future__ import annotations

from pathlib import Path

import pytest

from app.accounts_config import AliasSpec, load_accounts_toml, make_account_spec, make_alias
from app.catalogue import BUILTIN_ALIASES, Catalogue
from app.errors import ConfigError
from app.pool.account import Account


def test_the_builtin_kimi_k2_alias_is_served_by_every_kind_under_its_own_id() -> None:
    catalogue = Catalogue()
    moonshot = make_account_spec(name="m", kind="moonshot", secret="sk-test-secret-value")
    chat = make_account_spec(name="c", kind="kimi-ai-chat")
    assert catalogue.served_by(moonshot)["kimi-k2"] == "kimi-k2-0905-preview"
    assert catalogue.served_by(chat)["kimi-k2"] == "kimi-k2-instruct-0905"
    assert catalogue.served_by(chat)["kimi-k2-instruct"] == "kimi-k2-instruct", "native ids stay served as themselves"


def test_an_alias_needs_its_target_among_the_accounts_models() -> None:
    narrow = make_account_spec(name="m", kind="moonshot", secret="sk-test-secret-value", models=["moonshot-v1-8k"])
    served = Catalogue().served_by(narrow)
    assert served == {"moonshot-v1-8k": "moonshot-v1-8k"}, "kimi-k2 needs kimi-k2-0905-preview, which it lacks"


def test_operators_add_replace_and_hide_aliases() -> None:
    catalogue = Catalogue.with_overrides([
        AliasSpec("fast", {"moonshot": "kimi-k2-turbo-preview"}),
        AliasSpec("kimi-k2", {"moonshot": "kimi-k2.5"}),
        AliasSpec("kimi-k2-thinking", {}),
    ])
    moonshot = make_account_spec(name="m", kind="moonshot", secret="sk-test-secret-value")
    served = catalogue.served_by(moonshot)
    assert (served["fast"], served["kimi-k2"]) == ("kimi-k2-turbo-preview", "kimi-k2.5")
    assert served["kimi-k2-thinking"] == "kimi-k2-thinking", "hidden as an alias, still a native model"
    assert "kimi-k2-thinking" not in catalogue.aliases
    assert "kimi-k2" in BUILTIN_ALIASES and BUILTIN_ALIASES["kimi-k2"]["moonshot"] == "kimi-k2-0905-preview"


def test_an_account_answers_to_its_aliases() -> None:
    account = Account(make_account_spec(name="m", kind="moonshot", secret="sk-test-secret-value"), "sk")
    assert "kimi-k2" in account.models and account.upstream_models["kimi-k2"] == "kimi-k2-0905-preview"


def test_aliases_in_accounts_toml(tmp_path: Path) -> None:
    path = tmp_path / "accounts.toml"
    path.write_text('[[accounts]]\nname = "c"\nkind = "kimi-ai-chat"\nmax_message_chars = 2000\n\n'
                    '[aliases.k2]\nmoonshot = "kimi-k2-0905-preview"\nkimi-ai-chat = "kimi-k2-instruct"\n')
    config = load_accounts_toml(path)
    assert config.aliases == [AliasSpec("k2", {"kimi-ai-chat": "kimi-k2-instruct", "moonshot": "kimi-k2-0905-preview"})]
    assert config.accounts[0].extra == {"max_message_chars": 2000}


@pytest.mark.parametrize(("toml", "message"), [
    ('[aliases.k2]\nopenai = "gpt-4"\n', "unknown account kind(s) openai"),
    ('[aliases.k2]\nmoonshot = 3\n', "bad moonshot model id 3"),
    ('aliases = 3\n', "'aliases' must be a table"),
    ('[aliases]\nk2 = "kimi-k2"\n', "expected a table of kind"),
    ('[[accounts]]\nname = "m"\nkind = "moonshot"\napi_key = "sk-x"\nkeep_chats = true\n',
     "option keep_chats is for kimi-web accounts, not moonshot"),
    ('[[accounts]]\nname = "c"\nkind = "kimi-ai-chat"\nmax_message_chars = 0\n',
     "max_message_chars must be a positive"),
])
def test_bad_aliases_and_options_are_one_line_errors(tmp_path: Path, toml: str, message: str) -> None:
    path = tmp_path / "accounts.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError) as caught:
        load_accounts_toml(path)
    assert message in caught.value.message and "\n" not in caught.value.message


def test_alias_names_are_validated() -> None:
    with pytest.raises(ConfigError, match="bad alias name"):
        make_alias("has space", {"moonshot": "x"})
