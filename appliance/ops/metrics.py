"""Prometheus metrics of one app, in its own ``CollectorRegistry``.

Never the process-wide default registry: several apps may live in one
process (tests), and a global registry would mix their counts. Event
counters are updated by the request hooks and the run observer; figures of
the running system (workers, queue, cells, chain length, license and
registry expiry) are read at scrape time by a collector, each one guarded so
a failing source hides a gauge instead of failing the scrape.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from appliance import __version__

log = logging.getLogger("cell.ops.metrics")

HTTP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RUN_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST

# T-DOS-2 (metrics): every label value of a series comes from a bounded set.
# The HTTP method is the one a client picks freely (waitress takes any
# upper-case token), so any method outside this set is counted as "other";
# otherwise each made-up method, even unauthenticated, would add series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# Labelled children kept for reuse (label checks cost more than the count);
# the label sets are bounded, this is a bound on the memo all the same.
MAX_CACHED_CHILDREN = 4096


def method_label(method: str) -> str:
    """The method as a metric label: one of :data:`HTTP_METHODS` or "other"."""
    return method if method in HTTP_METHODS else "other"


class _LiveCollector(Collector):
    """Gauges read from the services at scrape time."""

    def __init__(self, services: Any) -> None:
        self._services = services

    def collect(self) -> Iterable[Metric]:
        s = self._services
        yield from self._guarded("pool", lambda: self._pool(s.pool.stats()))
        yield from self._guarded("cells", lambda: [self._gauge("cell_live_cells", "Cells that exist now (all tenants).",
                                                               len(s.store.list_cells()))])
        yield from self._guarded("receipts", lambda: [self._gauge(
            "cell_receipt_chain_length", "Receipts in this node's hash chain.", s.receipts.count())])
        if getattr(s, "receipt_audit", None) is not None:
            yield from self._guarded("receipt audit", lambda: self._audit(s.receipt_audit.stats()))
        if getattr(s, "license", None) is not None:
            yield from self._guarded("license", lambda: self._license(s.license.summary()))
        if getattr(s, "mirror", None) is not None:
            yield from self._guarded("registry", lambda: self._registry(s.mirror.status()))
        info = InfoMetricFamily("cell_build", "Version of this node.")
        info.add_metric([], {"version": __version__, "node_id": str(s.settings.node_id)})
        yield info

    @staticmethod
    def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
        return GaugeMetricFamily(name, doc, value=value)

    def _guarded(self, what: str, make: Callable[[], list[Metric]]) -> Iterable[Metric]:
        try:
            return make()
        except Exception as exc:  # a scrape must never take the node down or answer 500
            log.warning("metrics source %s unavailable: %s", what, type(exc).__name__)
            return []

    def _pool(self, stats: dict[str, Any]) -> list[Metric]:
        return [
            self._gauge("cell_workers", "Worker processes in the pool.", stats.get("workers", 0)),
            self._gauge("cell_workers_busy", "Workers running a request now.", stats.get("busy", 0)),
            self._gauge("cell_queue_depth", "Requests waiting for a worker.", stats.get("waiting", 0)),
            self._gauge("cell_bound_cells", "Cells whose interpreter is held by a worker.", stats.get("cells", 0)),
            self._gauge("cell_worker_kills", "Workers killed (deadline or crash) since start.", stats.get("kills", 0)),
        ]

    def _audit(self, stats: dict[str, int]) -> list[Metric]:
        return [
            self._gauge("cell_receipt_audit_verified", "Receipts the live auditor has verified (chain prefix).",
                        stats["verified_through"]),
            self._gauge("cell_receipt_audit_failed", "1 when the live auditor found the chain broken.", stats["failed"]),
            CounterMetricFamily("cell_receipt_audit_rows", "Receipt rows the live auditor has checked since start.",
                                value=stats["rows_checked"]),
            CounterMetricFamily("cell_receipt_audit_signatures", "Receipt signatures the live auditor has checked.",
                                value=stats["signatures_checked"]),
        ]

    def _license(self, summary: dict[str, Any]) -> list[Metric]:
        tier = GaugeMetricFamily("cell_license_tier", "1 for the tier honoured now.", labels=["tier"])
        tier.add_metric([str(summary.get("tier", "free"))], 1)
        out: list[Metric] = [tier]
        if summary.get("days_left") is not None:
            out.append(self._gauge("cell_license_days_left", "Days until the license expires.", float(summary["days_left"])))
        return out

    def _registry(self, status: dict[str, Any]) -> list[Metric]:
        if not status.get("ok") or status.get("days_until_expiry") is None:
            return []
        return [self._gauge("cell_registry_days_left", "Days until the trust-registry metadata expires.",
                            float(status["days_until_expiry"]))]


class OpsMetrics:
    def __init__(self, services: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.http_requests = Counter("cell_http_requests", "HTTP requests answered.", ["method", "route", "status"], registry=r)
        self.http_latency = Histogram("cell_http_request_duration_seconds", "Time to the response headers.",
                                      ["method", "route"], buckets=HTTP_BUCKETS, registry=r)
        self.runs = Counter("cell_runs", "Runs by template and result status.", ["template", "status"], registry=r)
        self.run_latency = Histogram("cell_run_duration_seconds", "Run latency seen by the host (queue + guest).",
                                     ["template"], buckets=RUN_BUCKETS, registry=r)
        self.guest_latency = Histogram("cell_run_guest_duration_seconds", "Time inside the guest.",
                                       ["template"], buckets=RUN_BUCKETS, registry=r)
        self.rate_limited = Counter("cell_rate_limit_rejections", "Requests answered 429.", registry=r)
        self.busy = Counter("cell_busy_rejections", "Requests answered 503 (every worker busy, queue full).", registry=r)
        self.denials = Counter("cell_policy_denials", "Host-function calls denied by policy.", ["threat", "function"], registry=r)
        self.receipts = Counter("cell_receipts_written", "Receipts written by this process.", registry=r)
        r.register(_LiveCollector(services))
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}  # see MAX_CACHED_CHILDREN

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        key = (id(metric), labels)
        child = self._children.get(key)
        if child is None:
            child = metric.labels(*labels)
            if len(self._children) < MAX_CACHED_CHILDREN:
                self._children[key] = child
        return child

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method_label(method)
        self._child(self.http_requests, (method, route, str(status))).inc()
        self._child(self.http_latency, (method, route)).observe(seconds)
        if status == 429:
            self.rate_limited.inc()
        elif status == 503:
            self.busy.inc()

    def observe_run(self, summary: dict[str, Any]) -> None:
        template = str(summary.get("template", ""))[:32]
        self._child(self.runs, (template, str(summary.get("status", ""))[:32])).inc()
        if isinstance(summary.get("latency_ms"), (int, float)):
            self._child(self.run_latency, (template,)).observe(summary["latency_ms"] / 1000)
        if isinstance(summary.get("guest_ms"), (int, float)):
            self._child(self.guest_latency, (template,)).observe(summary["guest_ms"] / 1000)
        if summary.get("receipt_seq") is not None:
            self.receipts.inc()
        for denial in summary.get("denials") or []:
            # Labels come from host code (threat IDs, function names), never from
            # the guest, so their cardinality is bounded.
            self.denials.labels(str(denial.get("threat", ""))[:16], str(denial.get("function", ""))[:32]).inc()

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
