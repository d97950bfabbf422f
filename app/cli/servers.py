"""``kimi-pool serve`` and ``kimi-pool emulate``: the commands that run servers."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from app.cli.support import cli_state as _state
from app.config import Settings
from app.errors import ConfigError

# --- servers --------------------------------------------------------------------------------------


def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on; anything but loopback needs a master key.")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")] = 8088,
    accounts: Annotated[Path | None, typer.Option(
        metavar="FILE", help="accounts.toml to import (create or update) before serving.")] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning or error.")] = "info",
    log_format: Annotated[str, typer.Option(
        help="text, or json for one JSON object per line; each request is logged at info.")] = "text",
    max_wait: Annotated[float, typer.Option(
        min=0, help="Longest a request waits for an account with room (X-Kimi-Pool-Max-Wait may ask less).")]
    = 30.0,
    max_queue: Annotated[int, typer.Option(min=0, help="Most requests waiting at once; beyond, 429 at once.")]
    = 1000,
    max_queue_per_key: Annotated[int, typer.Option(
        min=1, help="Most requests of one client key waiting at once; beyond, 429 key_queue_share_exceeded.")]
    = 250,
    max_sessions_per_key: Annotated[int, typer.Option(
        min=1, help="Most conversations one client key keeps bound to accounts; a new one drops its least "
                    "recently used.")] = 10_000,
    max_files_per_key: Annotated[int, typer.Option(
        min=1, help="Most files one client key keeps stored (batch outputs count).")] = 10_000,
    max_file_bytes_per_key: Annotated[int, typer.Option(
        min=1, metavar="BYTES", help="Most bytes of files one client key keeps stored (batch outputs count).")]
    = 10 * 1024 ** 3,
    shutdown_grace: Annotated[int, typer.Option(
        min=1, max=3600, help="After SIGTERM, seconds in-flight requests and streams may take to finish.")] = 30,
    interactive_share: Annotated[float, typer.Option(
        min=0, max=0.99, help="Fraction of each account's concurrency and rate limits that batch jobs leave "
                              "to interactive requests.")] = 0.2,
    batch_concurrency: Annotated[int, typer.Option(
        min=1, max=100_000, help="Most batch requests in flight at once; the pool paces them.")] = 256,
    workers: Annotated[int, typer.Option(
        min=1, max=64, help="Processes serving chat completions, for more cores; limits, cooldowns, sessions and "
                            "the round robin stay shared.")] = 1,
    max_header_bytes: Annotated[int, typer.Option(
        min=1024, help="Longest request line + headers a client may send; longer ones get 431.")] = 64 * 1024,
    header_timeout: Annotated[float, typer.Option(
        min=0.01, help="Seconds a connection has to send a whole request line + headers (from its start, or the "
                       "end of its previous response); then it is closed.")] = 10.0,
    max_connections: Annotated[int, typer.Option(
        min=1, help="Most connections open at once, per serving process; beyond, new ones get 503. Lowered if "
                    "the open-files limit cannot hold them.")] = 10_000,
    flush_interval: Annotated[float, typer.Option(
        min=0.01, max=3600, help="Seconds between writes of usage rows and sessions: what a crash may lose "
                                 "(account states are written at once).")] = 1.0,
    models_refresh: Annotated[float, typer.Option(
        min=0, metavar="SECONDS", help="How often each account's upstream is asked which models it serves (also "
                                       "at start); 0: never.")] = 3600.0,
) -> None:
    """Serve the OpenAI-compatible gateway. The database is migrated to the current schema first."""
    if log_level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"bad log level {log_level!r}: use debug, info, warning or error")
    from app.serve import serve_gateway  # the server stack is imported only by the commands that run it

    options: dict[str, Any] = {
        "db_url": _state(ctx).db_url, "host": host, "port": port, "accounts_file": accounts, "log_level": log_level,
        "log_format": log_format, "max_wait": max_wait, "max_queue": max_queue,
        "shutdown_grace": float(shutdown_grace), "interactive_share": interactive_share,
        "batch_concurrency": batch_concurrency, "workers": workers, "max_header_bytes": max_header_bytes,
        "header_timeout": header_timeout, "max_connections": max_connections, "flush_interval": flush_interval,
        "max_queue_per_key": max_queue_per_key, "max_sessions_per_key": max_sessions_per_key,
        "max_files_per_key": max_files_per_key, "max_file_bytes_per_key": max_file_bytes_per_key,
        "models_refresh": models_refresh}
    serve_gateway(Settings.from_env(**options), options)


emulate_app = typer.Typer(name="emulate", no_args_is_help=True,
                          help="Serve a faithful offline stand-in for an upstream (PROTOCOLS.md), with control "
                               "routes under /__fake/.")

Host = Annotated[str, typer.Option(help="Address to listen on.")]
Port = Annotated[int, typer.Option(min=1, max=65535, help="Port to listen on.")]
AccountsOut = Annotated[Path | None, typer.Option(
    metavar="FILE", help="Write an accounts.toml for kimi-pool that points at this emulator.")]


def _write_accounts(path: Path | None, text: str) -> None:
    if path is None:
        return
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}") from None
    print(f"accounts for kimi-pool written to {path} (kimi-pool serve --accounts {path})", file=sys.stderr)


@emulate_app.command("moonshot")
def emulate_moonshot(
    host: Host = "127.0.0.1",
    port: Port = 9001,
    keys: Annotated[int, typer.Option(min=1, max=10_000, help="API keys sk-emu-0001…, one organization each.")] = 4,
    concurrency: Annotated[int | None, typer.Option(min=1, help="Concurrent requests per organization.")] = None,
    rpm: Annotated[int | None, typer.Option(min=1, help="Requests per minute per organization.")] = None,
    tpm: Annotated[int | None, typer.Option(min=1, help="Tokens per minute per organization.")] = None,
    tpd: Annotated[int | None, typer.Option(min=1, help="Tokens per day per organization.")] = None,
    balance: Annotated[float, typer.Option(help="Starting balance of each organization.")] = 100.0,
    first_token_delay: Annotated[float, typer.Option(min=0, help="Seconds before the first token.")] = 0.0,
    chunk_interval: Annotated[float, typer.Option(min=0, help="Seconds between streamed chunks.")] = 0.0,
    reply_words: Annotated[int, typer.Option(min=1, help="Words in each (deterministic) reply.")] = 12,
    reasoning_words: Annotated[int, typer.Option(
        min=1, help="Words of reasoning_content a thinking request gets first (low effort: half, high: twice).")]
    = 8,
    usage_position: Annotated[str, typer.Option(help="Where streams carry usage: choice, top or both.")]
    = "choice",
    model: Annotated[list[str] | None, typer.Option(
        metavar="SPEC", help="Serve only these models (repeat): a known id, or ID:CONTEXT:THINKING[:vision]"
                             "[:forced-tools] with THINKING always, default_on or none.")] = None,
    prompt_cache: Annotated[int, typer.Option(
        min=0, help="Message prefixes each organization remembers to report cached_tokens; 0: no cache.")] = 4096,
    web_search_tokens: Annotated[int, typer.Option(
        min=0, help="Tokens a $web_search result costs (charged as prompt when echoed back).")] = 1000,
    accounts_out: AccountsOut = None,
) -> None:
    """The official Moonshot API (OpenAI-compatible): organizations, limits, error bodies, SSE; thinking,
    tool calls, JSON answers, $web_search, cached tokens, prefix mode, and Kimi's rules for them."""
    from app.emulator.moonshot import MoonshotEmulatorConfig, create_moonshot_emulator
    from app.emulator.moonshot_config import default_models, parse_model_spec
    from app.serve import serve_emulator

    try:
        models = dict(parse_model_spec(spec) for spec in model) if model else default_models()
        config = MoonshotEmulatorConfig.simple(
            keys, concurrency=concurrency, rpm=rpm, tpm=tpm, tpd=tpd, balance=balance,
            first_token_delay=first_token_delay, chunk_interval=chunk_interval, reply_words=reply_words,
            reasoning_words=reasoning_words, usage_position=usage_position, models=models,
            prompt_cache_entries=prompt_cache, web_search_tokens=web_search_tokens)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    base = f"http://{host}:{port}/v1"
    _write_accounts(accounts_out, "".join(
        f'[[accounts]]\nname = "moonshot-{i}"\nkind = "moonshot"\napi_key = "{key}"\nbase_url = "{base}"\n\n'
        for i, key in enumerate(sorted(config.keys), start=1)))
    print(f"emulating moonshot on {base} with keys sk-emu-0001…sk-emu-{keys:04d}", file=sys.stderr)
    serve_emulator(create_moonshot_emulator(config), host, port)


