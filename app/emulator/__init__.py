"""Faithful fakes of the upstreams kimi-pool speaks, for tests, benchmarks and ``kimi-pool emulate``.

``moonshot`` is the official Open Platform API, ``kimi_ai_chat`` the kimi-ai.chat WordPress site and
``kimi_web`` kimi.com's Connect API (PROTOCOLS.md §4, §1, §3). The parts every emulator shares live beside it:
``control`` (scripted outcomes, ``wait_for``, held streams, ``/__fake/*`` routes), ``asgi`` (cutting
connections, noticing clients that leave), ``stats`` (counters) and ``windows`` (rate-limit windows).
"""
