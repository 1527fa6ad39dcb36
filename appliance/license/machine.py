"""This appliance's machine fingerprint, the value a license's ``machine_id`` binds to.

Definition (documented in docs/licenses.md, and the vendor computes the same)::

    fingerprint = hex(SHA-256(b"cell-license-machine/1\\n" + machine_id_bytes))[:32]

where ``machine_id_bytes`` is the content of ``/etc/machine-id`` (falling back
to ``/var/lib/dbus/machine-id``) with surrounding whitespace stripped, encoded
as ASCII. The fixed label keeps the fingerprint from equalling any other hash
of the machine id (systemd asks applications not to expose the raw id), and
32 hex characters (128 bits) are ample to tell machines apart.

A missing, empty or ``uninitialized`` machine id yields ``None``: such a host
has no stable identity, so a machine-bound license is refused on it (T-LIC-1)
rather than bound to whatever value the next boot invents.
"""
from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Sequence

FINGERPRINT_LABEL = b"cell-license-machine/1\n"
MACHINE_ID_PATHS: tuple[Path, ...] = (Path("/etc/machine-id"), Path("/var/lib/dbus/machine-id"))
_MACHINE_ID = re.compile(r"\A[0-9a-fA-F]{32}\Z")


def fingerprint_from_machine_id(machine_id: str) -> str:
    """The fingerprint of a machine id string (as printed by `cat /etc/machine-id`)."""
    value = machine_id.strip()
    if not _MACHINE_ID.match(value):
        raise ValueError("a machine id is 32 hexadecimal characters")
    return hashlib.sha256(FINGERPRINT_LABEL + value.lower().encode("ascii")).hexdigest()[:32]


def machine_fingerprint(paths: Sequence[Path] = MACHINE_ID_PATHS) -> str | None:
    """This host's fingerprint, or None when it has no usable machine id."""
    for path in paths:
        try:
            raw = path.read_text(encoding="ascii", errors="strict")
        except (OSError, UnicodeDecodeError):
            continue
        try:
            return fingerprint_from_machine_id(raw)
        except ValueError:
            continue  # empty or "uninitialized" during first boot
    return None
