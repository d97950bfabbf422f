"""Configuration of the Moonshot Open Platform emulator: organizations, keys, models and knobs.

Limits belong to organizations, not keys (PROTOCOLS.md 4.1): two keys of one organization share
its concurrency, RPM, TPM and TPD. ``MoonshotEmulatorConfig.simple`` builds the common case of N
keys, each in its own organization.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Literal, cast

UsagePosition = Literal["choice", "top", "both"]
USAGE_POSITIONS = ("choice", "top", "both")
TPD_WINDOWS = ("day", "rolling")


@dataclass
class OrgLimits:
    """An organization's tier; ``None`` means unlimited."""

    concurrency: int | None = None
    rpm: int | None = None
    tpm: int | None = None
    tpd: int | None = None


@dataclass
class Org:
    name: str
    limits: OrgLimits
    balance: float = 100.0
    """Cash balance; chat calls are refused once it is <= 0. May go negative (arrears)."""
    suspended: bool = False


Thinking = Literal["always", "default_on", "none"]
THINKING_MODES = ("always", "default_on", "none")


@dataclass(frozen=True)
class ModelInfo:
    """A model's traits: what it accepts and how it answers (PROTOCOLS.md 4.2)."""

    context_length: int
    thinking: Thinking = "none"
    """``always``: it always thinks (``kimi-k2-thinking``); ``default_on``: it thinks unless the request
    disables it (the K2.5+ models); ``none``: it never does (moonshot-v1-*, the k2 ``-preview`` ids).
    Thinking models stream ``reasoning_content`` before the answer."""
    vision: bool = False
    """It accepts ``image_url`` parts."""
    forced_tools_with_thinking: bool = False
    """A forced ``tool_choice`` works with thinking on (only ``kimi-k3``); elsewhere it is a 400."""
    efforts: tuple[str, ...] = ()
    """The ``reasoning_effort`` levels it takes (the K3 family: ``low``, ``high``, ``max``); a model without
    levels ignores the field, as Moonshot ignores fields it does not know."""

    def __post_init__(self) -> None:
        if self.thinking not in THINKING_MODES:
            raise ValueError(f"thinking must be one of {', '.join(THINKING_MODES)}, not {self.thinking!r}")


def default_models() -> dict[str, ModelInfo]:
    k2 = 262_144
    return {
        "kimi-k2.5": ModelInfo(k2, "default_on", vision=True),
        "kimi-k2.6": ModelInfo(k2, "default_on", vision=True),
        "kimi-k2.7-code": ModelInfo(k2, "always"),
        "kimi-k3": ModelInfo(524_288, "always", vision=True, forced_tools_with_thinking=True,
                             efforts=K3_EFFORTS),
        "kimi-k2-0905-preview": ModelInfo(k2),
        "kimi-k2-turbo-preview": ModelInfo(k2),
        "kimi-k2-thinking": ModelInfo(k2, "always"),
        "kimi-k2-thinking-turbo": ModelInfo(k2, "always"),
        "moonshot-v1-8k": ModelInfo(8_192),
        "moonshot-v1-32k": ModelInfo(32_768),
        "moonshot-v1-128k": ModelInfo(131_072),
    }


K3_EFFORTS = ("low", "high", "max")
MODEL_SPEC = "ID or ID:CONTEXT:THINKING[:vision][:forced-tools][:efforts]"


def parse_model_spec(spec: str) -> tuple[str, ModelInfo]:
    """``kimi-k2.5`` (a default model, its traits) or ``kimi-k4:1048576:default_on:vision`` (``ValueError``)."""
    name, *traits = spec.split(":")
    if not name:
        raise ValueError(f"bad model {spec!r}: give {MODEL_SPEC}")
    if not traits:
        known = default_models()
        if name not in known:
            raise ValueError(f"unknown model {name!r}: give its traits as {MODEL_SPEC}")
        return name, known[name]
    if len(traits) < 2 or not traits[0].isdigit() or int(traits[0]) < 1 \
            or set(traits[2:]) - {"vision", "forced-tools", "efforts"}:
        raise ValueError(f"bad model {spec!r}: give {MODEL_SPEC} (THINKING: {', '.join(THINKING_MODES)})")
    thinking = traits[1]
    if thinking not in THINKING_MODES:
        raise ValueError(f"bad model {spec!r}: thinking is one of {', '.join(THINKING_MODES)}")
    return name, ModelInfo(int(traits[0]), cast(Thinking, thinking), vision="vision" in traits[2:],
                           forced_tools_with_thinking="forced-tools" in traits[2:],
                           efforts=K3_EFFORTS if "efforts" in traits[2:] else ())


def parse_model_list(specs: Any) -> dict[str, ModelInfo]:
    """A non-empty list of model specs (``parse_model_spec``) → the models to serve (``ValueError``)."""
    if not isinstance(specs, list) or not specs or not all(isinstance(spec, str) for spec in specs):
        raise ValueError(f"models must be a non-empty list of model specs ({MODEL_SPEC}), not {specs!r}")
    return dict(parse_model_spec(spec) for spec in specs)


RUNTIME_KNOBS = (
    "first_token_delay", "chunk_interval", "reply_words", "reasoning_words", "usage_position",
    "rate_limit_headers", "price_per_1k_tokens", "default_max_tokens", "overloaded",
)
"""Fields ``POST /__fake/config`` may change while the emulator runs."""


