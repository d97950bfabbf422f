"""A faithful fake of kimi-ai.chat, the WordPress admin-ajax chat site (PROTOCOLS.md section 1).

``create_kimi_ai_chat_emulator(config)`` returns a Starlette app serving

* ``GET /chat/``: the chat page, whose inline script assigns
  ``var kimi_ajax = {"ajax_url": "<base>/wp-admin/admin-ajax.php", "nonce": "<10 hex>"};``. Odd
  fetches write it the way ``wp_localize_script`` does (one line, slashes escaped as ``\\/``), even
  fetches over several indented lines, so clients must parse it as JSON, not as a fixed string.
  ``page_mode`` swaps it for a stale cached page, a Cloudflare challenge (403 or 503) or a page
  without ``kimi_ajax``; it affects the page only, not the ajax endpoint.
* ``POST /wp-admin/admin-ajax.php``: form fields ``action``, ``nonce``, ``message``, ``model``,
  ``session_id``, checked in this order: action (``0``, 400), nonce (per ``bad_nonce_mode``),
  throttle, model, message length (truncate or reject), empty message; then, after ``latency`` on
  the injected clock, 200 ``{"success":true,"data":{"message":"<reply>"}}``. Refusals answer at once.
  A body that is not ``application/x-www-form-urlencoded`` has no fields, as in PHP.
* ``POST /__fake/rotate`` (a fresh nonce now) and ``/__fake/script|release|state|reset|config``.

**The reply** is ``Reply to: <last 40 characters of the message> — <reply_words words>``, the words
cycling through "Hello from the kimi-ai.chat emulator, a deterministic reply for testing the
gateway." The message is the one kept after truncation, so the echo shows which turn was answered.
JSON is written as PHP's ``json_encode`` writes it: non-ASCII as ``\\uXXXX``, ``/`` as ``\\/``.

Scripted outcomes (one per ajax request, FIFO): ``bad_nonce``, ``throttled``, ``http_error``,
``html_200``, ``reset`` and ``success_false`` answer at once whatever the request; ``ok``, ``delay``,
``hold`` and ``truncate`` shape the reply of a request that passes every check (one that fails a
check still uses the outcome up). ``app.state.emulator`` is the ``KimiAiChatEmulator`` behind it.
"""

from __future__ import annotations

import html
import json
from http import HTTPStatus
from types import MappingProxyType
from urllib.parse import parse_qs

import orjson
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from app.clock import Clock, SystemClock
from app.emulator.asgi import EmulatorApp, Endpoint, cut_connection, read_body, send_whole, until_disconnect
from app.emulator.control import control_routes
from app.emulator.kimi_ai_chat_state import (
    ACTION,
    OUTCOME_KINDS,
    KimiAiChatEmulator,
    KimiAiChatEmulatorConfig,
    KimiAiChatStats,
    Refusal,
    Ticket,
    reply_text,
)

__all__ = [
    "ACTION",
    "OUTCOME_KINDS",
    "KimiAiChatEmulator",
    "KimiAiChatEmulatorConfig",
    "KimiAiChatStats",
    "create_kimi_ai_chat_emulator",
    "reply_text",
]

Headers = tuple[tuple[bytes, bytes], ...]
HTML = b"text/html; charset=UTF-8"
AJAX_HEADERS: Headers = (
    (b"x-robots-tag", b"noindex"), (b"x-content-type-options", b"nosniff"),
    (b"expires", b"Wed, 11 Jan 1984 05:00:00 GMT"), (b"cache-control", b"no-cache, must-revalidate, max-age=0"),
    (b"referrer-policy", b"strict-origin-when-cross-origin"), (b"x-frame-options", b"SAMEORIGIN"),
)
"""What WordPress's admin-ajax.php sends with every answer."""
JSON_HEADERS: Headers = ((b"content-type", b"application/json; charset=UTF-8"), *AJAX_HEADERS)
TEXT_HEADERS: Headers = ((b"content-type", HTML), *AJAX_HEADERS)
CHALLENGE_HEADERS: Headers = (
    (b"content-type", HTML), (b"cf-mitigated", b"challenge"),
    (b"cache-control", b"private, max-age=0, no-store, no-cache, must-revalidate, post-check=0, pre-check=0"),
)

CHALLENGE_STATUS = MappingProxyType({"challenge_403": 403, "challenge_503": 503})
"""The HTTP status of each challenge page mode."""

