"""Render ``bench/out/latest.json`` (written by ``bench/run.py``) as the Markdown tables of RESULTS.md.

    python bench/report.py [bench/out/latest.json]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

ORDER = ("direct", "passthrough", "kimi-pool", "litellm")


def _get(result: dict[str, Any], *path: str) -> Any:
    value: Any = result
    for key in path:
        if not isinstance(value, dict) or key not in value:
            return None
        value = value[key]
    return value


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def render(payload: dict[str, Any]) -> str:
    results: dict[str, Any] = payload["results"]
    names = [n for n in ORDER if n in results]
    lines = ["| path | JSON c32 req/s | p50 / p99 ms | JSON c128 req/s | p50 / p99 ms | stream c32 req/s | "
             "CPU ms/req | RSS idle → after streams MB | errors |", "|---" * 9 + "|"]
    for name in names:
        r = results[name]
        errors = sum(_get(r, k, "errors") or 0 for k in ("json_c32", "json_c128", "stream_c32"))
        memory = (f"{_fmt(_get(r, 'idle', 'rss_mb'), 0)} → {_fmt(_get(r, 'after_streams', 'rss_mb'), 0)}"
                  if "idle" in r else "-")
        lines.append(
            f"| {name} | {_fmt(_get(r, 'json_c32', 'rps'))} | {_fmt(_get(r, 'json_c32', 'p50_ms'), 2)} / "
            f"{_fmt(_get(r, 'json_c32', 'p99_ms'), 2)} | {_fmt(_get(r, 'json_c128', 'rps'))} | "
            f"{_fmt(_get(r, 'json_c128', 'p50_ms'), 2)} / {_fmt(_get(r, 'json_c128', 'p99_ms'), 2)} | "
            f"{_fmt(_get(r, 'stream_c32', 'rps'))} | {_fmt(_get(r, 'json_c32', 'cpu_ms_per_req'), 3)} | "
            f"{memory} | {errors} |")
    lines += ["", "Slow streams (20 chunks over ~1 s each, all opened at once):", "",
              "| path | x32 TTFB p50 / p99 ms | x32 total p50 / p99 ms | x500 streams/s | x500 TTFB p50 / p99 ms | "
              "x500 total p50 / p99 ms | x500 completed |", "|---" * 7 + "|"]
    for name in names:
        s32, s500 = _get(results[name], "slow_32") or {}, _get(results[name], "slow_500") or {}
        lines.append(
            f"| {name} | {_fmt(s32.get('ttfb_p50_ms'), 1)} / {_fmt(s32.get('ttfb_p99_ms'), 1)} | "
            f"{_fmt(s32.get('total_p50_ms'))} / {_fmt(s32.get('total_p99_ms'))} | "
            f"{_fmt(s500.get('streams_per_s'), 1)} | {_fmt(s500.get('ttfb_p50_ms'), 1)} / "
            f"{_fmt(s500.get('ttfb_p99_ms'), 1)} | {_fmt(s500.get('total_p50_ms'))} / "
            f"{_fmt(s500.get('total_p99_ms'))} | {_fmt(s500.get('ok'))}/{_fmt(s500.get('n'))} |")
    kp = results.get("kimi-pool", {})
    ratios = []
    for other in ("passthrough", "litellm"):
        if other in results and kp:
            for key in ("json_c32", "json_c128", "stream_c32"):
                mine, theirs = _get(kp, key, "rps"), _get(results[other], key, "rps")
                if mine and theirs:
                    ratios.append(f"kimi-pool / {other}, {key}: {mine / theirs:.2f}x")
    if ratios:
        lines += ["", "Ratios from this run: " + "; ".join(ratios) + "."]
    versions = ", ".join(f"{k} {v}" for k, v in payload["versions"].items())
    lines += ["", f"Run {payload['when']}: `{payload['command']}`. Versions: {versions}."]
    return "\n".join(lines)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).parent / "out" / "latest.json"
    print(render(json.loads(path.read_text())))


if __name__ == "__main__":
    main()
