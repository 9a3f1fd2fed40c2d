"""The config's published numbers (`published:`): how an entry is named in errors and which data sets its number is
measured on. Pure Python: the config checks (tamperlab.config) read them at start-up, published.csv
(reporting.published_table) when it sets ours beside theirs.
"""

from __future__ import annotations

from typing import Any

RATE_METRICS = ("refusal_rate", "asr", "harmfulness")  # the refusal evaluation's; the last two are 1 - refusal


def published_benchmarks(entry: dict[str, Any]) -> list[str]:
    """The sources a published number is on: none (the pooled evaluation), one, or several pooled."""
    benchmark = entry.get("benchmark")
    return [] if benchmark is None else [benchmark] if isinstance(benchmark, str) else list(benchmark)


def published_name(entry: dict[str, Any]) -> str:
    """How an error names a published entry: table, subject and metric."""
    subject = "/".join(str(entry.get(k)) for k in ("model", "defence", "attack", "cell") if entry.get(k))
    return f"{entry.get('table')} {subject} {entry.get('metric')}"