CHALLENGE_PAGE = (
    b'<!DOCTYPE html><html lang="en-US"><head><title>Just a moment...</title>'
    b'<meta http-equiv="Content-Type" content="text/html; charset=UTF-8">'
    b'<meta name="robots" content="noindex,nofollow">'
    b'<meta name="viewport" content="width=device-width,initial-scale=1">'
    b'</head><body><div class="main-wrapper" role="main"><div class="main-content">'
    b'<h1 class="zone-name-title h1">kimi-ai.chat</h1>'
    b'<h2 class="h2" id="challenge-running">Checking if the site connection is secure</h2>'
    b'<noscript><div class="h2"><span id="challenge-error-text">Enable JavaScript and cookies to continue'
    b'</span></div></noscript></div></div>'
    b"<script>(function(){window._cf_chl_opt={cvId: '3',cZone: 'kimi-ai.chat',cType: 'managed'};}());</script>"
    b"</body></html>"
)

_PAGE = """<!DOCTYPE html>
<html lang="zh-CN">
<head>
<meta charset="UTF-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Kimi AI Chat &#8211; Kimi K2 在线聊天</title>
<link rel='stylesheet' id='kimi-chat-css' media='all'
 href='{base}/wp-content/plugins/kimi-chat/assets/chat.css?ver=1.2.0' />
<script>
window._wpemojiSettings = {{"baseUrl":"https:\\/\\/s.w.org\\/images\\/core\\/emoji\\/15.0.3\\/72x72\\/","ext":".png"}};
</script>
</head>
<body class="page-template-default page">
<div id="kimi-chat-app">
<select id="kimi-model">{options}</select>
<div id="kimi-messages"></div>
<textarea id="kimi-input" maxlength="{limit}" placeholder="输入消息..."></textarea>
<button id="kimi-send" type="button">发送</button>
</div>
{script}<script src='{base}/wp-content/plugins/kimi-chat/assets/chat.js?ver=1.2.0' id='kimi-chat-js'></script>
</body>
</html>
"""


def wp_json(value: object) -> bytes:
    """JSON as PHP's ``json_encode`` writes it: compact, non-ASCII as ``\\uXXXX``, ``/`` as ``\\/``."""
    return json.dumps(value, ensure_ascii=True, separators=(",", ":")).replace("/", "\\/").encode()


def chat_page(emulator: KimiAiChatEmulator, base: str, nonce: str | None, layout: int) -> bytes:
    """The chat page; with a nonce, the ``kimi_ajax`` script in one of two layouts."""
    script = ""
    if nonce is not None:
        ajax = {"ajax_url": f"{base}/wp-admin/admin-ajax.php", "nonce": nonce}
        literal = wp_json(ajax).decode() if layout % 2 else json.dumps(ajax, indent=4)
        script = f'<script id="kimi-chat-js-extra">\nvar kimi_ajax = {literal};\n</script>\n'
    options = "".join(f'<option value="{html.escape(model)}">{html.escape(model.rpartition("/")[2])}</option>'
                      for model in emulator.config.models)
    return _PAGE.format(base=base, options=options, limit=emulator.config.max_message_chars,
                        script=script).encode()


def error_page(status: int, style: str) -> bytes:
    """A Cloudflare-style error answer: an HTML page, or the plain text non-browsers get."""
    if style == "text":
        return b"error code: %d" % status
    try:
        phrase = HTTPStatus(status).phrase
    except ValueError:
        phrase = "Error"
    return (f'<!DOCTYPE html><html lang="en-US"><head><title>kimi-ai.chat | {status}: {phrase}</title></head>'
            f'<body><div id="cf-error-details"><h1><span class="cf-error-type">Error</span> '
            f'<span class="cf-error-code">{status}</span></h1><h2>{phrase}</h2></div></body></html>').encode()


def render(refusal: Refusal) -> tuple[int, Headers, bytes]:
    """(status, headers, body) of a refusal other than ``reset``."""
    kind = refusal.kind
    if kind == "bad_action":
        return 400, TEXT_HEADERS, b"0"
    if kind == "bad_nonce" and refusal.mode != "plugin_json":
        return (403 if refusal.mode == "wpcore" else 200), TEXT_HEADERS, b"-1"
    if kind == "http_error":
        headers = ((b"content-type", HTML if refusal.mode == "html" else b"text/plain; charset=UTF-8"),)
        return refusal.status, headers, error_page(refusal.status, refusal.mode)
    if kind == "html_200":
        return 200, CHALLENGE_HEADERS, CHALLENGE_PAGE
    return 200, JSON_HEADERS, wp_json({"success": False, "data": refusal.message})


