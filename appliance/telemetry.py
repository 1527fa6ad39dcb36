"""Opt-in telemetry: what may be collected, the operator's consent, a local spool.

Three parts, kept apart so each can be checked on its own:

* :func:`aggregate` is pure: run samples in, one report of counters out.
  It reads only the allowlisted keys of each sample (``template``,
  ``status``, ``latency_ms``) and maps anything unexpected to ``"other"``,
  so code, output, file names, IP addresses and tenant names cannot reach a
  report even if a caller hands them in.
* :class:`TelemetryStore` keeps the consent in ``<SYNAPSE_ROOT>/telemetry/
  consent.json`` (mode 0600) and, only while consent is on, writes reports to
  ``<SYNAPSE_ROOT>/telemetry/spool/`` for the operator to carry out on USB.
* Nothing here opens a socket. The appliance is air-gapped: a report leaves
  the machine only when the operator exports the spool and walks it out.

Consent is off by default: no file, an unreadable file or a malformed file
all mean "off", so a damaged consent record can never turn collection on.
"""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

from appliance.fileio import write_atomic
from appliance.runtime import templates

REPORT_SCHEMA = "cell-telemetry/1"
KNOWN_TEMPLATES = tuple(t.name for t in templates.all_templates())
KNOWN_STATUSES = ("ok", "error", "timeout", "memory_limit", "output_limit", "killed")
KNOWN_TIERS = ("free", "pro", "hub")
PERCENTILES = (50, 90, 99)
_VERSION = re.compile(r"\A[0-9A-Za-z.+-]{1,32}\Z")
CONSENT_FILE_MODE = 0o600

# Shown to the operator word for word before they consent; the test pins that
# every key of a real report is described here, so the list cannot go stale.
COLLECTED: tuple[tuple[str, str], ...] = (
    ("schema", "the report format, " + REPORT_SCHEMA),
    ("version", "the Cell software version"),
    ("tier", "the license tier: free, pro or hub"),
    ("period_start_ms / period_end_ms", "the time span the counters cover"),
    ("runs_per_template", "how many runs per template (python3, javascript, wasm)"),
    ("errors_by_code", "how many runs ended in each non-ok status (error, timeout, ...)"),
    ("latency_ms", "run latency percentiles p50, p90, p99 and the sample count"),
)
NEVER_COLLECTED = (
    "code", "program output", "file names", "IP addresses", "tenant names or ids",
    "API keys", "license contents",
)


def _bucket(value: object, allowed: tuple[str, ...]) -> str:
    # Free text never passes: an unexpected value becomes "other".
    return value if isinstance(value, str) and value in allowed else "other"


def _percentile(sorted_values: list[float], pct: int) -> float:
    """Nearest-rank percentile: always one of the observed values."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def aggregate(
    samples: Iterable[Mapping[str, Any]],
    *,
    version: str,
    tier: str,
    period_start_ms: int,
    period_end_ms: int,
) -> dict[str, Any]:
    """Counters over run samples; pure (no clock, no I/O)."""
    runs: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    latencies: list[float] = []
    for sample in samples:
        runs[_bucket(sample.get("template"), KNOWN_TEMPLATES)] += 1
        status = sample.get("status")
        if status != "ok":
            errors[_bucket(status, KNOWN_STATUSES)] += 1
        latency = sample.get("latency_ms")
        if isinstance(latency, (int, float)) and not isinstance(latency, bool) and math.isfinite(latency) and latency >= 0:
            latencies.append(float(latency))
    latencies.sort()
    latency_report: dict[str, Any] = {"count": len(latencies)}
    for pct in PERCENTILES:
        latency_report[f"p{pct}"] = round(_percentile(latencies, pct), 3) if latencies else None
    return {
        "schema": REPORT_SCHEMA,
        "version": version if _VERSION.match(version) else "other",
        "tier": _bucket(tier, KNOWN_TIERS),
        "period_start_ms": int(period_start_ms),
        "period_end_ms": int(period_end_ms),
        "runs_per_template": dict(sorted(runs.items())),
        "errors_by_code": dict(sorted(errors.items())),
        "latency_ms": latency_report,
    }


def _write_private(path: Path, data: bytes) -> None:
    """Atomic write with mode 0600 set on the fd, so the umask cannot widen it."""
    write_atomic(path, data, CONSENT_FILE_MODE)


class TelemetryStore:
    """Consent and spool under ``root/telemetry``; the clock is injected for tests."""

    def __init__(self, root: Path, *, clock: Callable[[], float] = time.time) -> None:
        self._dir = Path(root) / "telemetry"
        self._clock = clock

    @property
    def consent_path(self) -> Path:
        return self._dir / "consent.json"

    @property
    def spool_dir(self) -> Path:
        return self._dir / "spool"

    def consent(self) -> bool:
        try:
            doc = json.loads(self.consent_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and doc.get("consent") is True

    def set_consent(self, on: bool) -> None:
        record = {"consent": bool(on), "changed_at_ms": int(self._clock() * 1000)}
        _write_private(self.consent_path, json.dumps(record, sort_keys=True).encode("utf-8"))
        if not on:
            # Withdrawn consent covers reports not yet carried out, too.
            for path in self.spooled():
                path.unlink(missing_ok=True)

    def record(self, report: Mapping[str, Any]) -> Path | None:
        """Spool one report; without consent, write nothing at all."""
        if not self.consent():
            return None
        name = f"report-{int(self._clock() * 1000)}.json"
        path = self.spool_dir / name
        _write_private(path, json.dumps(report, sort_keys=True, indent=2).encode("utf-8"))
        return path

    def spooled(self) -> list[Path]:
        if not self.spool_dir.is_dir():
            return []
        return sorted(p for p in self.spool_dir.glob("report-*.json") if p.is_file() and not p.is_symlink())

    def export(self, dest_dir: Path) -> list[Path]:
        """Copy spooled reports to ``dest_dir`` (a USB stick); the spool keeps them."""
        if not self.consent():
            return []
        written: list[Path] = []
        for path in self.spooled():
            target = Path(dest_dir) / f"cell-{path.name}"
            shutil.copyfile(path, target)
            written.append(target)
        return written
