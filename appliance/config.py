"""The one typed configuration of a Cell node.

Read once, in this order: built-in defaults < ``config.toml`` (in the config
directory) < environment. This module is the only reader of ``os.environ`` and
of the config file; everything else receives a frozen :class:`Settings`.
A bad value stops start-up with a message naming the key; it is never
silently replaced by a default.
"""
from __future__ import annotations

import hashlib
import ipaddress
import json
import os
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

from appliance.cluster.policy import ClusterRecordError, check_addr, check_endpoint, check_node_id
from appliance.errors import ConfigError
from appliance.policy.egress import parse_networks

# Hard ceilings of the appliance. Config and licenses may lower limits, never
# raise them past these (threat T-DOS-1).
HARD_RUN_TIMEOUT_MS = 60_000
HARD_MEMORY_MB = 4096
HARD_OUTPUT_BYTES = 16 * 1024 * 1024
HARD_RESULTS_BYTES = 64 * 1024 * 1024  # rich results (charts, tables) of one run, all together
HARD_BODY_BYTES = 10 * 1024 * 1024
HARD_QUOTA_MB = 1024 * 1024  # 1 TiB per tenant
HARD_FILE_LIMIT = 100_000_000  # files and directories per tenant (T-DISK-1)


@dataclass(frozen=True)
class Settings:
    root: Path = Path(".synapse")
    config_dir: Path = Path("/etc/synapse")
    license_path: Path = Path("/etc/synapse/license.json")
    host: str = "127.0.0.1"
    port: int = 8080
    rate_limit_rps: float = 20.0
    rate_limit_burst: int = 40
    egress: str = "off"
    egress_allow: tuple[str, ...] = ()
    egress_deny: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    telemetry: str = "off"
    workers: int = 2
    queue_max: int = 64
    run_timeout_ms: int = 10_000
    run_timeout_ceiling_ms: int = HARD_RUN_TIMEOUT_MS
    kill_grace_ms: int = 1_000
    memory_mb: int = 256
    memory_ceiling_mb: int = 2048
    output_cap_bytes: int = 1024 * 1024
    result_cap_bytes: int = 8 * 1024 * 1024  # one rich result (a chart's PNG as base64, a table's HTML)
    results_cap_bytes: int = 16 * 1024 * 1024  # all rich results of one run
    module_max_bytes: int = 8 * 1024 * 1024
    max_body_bytes: int = HARD_BODY_BYTES
    cell_timeout_ms: int = 300_000
    cell_timeout_ceiling_ms: int = 24 * 3600 * 1000
    warm_python: int = 2
    warm_javascript: int = 2
    warm_python_preload: tuple[str, ...] = ()
    python_image: str = "on"  # new Python cells start from the image `cell warm` built (images.py)
    max_cells_per_worker: int = 200
    lanes_per_worker: int = 2
    tenant_max_runs: int = 0
    tenant_max_queued: int = 0
    tenant_max_cells: int = 0
    node_id: str = ""
    module_cache: Path | None = None
    egress_hosts: Path | None = None
    checkpoint_interval_s: int = 300
    tenant_quota_mb: int = 1024
    tenant_file_limit: int = 100_000
    metrics_token: str = field(default="", repr=False)
    log_file: Path | None = None
    log_level: str = "info"
    mcp_servers: Path | None = None
    # T-ESCAPE-1: "required" refuses to start without Landlock and seccomp;
    # "off-unsafe" is the operator's explicit, logged override.
    worker_sandbox: str = "required"
    # Cluster (docs/cluster.md): etcd client URLs and the HOST:PORT peers and
    # HAProxy use for this node. Both empty: a standalone node.
    cluster_etcd: tuple[str, ...] = ()
    node_addr: str = ""
    # Bearer token of the node-to-node routes (receipt exports for `verify --cluster`).
    cluster_token: str = field(default="", repr=False)

    @property
    def clustered(self) -> bool:
        return bool(self.cluster_etcd)
    # T-TENANT-1: tenant-bound workers (docs/workers.md). ``workers`` is the
    # budget of worker processes kept (bound + spares); when every one holds
    # live cells of other tenants the pool may start more, up to
    # ``workers_max`` (0 = automatic: 2 x workers + 4, at most 256), and past
    # that answers 503 no_worker with Retry-After.
    workers_max: int = 0
    worker_spares: int = 1  # unbound, confined workers kept ready to bind to a new tenant
    worker_idle_s: int = 60  # a bound worker without cells or runs this long is reclaimed
    cell_pause_idle_s: int = 0  # a persistent Python cell idle this long is paused to its snapshot (0: never)
    # A persistent Python cell that ran and then stayed idle this long is captured
    # to its snapshot, its session kept: a later crash rolls back to it (0: never).
    cell_capture_idle_s: int = 2

    @property
    def http_threads(self) -> int:
        """Request threads of the web server. A run holds one while it waits
        and while it runs, so there are enough for every lane twice plus
        headroom, and one tenant's waiting runs are capped below half of them
        (``pool.tenant_queue_cap``): a flood cannot take every thread and keep
        another tenant's request from even being read (T-FAIR-1). Each thread
        keeps its own SQLite readers and waitress polls with select(), so the
        count stays well below 1024 descriptors."""
        return min(256, 32 + 2 * self.workers * self.lanes_per_worker)

    @property
    def worker_ceiling(self) -> int:
        """The most worker processes the pool may run (T-TENANT-1, T-DOS-2)."""
        return self.workers_max or min(256, 2 * self.workers + 4)

    @property
    def volumes_dir(self) -> Path:
        return self.root / "sandbox_volumes"

    @property
    def snapshots_dir(self) -> Path:
        """Captured cell states (snapshot_file.py, T-IMAGE-2)."""
        return self.root / "snapshots"

    @property
    def db_path(self) -> Path:
        return self.root / "db" / "cell.sqlite"

    @property
    def cache_dir(self) -> Path:
        return self.module_cache or (self.root / "cache" / "modules")

    @property
    def keys_dir(self) -> Path:
        return self.root / "keys"

    @property
    def weights_dir(self) -> Path:
        return self.root / "weights"

    @property
    def mirror_dir(self) -> Path:
        return self.root / "mirror"

    def with_overrides(self, **changes: Any) -> "Settings":
        return replace(self, **changes)