@emulate_app.command("kimi-ai-chat")
def emulate_kimi_ai_chat(
    host: Host = "127.0.0.1",
    port: Port = 9002,
    latency: Annotated[float, typer.Option(min=0, help="Seconds each whole answer takes.")] = 0.0,
    bad_nonce_mode: Annotated[str, typer.Option(help="How a bad nonce is refused: wpcore, wpcore_legacy or "
                                                     "plugin_json.")] = "wpcore",
    nonce_tick: Annotated[float, typer.Option(min=1, help="Seconds between nonce rotations.")] = 12 * 3600.0,
    max_message_chars: Annotated[int, typer.Option(min=1, help="Longest message the site takes.")] = 1000,
    message_policy: Annotated[str, typer.Option(help="Longer messages: truncate or reject.")] = "truncate",
    page_mode: Annotated[str, typer.Option(help="ok, stale, challenge_403, challenge_503 or no_nonce.")] = "ok",
    reply_words: Annotated[int, typer.Option(min=1, help="Words in each (deterministic) reply.")] = 12,
    accounts_out: AccountsOut = None,
) -> None:
    """The kimi-ai.chat site: a chat page with a nonce, and the admin-ajax chat action."""
    from app.emulator.kimi_ai_chat import KimiAiChatEmulatorConfig, create_kimi_ai_chat_emulator
    from app.serve import serve_emulator

    try:
        config = KimiAiChatEmulatorConfig(
            latency=latency, bad_nonce_mode=bad_nonce_mode, nonce_tick=nonce_tick, max_message_chars=max_message_chars,
            message_policy=message_policy, page_mode=page_mode, reply_words=reply_words)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    base = f"http://{host}:{port}"
    _write_accounts(accounts_out,
                    f'[[accounts]]\nname = "kimi-ai-chat-1"\nkind = "kimi-ai-chat"\nbase_url = "{base}"\n')
    print(f"emulating kimi-ai.chat on {base}/chat/", file=sys.stderr)
    serve_emulator(create_kimi_ai_chat_emulator(config), host, port)


