"""Faithful fakes of the upstreams kimi-pool speaks, for tests, benchmarks and ``kimi-pool emulate``.

``moonshot`` is the official Open Platform API. The parts every emulator shares live beside it:
``control`` (scripted outcomes, ``wait_for``, held streams, ``/__fake/*`` routes), ``asgi`` (cutting
connections, noticing clients that leave), ``stats`` (counters) and ``windows`` (rate-limit windows).
"""