def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def parse(key: str, raw: Any) -> int:
        if isinstance(raw, bool):
            raise ConfigError(key, f"expected an integer, got {raw!r}")
        if isinstance(raw, int):
            value = raw
        else:
            text = str(raw).strip()
            if not text.isascii() or not text.lstrip("-").isdigit():
                raise ConfigError(key, f"expected an integer, got {raw!r}")
            value = int(text)
        if not lo <= value <= hi:
            raise ConfigError(key, f"must be between {lo} and {hi}, got {value}")
        return value

    return parse


def _float(lo: float, hi: float) -> Callable[[str, Any], float]:
    def parse(key: str, raw: Any) -> float:
        if isinstance(raw, bool):
            raise ConfigError(key, f"expected a number, got {raw!r}")
        try:
            value = float(raw)
        except (TypeError, ValueError):
            raise ConfigError(key, f"expected a number, got {raw!r}") from None
        if value != value or not lo <= value <= hi:  # NaN compares false
            raise ConfigError(key, f"must be between {lo} and {hi}, got {raw!r}")
        return value

    return parse


def _choice(*options: str) -> Callable[[str, Any], str]:
    def parse(key: str, raw: Any) -> str:
        value = str(raw).strip().lower()
        if value not in options:
            raise ConfigError(key, f"must be one of {', '.join(options)}, got {raw!r}")
        return value

    return parse


def _path(key: str, raw: Any) -> Path:
    text = str(raw)
    if not text or "\x00" in text:
        raise ConfigError(key, "must be a non-empty path")
    return Path(text)


def _host(key: str, raw: Any) -> str:
    text = str(raw).strip()
    if not text:
        raise ConfigError(key, "must not be empty")
    return text


def _secret(key: str, raw: Any) -> str:
    text = str(raw)
    if text and (len(text) < 16 or not text.isprintable() or " " in text):
        raise ConfigError(key, "must be empty or at least 16 printable characters without spaces")
    return text


def _list(key: str, raw: Any) -> tuple[str, ...]:
    items = raw if isinstance(raw, list) else str(raw).split(",")
    return tuple(str(i).strip() for i in items if str(i).strip())


def _networks(key: str, raw: Any) -> tuple[str, ...]:
    items = _list(key, raw)
    for item in items:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(key, f"{item!r} is not an IP address or network") from None
    return items