def parse_form(scope: Scope, raw: bytes) -> dict[str, str]:
    """The first value of each form field; no fields unless the body is form-encoded."""
    content_type = b""
    for name, value in scope["headers"]:
        if name == b"content-type":
            content_type = value.split(b";", 1)[0].strip().lower()
    if content_type != b"application/x-www-form-urlencoded":
        return {}
    fields = parse_qs(raw.decode("utf-8", errors="replace"), keep_blank_values=True, errors="replace")
    return {name: values[0] for name, values in fields.items()}


async def _reply(emulator: KimiAiChatEmulator, ticket: Ticket, scope: Scope, receive: Receive, send: Send) -> None:
    """The success body, after the ticket's latency (and gate); cut halfway for ``truncate``."""
    body = wp_json({"success": True, "data": {"message": ticket.reply}})
    headers = [*JSON_HEADERS, (b"content-length", b"%d" % len(body))]
    result = "disconnect"

    async def deliver() -> None:
        nonlocal result
        if ticket.wait > 0:
            await emulator.clock.sleep(ticket.wait)
        if ticket.hold:
            await emulator.gate.hold()
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        if ticket.truncate:
            await send({"type": "http.response.body", "body": body[: len(body) // 2], "more_body": True})
            result = "truncate"
            return
        await send({"type": "http.response.body", "body": body})
        result = "ok"

    try:
        if ticket.wait > 0 or ticket.hold:
            await until_disconnect(receive, deliver())
        else:
            await deliver()
        if result == "truncate":
            await cut_connection(scope, receive)
    finally:
        emulator.finish(ticket, result)


def _site_routes(emulator: KimiAiChatEmulator) -> list[Route]:
    async def page(scope: Scope, receive: Receive, send: Send) -> None:
        mode, nonce = emulator.fetch_page()
        if mode in CHALLENGE_STATUS:
            await send_whole(send, CHALLENGE_STATUS[mode], CHALLENGE_HEADERS, CHALLENGE_PAGE)
            return
        base = str(Request(scope).base_url).rstrip("/")
        cache = b"HIT" if mode == "stale" else b"DYNAMIC"
        body = chat_page(emulator, base, nonce, emulator.stats.page_fetches)
        await send_whole(send, 200, ((b"content-type", HTML), (b"cf-cache-status", cache)), body)

    async def ajax(scope: Scope, receive: Receive, send: Send) -> None:
        raw = await read_body(receive)
        verdict = emulator.begin(parse_form(scope, raw))
        if isinstance(verdict, Ticket):
            await _reply(emulator, verdict, scope, receive, send)
        elif verdict.kind == "reset":
            await cut_connection(scope, receive)
        else:
            await send_whole(send, *render(verdict))

    async def rotate(request: Request) -> Response:
        nonce = emulator.rotate_nonce()
        return Response(orjson.dumps({"nonce": nonce, "previous_nonce": emulator.previous_nonce}),
                        media_type="application/json")

    return [
        Route("/chat/", Endpoint(page), methods=["GET"]),
        Route("/wp-admin/admin-ajax.php", Endpoint(ajax), methods=["POST"]),
        Route("/__fake/rotate", rotate, methods=["POST"]),
    ]


async def _not_found(request: Request, exc: Exception) -> Response:
    """Unknown paths get WordPress's HTML 404, other HTTP errors a bare page with their status."""
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    title = "Page not found &#8211; Kimi AI Chat" if status == 404 else f"{status} {HTTPStatus(status).phrase}"
    return Response(f"<!DOCTYPE html><html><head><title>{title}</title></head><body></body></html>",
                    status_code=status, media_type="text/html")


def create_kimi_ai_chat_emulator(config: KimiAiChatEmulatorConfig | None = None, *,
                                 clock: Clock | None = None) -> EmulatorApp:
    """The emulator as an ASGI app; its state is ``app.state.emulator``."""
    emulator = KimiAiChatEmulator(config if config is not None else KimiAiChatEmulatorConfig(),
                                  clock if clock is not None else SystemClock())
    app = EmulatorApp(
        routes=[*_site_routes(emulator), *control_routes(emulator)],
        exception_handlers={404: _not_found, 405: _not_found},
    )
    app.state.emulator = emulator
    return app
