"""The worker's Landlock rule set, described as data (threat T-ESCAPE-1).

Pure: this module says which paths a worker may read, write or execute and
which access rights each Landlock ABI knows; :mod:`appliance.runtime.sandbox`
turns a :class:`Rules` into ``landlock_*`` system calls.

A worker, once confined, may

* read (never write) its runtime artifacts: the compiled-module cache, the
  guest Python standard library, the Python installation and the
  ``appliance`` package it imports from, the shared libraries, and the
  operator's weights directory (Pro ``load_weights``);
* read and write only the volume set it serves (today the whole
  ``sandbox_volumes`` directory, which holds its pool scratch; later one
  tenant's directory) and its own FIFO directory;
* nothing else: not ``db/``, ``keys/``, the license, the config directory,
  ``mirror/``, other processes' ``/proc`` entries.

With ABI >= 4 it may not bind or connect any TCP port (``host_fetch`` and MCP
are made by the supervisor's broker, T-ESCAPE-3; ``Rules.network`` stays a
switch of this pure policy, and the pool never sets it);
with ABI >= 6 it may not signal or reach the abstract UNIX sockets of any
process outside its own sandbox (the supervisor included).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

# linux/landlock.h
CREATE_RULESET_VERSION = 1 << 0
RULE_PATH_BENEATH = 1
RULE_NET_PORT = 2

FS_EXECUTE = 1 << 0
FS_WRITE_FILE = 1 << 1
FS_READ_FILE = 1 << 2
FS_READ_DIR = 1 << 3
FS_REMOVE_DIR = 1 << 4
FS_REMOVE_FILE = 1 << 5
FS_MAKE_CHAR = 1 << 6
FS_MAKE_DIR = 1 << 7
FS_MAKE_REG = 1 << 8
FS_MAKE_SOCK = 1 << 9
FS_MAKE_FIFO = 1 << 10
FS_MAKE_BLOCK = 1 << 11
FS_MAKE_SYM = 1 << 12
FS_REFER = 1 << 13  # ABI 2
FS_TRUNCATE = 1 << 14  # ABI 3
FS_IOCTL_DEV = 1 << 15  # ABI 5

NET_BIND_TCP = 1 << 0  # ABI 4
NET_CONNECT_TCP = 1 << 1  # ABI 4

SCOPE_ABSTRACT_UNIX_SOCKET = 1 << 0  # ABI 6
SCOPE_SIGNAL = 1 << 1  # ABI 6

FILE_RIGHTS = FS_EXECUTE | FS_WRITE_FILE | FS_READ_FILE | FS_TRUNCATE | FS_IOCTL_DEV  # what a rule on a file may hold
READ = FS_READ_FILE | FS_READ_DIR
WRITE = (FS_WRITE_FILE | FS_REMOVE_DIR | FS_REMOVE_FILE | FS_MAKE_DIR | FS_MAKE_REG | FS_MAKE_FIFO | FS_MAKE_SYM
         | FS_REFER | FS_TRUNCATE)


def fs_rights(abi: int) -> int:
    """Every filesystem right ABI ``abi`` can restrict (all of them are handled)."""
    if abi < 1:
        return 0
    rights = (1 << 13) - 1
    if abi >= 2:
        rights |= FS_REFER
    if abi >= 3:
        rights |= FS_TRUNCATE
    if abi >= 5:
        rights |= FS_IOCTL_DEV
    return rights


def net_rights(abi: int) -> int:
    return NET_BIND_TCP | NET_CONNECT_TCP if abi >= 4 else 0


def scopes(abi: int) -> int:
    return SCOPE_ABSTRACT_UNIX_SOCKET | SCOPE_SIGNAL if abi >= 6 else 0


@dataclass(frozen=True)
class Rules:
    """Paths a confined worker may use, by kind of access."""
    read_only: tuple[str, ...]
    read_write: tuple[str, ...]
    execute: tuple[str, ...] = ()  # read + execute (a policy switch; a pooled worker gets none: T-ESCAPE-3)
    network: bool = False  # TCP connect allowed (binding never is)
    forbidden: tuple[str, ...] = field(default=())  # must stay out of every grant (checked)

    def grants(self) -> list[tuple[str, int]]:
        """(path, rights) for each rule, before the ABI's mask is applied."""
        out = [(p, READ) for p in self.read_only]
        out += [(p, READ | FS_EXECUTE) for p in self.execute]
        out += [(p, READ | WRITE) for p in self.read_write]
        return out


class RulesError(Exception):
    pass


def _beneath(path: str, parent: str) -> bool:
    path, parent = os.path.normpath(path), os.path.normpath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def check(rules: Rules) -> None:
    """T-ESCAPE-1: refuse a rule set that would hand a worker a secret.

    Every granted path must be absolute and resolved (no symlink in it), and
    no forbidden path (db, keys, config, license, mirror) may lie beneath a
    grant; a grant beneath a forbidden path is refused too.
    """
    for path, _ in rules.grants():
        if not os.path.isabs(path) or os.path.realpath(path) != os.path.normpath(path):
            raise RulesError(f"landlock grant {path!r} is not an absolute resolved path")
        for secret in rules.forbidden:
            if _beneath(secret, path) or _beneath(path, secret):
                raise RulesError(f"landlock grant {path!r} would expose {secret!r} to a worker")


def worker_rules(*, cache_dir: str, stdlib_dir: str | None, code_dirs: tuple[str, ...], system_dirs: tuple[str, ...],
                 weights_dir: str | None, volume_set: tuple[str, ...], scratch_dirs: tuple[str, ...],
                 forbidden: tuple[str, ...], network: bool, spawn_paths: tuple[str, ...] = ()) -> Rules:
    """The rules of one worker. ``volume_set`` is the read-write set it serves
    (a parameter: the whole volumes directory today, one tenant's later)."""
    ro = [cache_dir, *code_dirs, *system_dirs]
    if stdlib_dir:
        ro.append(stdlib_dir)
    if weights_dir:
        ro.append(weights_dir)
    rw = [*volume_set, *scratch_dirs]
    return Rules(read_only=_unique(ro), read_write=_unique(rw), execute=_unique(spawn_paths), network=network,
                 forbidden=_unique(forbidden))


def _unique(paths: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    seen: list[str] = []
    for p in paths:
        if p and p not in seen:
            seen.append(p)
    return tuple(seen)
