"""Account specifications and model aliases, as an operator writes them; parses ``accounts.toml``.
Opens nothing.

An ``AccountSpec`` is what an operator writes (CLI flags or a TOML table). Secrets may be given
by reference, ``env:VAR``, so the file can live in git; references are kept as written and only
resolved (``resolve_secret``) by whoever needs the real value.
"""

from __future__ import annotations

import math
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from app.errors import ConfigError
from app.kimi_auth import read_token

ACCOUNT_KINDS = ("moonshot", "kimi-web", "kimi-ai-chat")
DEFAULT_BASE_URLS = {
    "moonshot": "https://api.moonshot.cn/v1",
    "kimi-web": "https://www.kimi.com",
    "kimi-ai-chat": "https://kimi-ai.chat",
}
DEFAULT_MODELS = {
    # What an account serves before its upstream has said (or when it cannot say): ``app.discovery`` asks.
    "moonshot": (
        "kimi-k3",
        "kimi-k2.7-code",
        "kimi-k2.6",
        "kimi-k2.5",
        "kimi-k2-0905-preview",
        "kimi-k2-turbo-preview",
        "kimi-k2-thinking",
        "moonshot-v1-8k",
        "moonshot-v1-32k",
        "moonshot-v1-128k",
    ),
    "kimi-web": ("kimi-k2", "kimi-k2.5", "kimi-k2.5-thinking", "kimi-k2.6", "kimi-k2.6-thinking"),
    "kimi-ai-chat": ("kimi-k2-instruct-0905", "kimi-k2-instruct"),
}
DEFAULT_CONCURRENCY = {"kimi-web": 1}
"""kimi.com answers one reply at a time per user: one live stream per account unless configured."""
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MODEL = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")
_URL_USERINFO = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)[^/?#]*@")


@dataclass(frozen=True, slots=True)
class AccountSpec:
    name: str
    kind: str
    secret: str | None = None
    base_url: str | None = None
    models: tuple[str, ...] = ()
    rpm: int | None = None
    tpm: int | None = None
    tpd: int | None = None
    concurrency: int | None = None
    weight: float = 1.0
    proxy: str | None = None
    enabled: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def effective_base_url(self) -> str:
        return (self.base_url or DEFAULT_BASE_URLS[self.kind]).rstrip("/")

    def effective_models(self, discovered: tuple[str, ...] | list[str] | None = None) -> tuple[str, ...]:
        """The model ids it serves: the operator's list (``--model``, an override), else what its upstream
        said it serves (``discovered``), else its kind's usual models."""
        if self.models:
            return self.models
        if discovered is not None:
            return tuple(discovered)
        return DEFAULT_MODELS[self.kind]

    def models_source(self, discovered: tuple[str, ...] | list[str] | None = None) -> str:
        """Where ``effective_models`` comes from: ``configured``, ``upstream`` or ``default``."""
        return "configured" if self.models else "default" if discovered is None else "upstream"

    def effective_concurrency(self) -> int | None:
        return self.concurrency or DEFAULT_CONCURRENCY.get(self.kind)


def model_id_ok(model: str) -> bool:
    """Whether ``model`` is a model id kimi-pool takes (from an operator, or from an upstream's list)."""
    return bool(_MODEL.match(model))


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME.match(name):
        raise ConfigError(f"bad account name {name!r}: use letters, digits, '.', '_' or '-' (max 64)", param="name")
    return name


def validate_url(value: str, what: str, schemes: tuple[str, ...] = ("http", "https"), *,
                 param: str | None = None, credentials: bool = False) -> str:
    """A URL of one of ``schemes`` with a host, no spaces or control characters and, unless
    ``credentials``, no ``user:password@``; the error shows it with any credentials masked."""
    try:
        parts = urlsplit(value) if isinstance(value, str) else None
    except ValueError:  # e.g. an unclosed IPv6 bracket
        parts = None
    shown = repr(mask_url(value) if isinstance(value, str) else value)
    if parts is None or parts.scheme not in schemes or not parts.hostname:
        raise ConfigError(f"bad {what} {shown}: expected a {'/'.join(schemes)} URL with a host", param=param)
    if not printable(value):
        raise ConfigError(f"bad {what} {shown}: it has a space or a control character in it", param=param)
    if "@" in parts.netloc and not credentials:
        raise ConfigError(f"bad {what} {shown}: a user or password in it is not allowed (it would be stored and "
                          "sent in clear; the account's key or token is its credential)", param=param)
    try:
        parts.port  # noqa: B018 - raises on a bad port
    except ValueError as exc:
        raise ConfigError(f"bad {what} {shown}: {exc}", param=param) from None
    return value


def printable(text: str) -> bool:
    """No whitespace and no control character anywhere (what a key, a token or a URL never holds)."""
    return text.isprintable() and not any(c.isspace() for c in text)


def validate_limit(name: str, value: Any, *, param: str | None = None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigError(f"{name} must be a positive whole number, not {value!r}", param=param)
    return value


def validate_weight(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"weight must be a positive number, not {value!r}", param="weight")
    return float(value)


def make_account_spec(
    *,
    name: str,
    kind: str,
    secret: str | None = None,
    base_url: str | None = None,
    models: list[str] | tuple[str, ...] = (),
    rpm: Any = None,
    tpm: Any = None,
    tpd: Any = None,
    concurrency: Any = None,
    weight: Any = 1.0,
    proxy: str | None = None,
    enabled: bool = True,
    options: Mapping[str, Any] | None = None,
) -> AccountSpec:
    """Validate operator input and build a spec; every problem is one ``ConfigError`` line, whose
    ``param`` names the field at fault (``secret`` for the credential, an option by its key)."""
    validate_name(name)
    if not isinstance(kind, str) or kind not in ACCOUNT_KINDS:
        raise ConfigError(f"account {name}: unknown kind {kind!r} (one of {', '.join(ACCOUNT_KINDS)})", param="kind")
    if kind in ("moonshot", "kimi-web") and not secret:
        what = "an API key" if kind == "moonshot" else "a kimi-auth token"
        raise ConfigError(f"account {name}: kind {kind} needs {what}", param="secret")
    if secret is not None and (not isinstance(secret, str) or secret.strip() != secret or not secret):
        raise ConfigError(f"account {name}: the secret must be a non-empty string without spaces around it",
                          param="secret")
    if secret and secret.startswith("env:") and not re.fullmatch(r"env:[A-Za-z_][A-Za-z0-9_]*", secret):
        raise ConfigError(f"account {name}: bad secret reference {secret!r} (expected env:VARIABLE)", param="secret")
    if secret is not None and not printable(secret):
        raise ConfigError(f"account {name}: the secret has a space or a control character in it (a line break "
                          "pasted with it?)", param="secret")
    if kind == "kimi-web" and secret and not secret.startswith("env:"):
        try:
            read_token(secret)
        except ConfigError as exc:
            raise ConfigError(f"account {name}: {exc.message}", param="secret") from None
    if base_url is not None:
        validate_url(base_url, f"base URL for account {name}", param="base_url")
    if proxy is not None:  # an egress proxy may need its own login: allowed, and masked wherever it is shown
        validate_url(proxy, f"proxy for account {name}", param="proxy", credentials=True)
    if not isinstance(models, list | tuple) or not all(isinstance(m, str) and _MODEL.match(m) for m in models):
        raise ConfigError(f"account {name}: models must be a list of model ids, not {models!r}", param="models")
    if not isinstance(enabled, bool):
        raise ConfigError(f"account {name}: enabled must be true or false", param="enabled")
    return AccountSpec(
        name=name,
        kind=kind,
        secret=secret,
        base_url=base_url.rstrip("/") if base_url else None,
        models=tuple(dict.fromkeys(models)),
        weight=validate_weight(weight),
        proxy=proxy,
        enabled=enabled,
        rpm=validate_limit(f"account {name}: rpm", rpm, param="rpm"),
        tpm=validate_limit(f"account {name}: tpm", tpm, param="tpm"),
        tpd=validate_limit(f"account {name}: tpd", tpd, param="tpd"),
        concurrency=validate_limit(f"account {name}: concurrency", concurrency, param="concurrency"),
        extra=validate_options(name, kind, options or {}),
    )


OPTION_KEYS = {
    "max_message_chars": ("kimi-ai-chat",),
    "keep_chats": ("kimi-web",),
}
"""Options that only some kinds understand, kept in the spec's ``extra``:

* ``max_message_chars`` (kimi-ai-chat): the flattened conversation is cut to this many characters,
  oldest turns first (default 1000, the site's limit);
* ``keep_chats`` (kimi-web): keep the kimi.com chats made for one-off requests (default: delete them).
"""


def validate_options(name: str, kind: str, options: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in options.items():
        kinds = OPTION_KEYS.get(key)
        if kinds is None:
            raise ConfigError(f"account {name}: unknown option {key!r}", param=key)
        if kind not in kinds:
            raise ConfigError(f"account {name}: option {key} is for {'/'.join(kinds)} accounts, not {kind}", param=key)
        if key == "max_message_chars":
            validate_limit(f"account {name}: max_message_chars", value, param=key)
        elif not isinstance(value, bool):
            raise ConfigError(f"account {name}: {key} must be true or false", param=key)
        out[key] = value
    return out


def resolve_secret(secret: str | None, env: Mapping[str, str] | None = None) -> str | None:
    """Turn ``env:VAR`` into the variable's value; a plain secret is returned as it is."""
    if secret is None or not secret.startswith("env:"):
        return secret
    env = os.environ if env is None else env
    var = secret[4:]
    value = env.get(var)
    if not value:
        raise ConfigError(f"the secret reference env:{var} points at an unset environment variable")
    if not printable(value):
        raise ConfigError(f"the secret in env:{var} has a space or a control character in it (a line break?)")
    return value


def mask_secret(secret: str | None) -> str:
    """What the CLI and the admin API show of a secret: never more than its first and last 4 chars."""
    if not secret:
        return "-"
    if secret.startswith("env:"):
        return secret
    if len(secret) <= 12:
        return "****"
    return f"{secret[:4]}…{secret[-4:]}"


def mask_url(url: str | None) -> str | None:
    """Hide credentials in a URL (``http://user:pass@host`` → ``http://***@host``)."""
    if not url:
        return url
    return _URL_USERINFO.sub(r"\1***@", url)


_TOML_KEYS = {
    "name", "kind", "api_key", "token", "secret", "base_url", "models", "rpm", "tpm", "tpd",
    "concurrency", "weight", "proxy", "enabled", *OPTION_KEYS,
}


@dataclass(frozen=True, slots=True)
class AliasSpec:
    """A client-facing model name and, per account kind, the upstream model id that serves it."""

    name: str
    targets: Mapping[str, str]


def make_alias(name: Any, targets: Any) -> AliasSpec:
    """Validate an alias; an empty ``targets`` is allowed (it hides a built-in alias)."""
    if not isinstance(name, str) or not _MODEL.match(name):
        raise ConfigError(f"bad alias name {name!r}: use letters, digits and . _ : / - (max 128)")
    if not isinstance(targets, Mapping):
        raise ConfigError(f"alias {name}: expected a table of kind = \"upstream model\"")
    unknown = sorted(map(str, set(targets) - set(ACCOUNT_KINDS)))
    if unknown:
        raise ConfigError(f"alias {name}: unknown account kind(s) {', '.join(unknown)} "
                          f"(one of {', '.join(ACCOUNT_KINDS)})", param=unknown[0])
    for kind, model in targets.items():
        if not isinstance(model, str) or not _MODEL.match(model):
            raise ConfigError(f"alias {name}: bad {kind} model id {model!r}", param=kind)
    return AliasSpec(name, dict(sorted(targets.items())))


@dataclass(frozen=True, slots=True)
class ConfigFile:
    """What an ``accounts.toml`` holds: accounts and model aliases."""

    accounts: list[AccountSpec]
    aliases: list[AliasSpec]


def load_accounts_toml(path: Path) -> ConfigFile:
    """Parse an ``accounts.toml``; raise ``ConfigError`` with the file and the problem on one line."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from None
    tables = data.get("accounts", [])
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise ConfigError(f"{path}: 'accounts' must be an array of tables ([[accounts]])")
    unknown_top = set(data) - {"accounts", "aliases"}
    if unknown_top:
        raise ConfigError(f"{path}: unknown top-level key(s): {', '.join(sorted(unknown_top))}")
    specs: list[AccountSpec] = []
    seen: set[str] = set()
    for index, table in enumerate(tables, start=1):
        where = f"{path}: account #{index}"
        unknown = set(table) - _TOML_KEYS
        if unknown:
            raise ConfigError(f"{where}: unknown key(s): {', '.join(sorted(unknown))}")
        if "name" not in table or "kind" not in table:
            raise ConfigError(f"{where}: 'name' and 'kind' are required")
        secrets = [table[k] for k in ("api_key", "token", "secret") if k in table]
        if len(secrets) > 1:
            raise ConfigError(f"{where}: give only one of api_key, token, secret")
        try:
            spec = make_account_spec(
                name=table["name"],
                kind=table["kind"],
                secret=secrets[0] if secrets else None,
                base_url=table.get("base_url"),
                models=table.get("models", []),
                rpm=table.get("rpm"),
                tpm=table.get("tpm"),
                tpd=table.get("tpd"),
                concurrency=table.get("concurrency"),
                weight=table.get("weight", 1.0),
                proxy=table.get("proxy"),
                enabled=table.get("enabled", True),
                options={k: table[k] for k in OPTION_KEYS if k in table},
            )
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc.message}") from None
        if spec.name in seen:
            raise ConfigError(f"{path}: duplicate account name {spec.name!r}")
        seen.add(spec.name)
        specs.append(spec)
    aliases = data.get("aliases", {})
    if not isinstance(aliases, dict):
        raise ConfigError(f"{path}: 'aliases' must be a table ([aliases] or [aliases.NAME])")
    try:
        alias_specs = [make_alias(name, targets) for name, targets in aliases.items()]
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc.message}") from None
    return ConfigFile(specs, alias_specs)