@dataclass
class MoonshotEmulatorConfig:
    orgs: dict[str, Org]
    keys: dict[str, str]
    """API key → organization name."""
    models: dict[str, ModelInfo] = field(default_factory=default_models)
    first_token_delay: float = 0.0
    """Seconds between the response headers and the first chunk (for a JSON answer: added to its latency)."""
    chunk_interval: float = 0.0
    """Seconds between chunks; 0 sends all chunks in one write."""
    reply_words: int = 12
    """Words (one chunk and one completion token each) in the deterministic reply."""
    reasoning_words: int = 8
    """Words of ``reasoning_content`` thinking models send first."""
    usage_position: UsagePosition = "choice"
    """Where the final stream chunk carries ``usage``: in ``choices[0]`` (as observed), top level, both."""
    rate_limit_headers: bool = False
    """Send ``X-RateLimit-*`` (and ``Retry-After`` on 429s); the real API is not known to."""
    tpd_window: Literal["day", "rolling"] = "day"
    """``day``: tokens per calendar day (UTC); ``rolling``: the last 24 hours."""
    price_per_1k_tokens: float = 0.01
    default_max_tokens: int = 1024
    """The completion budget charged to TPM when a request names no ``max_tokens``."""
    overloaded: bool = False
    """The global overload knob: every admissible chat request gets ``engine_overloaded_error``."""
    prompt_cache_entries: int = 4096
    """Message-prefix hashes each organization remembers (LRU) to report ``cached_tokens``; 0: no cache."""
    recorded_requests: int = 8
    """Request bodies kept per key (newest last) for tests to read in ``snapshot()``; 0: none."""
    web_search_tokens: int = 1000
    """Tokens a ``$web_search`` result costs: reported in its arguments, charged as prompt on the echo."""

    def __post_init__(self) -> None:
        for name, org in self.orgs.items():
            if org.name != name:
                raise ValueError(f"organization {name!r} is named {org.name!r}; use one name")
        for key, org_name in self.keys.items():
            if org_name not in self.orgs:
                raise ValueError(f"key {key[:10]}… belongs to unknown organization {org_name!r}")
        if self.tpd_window not in TPD_WINDOWS:
            raise ValueError(f"tpd_window must be one of {', '.join(TPD_WINDOWS)}")
        for name in ("prompt_cache_entries", "recorded_requests", "web_search_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"{name} must be a non-negative integer")
        check_knobs({name: getattr(self, name) for name in RUNTIME_KNOBS})

    @classmethod
    def simple(
        cls,
        keys: int = 4,
        *,
        concurrency: int | None = None,
        rpm: int | None = None,
        tpm: int | None = None,
        tpd: int | None = None,
        balance: float = 100.0,
        **kw: Any,
    ) -> MoonshotEmulatorConfig:
        """Keys ``sk-emu-0001``… each in its own organization ``org-0001``… with the same limits."""
        orgs: dict[str, Org] = {}
        key_map: dict[str, str] = {}
        for number in range(1, keys + 1):
            org = Org(f"org-{number:04d}", OrgLimits(concurrency, rpm, tpm, tpd), balance=balance)
            orgs[org.name] = org
            key_map[f"sk-emu-{number:04d}"] = org.name
        return cls(orgs=orgs, keys=key_map, **kw)


def check_knobs(knobs: Mapping[str, Any]) -> None:
    """Refuse unknown runtime knobs and values of the wrong type or range (``ValueError``)."""
    types = {f.name: f.type for f in fields(MoonshotEmulatorConfig)}
    for name, value in knobs.items():
        if name not in RUNTIME_KNOBS:
            raise ValueError(f"{name!r} cannot be changed at runtime; knobs: {', '.join(RUNTIME_KNOBS)}")
        kind = types[name]
        if name == "usage_position":
            ok = value in USAGE_POSITIONS
        elif kind == "bool":
            ok = isinstance(value, bool)
        elif kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:
            ok = (isinstance(value, int | float) and not isinstance(value, bool)
                  and math.isfinite(value) and value >= 0)
        if not ok:
            raise ValueError(f"bad value for {name}: {value!r}")
    if knobs.get("default_max_tokens") == 0:
        raise ValueError("default_max_tokens must be positive")


def check_org_changes(changes: Any, orgs: Mapping[str, Org]) -> None:
    """``{"org-0001": {"balance": 0, "suspended": true, "limits": {"rpm": 3}}}``, checked."""
    if not isinstance(changes, Mapping):
        raise ValueError("orgs must be an object of organization name → changes")
    for name, change in changes.items():
        if name not in orgs:
            raise ValueError(f"unknown organization {name!r}")
        if not isinstance(change, Mapping) or set(change) - {"balance", "suspended", "limits"}:
            raise ValueError(f"organization {name!r}: only balance, suspended and limits can change")
        balance = change.get("balance", 0.0)
        if not isinstance(balance, int | float) or isinstance(balance, bool):
            raise ValueError(f"organization {name!r}: balance must be a number")
        if not isinstance(change.get("suspended", False), bool):
            raise ValueError(f"organization {name!r}: suspended must be true or false")
        limits = change.get("limits", {})
        if not isinstance(limits, Mapping) or set(limits) - {"concurrency", "rpm", "tpm", "tpd"}:
            raise ValueError(f"organization {name!r}: limits are concurrency, rpm, tpm, tpd")
        for bucket, value in limits.items():
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"organization {name!r}: {bucket} must be a non-negative integer or null")