def _cidrs(key: str, raw: Any) -> tuple[str, ...]:
    try:
        return tuple(str(net) for net in parse_networks(_list(key, raw)))
    except ValueError as exc:
        raise ConfigError(key, str(exc)) from None


def _modules(key: str, raw: Any) -> tuple[str, ...]:
    items = _list(key, raw)
    for item in items:
        if not all(part.isidentifier() for part in item.split(".")):
            raise ConfigError(key, f"{item!r} is not a Python module name")
    return items


def _hostnames(key: str, raw: Any) -> tuple[str, ...]:
    items = tuple(i.lower() for i in _list(key, raw))
    for item in items:
        if not all(c.isalnum() or c in "-." for c in item) or not item.isascii():
            raise ConfigError(key, f"{item!r} is not a plain host name")
    return items


def _endpoints(key: str, raw: Any) -> tuple[str, ...]:
    try:
        return tuple(check_endpoint(item) for item in _list(key, raw))
    except ClusterRecordError as exc:
        raise ConfigError(key, str(exc)) from None


def _addr(key: str, raw: Any) -> str:
    text = str(raw).strip()
    if not text:
        return ""
    try:
        return check_addr(text)
    except ClusterRecordError as exc:
        raise ConfigError(key, str(exc)) from None


# field name -> (environment variable, toml key, parser)
_FIELDS: dict[str, tuple[str, str, Callable[[str, Any], Any]]] = {
    "root": ("SYNAPSE_ROOT", "root", _path),
    "license_path": ("SYNAPSE_LICENSE", "license", _path),
    "host": ("SYNAPSE_HOST", "host", _host),
    "port": ("SYNAPSE_PORT", "port", _int(0, 65535)),
    "rate_limit_rps": ("SYNAPSE_RATE_LIMIT_RPS", "rate_limit_rps", _float(0.1, 100_000)),
    "rate_limit_burst": ("SYNAPSE_RATE_LIMIT_BURST", "rate_limit_burst", _int(1, 1_000_000)),
    "egress": ("SYNAPSE_EGRESS", "egress", _choice("off", "on")),
    "egress_allow": ("SYNAPSE_EGRESS_ALLOW", "egress_allow", _hostnames),
    "egress_deny": ("SYNAPSE_EGRESS_DENY", "egress_deny", _cidrs),
    "trusted_proxies": ("SYNAPSE_TRUSTED_PROXIES", "trusted_proxies", _networks),
    "telemetry": ("SYNAPSE_TELEMETRY", "telemetry", _choice("off", "on")),
    "workers": ("SYNAPSE_WORKERS", "workers", _int(1, 256)),
    "queue_max": ("SYNAPSE_QUEUE_MAX", "queue_max", _int(0, 100_000)),
    "run_timeout_ms": ("SYNAPSE_RUN_TIMEOUT_MS", "run_timeout_ms", _int(10, HARD_RUN_TIMEOUT_MS)),
    "kill_grace_ms": ("SYNAPSE_KILL_GRACE_MS", "kill_grace_ms", _int(100, 10_000)),
    "memory_mb": ("SYNAPSE_MEMORY_MB", "memory_mb", _int(16, HARD_MEMORY_MB)),
    "memory_ceiling_mb": ("SYNAPSE_MEMORY_CEILING_MB", "memory_ceiling_mb", _int(16, HARD_MEMORY_MB)),
    "output_cap_bytes": ("SYNAPSE_OUTPUT_CAP_BYTES", "output_cap_bytes", _int(1024, HARD_OUTPUT_BYTES)),
    "result_cap_bytes": ("SYNAPSE_RESULT_CAP_BYTES", "result_cap_bytes", _int(1024, HARD_RESULTS_BYTES)),
    "results_cap_bytes": ("SYNAPSE_RESULTS_CAP_BYTES", "results_cap_bytes", _int(1024, HARD_RESULTS_BYTES)),
    "module_max_bytes": ("SYNAPSE_MODULE_MAX_BYTES", "module_max_bytes", _int(1024, HARD_BODY_BYTES)),
    "cell_timeout_ms": ("SYNAPSE_CELL_TIMEOUT_MS", "cell_timeout_ms", _int(1000, 24 * 3600 * 1000)),
    "warm_python": ("SYNAPSE_WARM_PYTHON", "warm_python", _int(0, 64)),
    "warm_javascript": ("SYNAPSE_WARM_JAVASCRIPT", "warm_javascript", _int(0, 64)),
    "warm_python_preload": ("SYNAPSE_WARM_PYTHON_PRELOAD", "warm_python_preload", _modules),
    "python_image": ("SYNAPSE_PYTHON_IMAGE", "python_image", _choice("off", "on")),
    "max_cells_per_worker": ("SYNAPSE_MAX_CELLS_PER_WORKER", "max_cells_per_worker", _int(1, 100_000)),
    # T-FAIR-1: per-tenant shares of the node (0 = automatic, see README).
    "lanes_per_worker": ("SYNAPSE_LANES_PER_WORKER", "lanes_per_worker", _int(1, 64)),
    "tenant_max_runs": ("SYNAPSE_TENANT_MAX_RUNS", "tenant_max_runs", _int(0, 100_000)),
    "tenant_max_queued": ("SYNAPSE_TENANT_MAX_QUEUED", "tenant_max_queued", _int(0, 100_000)),
    "tenant_max_cells": ("SYNAPSE_TENANT_MAX_CELLS", "tenant_max_cells", _int(0, 10_000_000)),
    "node_id": ("SYNAPSE_NODE_ID", "node_id", _host),
    "module_cache": ("SYNAPSE_MODULE_CACHE", "module_cache", _path),
    "egress_hosts": ("SYNAPSE_EGRESS_HOSTS", "egress_hosts", _path),
    "checkpoint_interval_s": ("SYNAPSE_CHECKPOINT_INTERVAL_S", "checkpoint_interval_s", _int(1, 86400)),
    "tenant_quota_mb": ("SYNAPSE_TENANT_QUOTA_MB", "tenant_quota_mb", _int(1, HARD_QUOTA_MB)),
    "tenant_file_limit": ("SYNAPSE_TENANT_FILE_LIMIT", "tenant_file_limit", _int(1, HARD_FILE_LIMIT)),
    "metrics_token": ("SYNAPSE_METRICS_TOKEN", "metrics_token", _secret),
    "log_file": ("SYNAPSE_LOG_FILE", "log_file", _path),
    "mcp_servers": ("SYNAPSE_MCP_SERVERS", "mcp_servers", _path),
    "worker_sandbox": ("SYNAPSE_WORKER_SANDBOX", "worker_sandbox", _choice("required", "off-unsafe")),
    "workers_max": ("SYNAPSE_WORKERS_MAX", "workers_max", _int(0, 256)),
    "worker_spares": ("SYNAPSE_WORKER_SPARES", "worker_spares", _int(0, 16)),
    "worker_idle_s": ("SYNAPSE_WORKER_IDLE_S", "worker_idle_s", _int(1, 86400)),
    "cell_pause_idle_s": ("SYNAPSE_CELL_PAUSE_IDLE_S", "cell_pause_idle_s", _int(0, 30 * 86400)),
    "cell_capture_idle_s": ("SYNAPSE_CELL_CAPTURE_IDLE_S", "cell_capture_idle_s", _int(0, 30 * 86400)),
    "log_level": ("SYNAPSE_LOG_LEVEL", "log_level", _choice("debug", "info", "warning", "error")),
    "cluster_etcd": ("SYNAPSE_CLUSTER_ETCD", "cluster_etcd", _endpoints),
    "node_addr": ("SYNAPSE_NODE_ADDR", "node_addr", _addr),
    "cluster_token": ("SYNAPSE_CLUSTER_TOKEN", "cluster_token", _secret),
}


