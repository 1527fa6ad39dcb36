"""The worker process's entry point as the pool hands it to multiprocessing.

multiprocessing names a process's target by module and function, and the
process that starts it must be able to import that module. Named here, the
web process imports this small module instead of the worker's own (the
engine, wasmtime, the sessions and host functions): `cell serve` starts
faster, and the web process holds less of the code that only workers run.
The worker imports ``appliance.runtime.worker`` itself, as it did before.
"""
from __future__ import annotations

from typing import Any


def worker_main(conn: Any, config: dict[str, Any]) -> None:
    from appliance.runtime.worker import worker_main as main  # the worker's side: see above

    main(conn, config)
