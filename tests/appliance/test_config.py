"""One typed config: defaults < config.toml < environment; bad values stop
start-up with the key named, never silently replaced."""
from __future__ import annotations

from pathlib import Path

import pytest

from appliance.config import ConfigError, load_egress_hosts, load_settings


def env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {"SYNAPSE_CONFIG_DIR": str(tmp_path), **extra}


def test_defaults(tmp_path: Path) -> None:
    s = load_settings(env(tmp_path))
    assert (s.rate_limit_rps, s.egress, s.telemetry, s.host, s.port) == (20.0, "off", "off", "127.0.0.1", 8080)
    assert s.license_path == tmp_path / "license.json"
    assert s.db_path == s.root / "db" / "cell.sqlite"
    assert (s.cell_capture_idle_s, s.cell_pause_idle_s) == (2, 0)  # idle captures on, pausing off
    assert load_settings(env(tmp_path, SYNAPSE_CELL_CAPTURE_IDLE_S="0")).cell_capture_idle_s == 0  # off


def test_environment_beats_file_beats_default(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('rate_limit_rps = 5\negress = "on"\n')
    s = load_settings(env(tmp_path, SYNAPSE_RATE_LIMIT_RPS="7"))
    assert (s.rate_limit_rps, s.egress) == (7.0, "on")


@pytest.mark.parametrize(
    "key,value",
    [
        ("SYNAPSE_RATE_LIMIT_RPS", "20abc"), ("SYNAPSE_RATE_LIMIT_RPS", "-1"), ("SYNAPSE_RATE_LIMIT_RPS", "nan"),
        ("SYNAPSE_RATE_LIMIT_RPS", "0"), ("SYNAPSE_EGRESS", "maybe"), ("SYNAPSE_TELEMETRY", "yes"),
        ("SYNAPSE_PORT", "99999"), ("SYNAPSE_WORKERS", "0"), ("SYNAPSE_MEMORY_MB", "1"),
        ("SYNAPSE_TRUSTED_PROXIES", "not-an-ip"), ("SYNAPSE_RUN_TIMEOUT_MS", "600000"), ("SYNAPSE_EGRESS_ALLOW", "bad host!"),
        ("SYNAPSE_EGRESS_DENY", "10.0.0.0/33"), ("SYNAPSE_EGRESS_DENY", "2001:db8::/64,example.com"),
        ("SYNAPSE_EGRESS_DENY", "fe80::1%eth0"),
        ("SYNAPSE_LANES_PER_WORKER", "0"), ("SYNAPSE_TENANT_MAX_RUNS", "-1"), ("SYNAPSE_TENANT_MAX_QUEUED", "lots"),
        ("SYNAPSE_TENANT_MAX_CELLS", "-5"), ("SYNAPSE_CELL_CAPTURE_IDLE_S", "-1"), ("SYNAPSE_CELL_CAPTURE_IDLE_S", "2s"),
    ],
)
def test_bad_value_fails_naming_the_key(tmp_path: Path, key: str, value: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_settings(env(tmp_path, **{key: value}))
    assert key in str(info.value)


@pytest.mark.parametrize("workers,lanes", [(1, 1), (2, 2), (16, 2), (64, 4)])
def test_t_fair_1_one_tenant_never_holds_half_the_http_threads(tmp_path: Path, workers: int, lanes: int) -> None:
    from appliance.runtime.pool import tenant_queue_cap

    s = load_settings(env(tmp_path, SYNAPSE_WORKERS=str(workers), SYNAPSE_LANES_PER_WORKER=str(lanes)))
    assert (s.tenant_max_runs, s.tenant_max_queued, s.tenant_max_cells) == (0, 0, 0)
    running = workers * lanes  # an upper bound of one tenant's runs in flight
    assert running + tenant_queue_cap(s) <= s.http_threads // 2 + running // 2 + 1
    assert s.http_threads <= 256  # waitress select()s: stay far below 1024 descriptors


def test_unknown_toml_key_is_refused(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text("rate_limt_rps = 5\n")
    with pytest.raises(ConfigError, match="rate_limt_rps"):
        load_settings(env(tmp_path))


def test_egress_hosts_map_must_hold_addresses(tmp_path: Path) -> None:
    good = tmp_path / "hosts.json"
    good.write_text('{"Example.COM.": ["93.184.215.14"]}')
    assert load_egress_hosts(good) == {"example.com": ["93.184.215.14"]}
    bad = tmp_path / "bad.json"
    bad.write_text('{"x": ["localhost"]}')
    with pytest.raises(ConfigError, match="SYNAPSE_EGRESS_HOSTS"):
        load_egress_hosts(bad)


def test_t_ssrf_1_egress_deny_list_from_file_and_environment(tmp_path: Path) -> None:
    (tmp_path / "config.toml").write_text('egress_deny = ["2001:db8:1::/48", "10.1.2.3/24"]\n')
    assert load_settings(env(tmp_path)).egress_deny == ("2001:db8:1::/48", "10.1.2.0/24")
    assert load_settings(env(tmp_path, SYNAPSE_EGRESS_DENY=" 8.8.8.8 ,2a00::/16")).egress_deny == ("8.8.8.8/32", "2a00::/16")
    (tmp_path / "config.toml").write_text('egress_deny = ["not-a-cidr"]\n')
    with pytest.raises(ConfigError, match="egress_deny"):
        load_settings(env(tmp_path))