def load_egress_hosts(path: Path | None) -> dict[str, list[str]] | None:
    """A static name -> addresses map used instead of DNS (air-gapped sites,
    and the release audit). Answers are still checked against the deny table,
    so the map can never admit an internal address (T-SSRF-1)."""
    if path is None:
        return None

    try:
        raw = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError("SYNAPSE_EGRESS_HOSTS", f"cannot read {path}: {exc}") from None
    if not isinstance(raw, dict) or not all(
        isinstance(k, str) and isinstance(v, list) and all(isinstance(a, str) for a in v) for k, v in raw.items()
    ):
        raise ConfigError("SYNAPSE_EGRESS_HOSTS", "must be a JSON object of host name -> list of addresses")
    for addrs in raw.values():
        for addr in addrs:
            try:
                ipaddress.ip_address(addr)
            except ValueError:
                raise ConfigError("SYNAPSE_EGRESS_HOSTS", f"{addr!r} is not an IP address") from None
    return {k.lower().rstrip("."): list(v) for k, v in raw.items()}


def default_root(installed: bool) -> Path:
    return Path("/var/lib/synapse") if installed else Path(".synapse")


def load_settings(
    env: Mapping[str, str] | None = None, *, overrides: Mapping[str, Any] | None = None
) -> Settings:
    """Defaults < config.toml < environment < explicit overrides (tests, CLI flags)."""
    env = dict(os.environ if env is None else env)
    config_dir = _path("SYNAPSE_CONFIG_DIR", env.get("SYNAPSE_CONFIG_DIR", "/etc/synapse"))
    values: dict[str, Any] = {
        "config_dir": config_dir,
        "license_path": config_dir / "license.json",
        "workers": max(1, os.cpu_count() or 1),
    }
    toml_file = config_dir / "config.toml"
    file_values: dict[str, Any] = {}
    if toml_file.is_file():
        try:
            file_values = tomllib.loads(toml_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(str(toml_file), f"cannot be read: {exc}") from None
        known = {toml_key for _, toml_key, _ in _FIELDS.values()}
        unknown = sorted(set(file_values) - known)
        if unknown:
            raise ConfigError(str(toml_file), f"unknown keys: {', '.join(unknown)}")
    for name, (env_key, toml_key, parse) in _FIELDS.items():
        if toml_key in file_values:
            values[name] = parse(f"{toml_file}:{toml_key}", file_values[toml_key])
        if env_key in env:
            values[name] = parse(env_key, env[env_key])
    for name, value in (overrides or {}).items():
        if name in _FIELDS:
            values[name] = _FIELDS[name][2](name, value) if isinstance(value, str) else value
        else:
            values[name] = value
    settings = Settings(**values)
    if settings.memory_mb > settings.memory_ceiling_mb:
        raise ConfigError("SYNAPSE_MEMORY_MB", "is above SYNAPSE_MEMORY_CEILING_MB")
    if settings.workers_max and settings.workers_max < settings.workers:
        raise ConfigError("SYNAPSE_WORKERS_MAX", "is below SYNAPSE_WORKERS (0 = automatic)")
    if not settings.node_id:
        settings = replace(settings, node_id=_node_id(settings))
    if settings.clustered:
        if not settings.node_addr:
            raise ConfigError("SYNAPSE_NODE_ADDR", "is required with SYNAPSE_CLUSTER_ETCD (the HOST:PORT peers and HAProxy use)")
        try:
            check_node_id(settings.node_id)
        except ClusterRecordError as exc:
            raise ConfigError("SYNAPSE_NODE_ID", str(exc)) from None
    return settings


def dev_module_cache(env: Mapping[str, str]) -> Path:
    """One compiled-runtime cache per user of this machine, shared by `--dev`
    runs and the test suite, so a newcomer compiles the runtimes once (each
    file is still hash-checked before it is loaded). An installed appliance
    keeps its own under ``$SYNAPSE_ROOT/cache/modules``."""
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "cell" / "modules"


def settings_for_command(*, dev: bool = False, host: str | None = None, port: int | None = None) -> Settings:
    """Settings for a `cell` command: the environment, plus the ./.synapse
    layout of `cell serve --dev` when ``dev``, and any bind flags."""
    env = dict(os.environ)
    if dev:
        env.setdefault("SYNAPSE_ROOT", ".synapse")
        env.setdefault("SYNAPSE_CONFIG_DIR", str(Path(env["SYNAPSE_ROOT"]) / "etc"))
        env.setdefault("SYNAPSE_MODULE_CACHE", str(dev_module_cache(env)))
    overrides: dict[str, Any] = {}
    if host:
        overrides["host"] = host
    if port is not None:
        overrides["port"] = port
    settings = load_settings(env, overrides=overrides)
    return settings.with_overrides(root=settings.root.absolute())


def _node_id(settings: Settings) -> str:
    """A short, stable id for this node, derived from its data root (cell ids carry it)."""

    try:
        machine = Path("/etc/machine-id").read_text().strip()
    except OSError:
        machine = ""
    digest = hashlib.sha256(f"{machine}|{settings.root.resolve()}".encode()).hexdigest()
    return digest[:8]