@emulate_app.command("kimi-web")
def emulate_kimi_web(
    host: Host = "127.0.0.1",
    port: Port = 9003,
    users: Annotated[int, typer.Option(min=1, max=1000, help="kimi.com logins, one token each.")] = 2,
    quota_turns: Annotated[int | None, typer.Option(min=0, help="Turns per user per quota window.")] = None,
    quota_window: Annotated[float, typer.Option(min=1, help="The quota window, in seconds.")] = 3 * 3600.0,
    first_token_delay: Annotated[float, typer.Option(min=0, help="Seconds before the first token.")] = 0.0,
    chunk_interval: Annotated[float, typer.Option(min=0, help="Seconds between streamed chunks.")] = 0.0,
    reply_words: Annotated[int, typer.Option(min=1, help="Words in each (deterministic) reply.")] = 12,
    accounts_out: AccountsOut = None,
) -> None:
    """kimi.com's web API: Connect streaming chats, kimi-auth tokens, chat continuity, quotas.

    The tokens are minted by the emulator (they work with it only); --accounts-out writes them
    into an accounts.toml, since they are not printed."""
    from app.emulator.kimi_web import KimiWebEmulatorConfig, create_kimi_web_emulator
    from app.serve import serve_emulator

    try:
        config = KimiWebEmulatorConfig.simple(
            users, quota_turns=quota_turns, quota_window=quota_window, first_token_delay=first_token_delay,
            chunk_interval=chunk_interval, reply_words=reply_words)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    app = create_kimi_web_emulator(config)
    base = f"http://{host}:{port}"
    _write_accounts(accounts_out, "".join(
        f'[[accounts]]\nname = "kimi-web-{i}"\nkind = "kimi-web"\ntoken = "{app.state.emulator.token(user)}"\n'
        f'base_url = "{base}"\n\n' for i, user in enumerate(config.users, start=1)))
    print(f"emulating kimi.com on {base}/apiv2/ for {users} user(s)", file=sys.stderr)
    serve_emulator(app, host, port)
