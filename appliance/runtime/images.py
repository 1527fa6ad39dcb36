"""The pre-initialised Python image (threat T-IMAGE-1): cells that start with
numpy, pandas and matplotlib already imported.

``cell warm`` builds it once per machine (the Wizer technique, done here in
Python): the pinned runtime, with its mutable globals exported
(``wasmimage.export_mutable_globals``), is started exactly as a Python cell
starts (the same WASI preopens in the same order, the same environment, the
session's boot code), then runs ``IMAGE_RECIPE``; its linear memory and
globals are written as a new module (``wasmimage.write_image``), compiled into
the module cache like the other runtimes and under a key of its own
(``image_key``: the runtime's pin, the stdlib's pin, the boot code, the recipe
and this builder's version), so it can never collide with another entry.

Loading is the module cache's: the compiled file's SHA-256 is recorded when it
is written and checked on the descriptor that is then loaded, so a tampered
image is discarded and never run (T-CACHE-1). A worker only ever *looks up*
the image (before it confines itself, like the other runtime files); it never
builds one. Without a usable image, cells start the plain way.

What a snapshot must not freeze is redone in every new interpreter by the
reset (sessions.py ``PY_FRESH_DEF``; the image defines it as
``_cell_start.fresh`` and every start calls it once, ``PY_FRESH_CALL``): the
environment is the cell's own (libc and ``os.environ`` both), ``random``,
numpy's global generator (its whole key) and tempfile's name sequence are
reseeded from the host's random source, the import cache
entries of the cell's own directories are dropped (``/data`` and ``/tmp`` are
the cell's own), and the working directory is ``/data`` again. The clock is
always read from the host. The build checks that no file descriptor beyond
the session's preopens is open when memory is captured, so the image holds no
descriptor numbers that would mean something else in a cell, and that the
import cache holds no entry outside the stdlib (so the reset need not walk it).
"""
from __future__ import annotations

import hashlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import wasmtime

from appliance.runtime import guest_state, rich, scratch, templates, wasi_shadow, wasmimage
from appliance.runtime.engine import ModuleCache
from appliance.runtime.governor import set_async_stack_size
from appliance.runtime.loader import Loaded, Runtimes, define_custom_imports
from appliance.runtime.sessions import PY_BOOT, PY_IMAGE_START, PythonSession
from appliance.runtime.stack import WASM_STACK

BUILDER_VERSION = 1
# Modules a first run would still load lazily (measured: a pandas groupby
# loads numpy.rec, a frame's repr pandas' string formatter, the first chart
# matplotlib's Agg backend and Pillow's format plugins), and one small pandas
# workload run a few times, so that its first-call caches (numpy's ufunc loops,
# pandas' dispatch) and the interpreter's counters in its code are settled in
# the image rather than written in every cell. Names are kept in a function,
# deleted: the user's namespace gets none of them. No file is left open (a
# chart is not drawn here: its fonts would stay open; FD_CHECK), no random
# number is drawn, no environment is read.
IMAGE_WARM = r"""
def _cell_image_warm():
    import numpy.rec, pandas.io.formats.string, matplotlib.backends.backend_agg, PIL.Image
    import pandas
    PIL.Image.preinit()
    for _ in range(4):
        frame = pandas.DataFrame({'k': list('xyzxy'), 'v': [1, 2, 3, 4, 5]})
        frame.groupby('k')['v'].sum().to_dict()
        repr(frame)
        str(frame.describe())
_cell_image_warm()
del _cell_image_warm
"""

# Run last before the freeze (T-IMAGE-1 is unaffected: it holds only zeroed
# bytes objects and ints it counted itself): the allocator's free blocks left between the image's live objects
# are taken, size by size, until allocations come out contiguous, and kept.
# Otherwise each allocation in a cell landed in a free block on another image
# page and copied that page into the cell (a fresh interpreter's first turn
# wrote ~500 KiB of pages, most a block or two each); now a cell's new objects
# sit together in memory of its own. Costs the image ~2 MiB of memory.
IMAGE_FILL = r"""
def _cell_image_fill():
    import sys
    held = []

    def fill(make, step_most, enough):
        last = prev = run = 0
        for i in range(50000):
            block = make(i)
            held.append(block)
            d = id(block) - last
            run = run + 1 if d == prev and 0 < d <= step_most else 0
            prev, last = d, id(block)
            if run >= enough:
                return
    for n in reversed([*range(2, 512, 4), *range(512, 2048, 32), *range(2048, 8192, 256)]):
        fill(lambda i, n=n: bytes(n), n + 64, 16 if n < 2048 else 4)
    fill(lambda i: i + (1 << 20), 64, 16)  # the smallest blocks: ints and floats
    sys.modules['_cell_start']._held = held
_cell_image_fill()
del _cell_image_fill
"""

# What the image has run after the session's own boot code: the imports and
# their warm-up (IMAGE_WARM), then the start module (sessions.PY_IMAGE_START:
# the per-start reset, defined and settled once here, and the figure signal).
# Then the allocator's holes are filled (IMAGE_FILL) and everything alive is
# moved to the collector's permanent generation: its collections never walk
# (and so never write to) the image's objects, which keeps their pages shared
# between cells.
IMAGE_RECIPE = ("import numpy, pandas, matplotlib\nmatplotlib.use('Agg')\nimport matplotlib.pyplot\n"
                + IMAGE_WARM + PY_IMAGE_START + "import gc\ngc.collect()\n" + IMAGE_FILL + "gc.freeze()\ndel gc\n")
# The build's own session: enough memory for the imports, never a cell's limit.
BUILD_MEMORY = 1 << 30

# Run in the build session after the recipe: every descriptor past the
# preopens must be closed (the image must hold no open file, T-IMAGE-1).
FD_CHECK = r"""
def _cell_fds():
    import os
    open_fds = []
    for fd in range(3, 256):
        try:
            os.fstat(fd)
        except OSError:
            continue
        open_fds.append(fd)
    print(' '.join(map(str, open_fds)))
_cell_fds()
del _cell_fds
"""

# And no import cache entry outside the stdlib (T-IMAGE-1): the reset drops
# only the cell's own directories' entries, trusting the image to hold no other.
IMPORT_CACHE_CHECK = r"""
import sys as _cell_sys
print(sorted(str(p) for p in _cell_sys.path_importer_cache
             if not (isinstance(p, str) and p.startswith('/usr/local/lib/'))))
del _cell_sys
"""


class ImageError(Exception):
    pass


@dataclass
class Image:
    """A compiled image, ready to instantiate."""
    key: str
    module: wasmtime.Module
    pre: wasmtime.InstancePre
    min_bytes: int  # the linear memory every instance of it starts with


def image_key(runtime: templates.Runtime) -> str:
    """The cache key of the image of ``runtime``: its inputs, hashed (never a
    runtime's own pin, so no existing cache entry is ever named)."""
    h = hashlib.sha256()
    for part in (f"cell-python-image/v{BUILDER_VERSION}", runtime.sha256, runtime.stdlib_sha256 or "",
                 PY_BOOT, rich.PY_RICH_BOOT, IMAGE_RECIPE):
        data = part.encode()
        h.update(len(data).to_bytes(8, "little") + data)
    return h.hexdigest()


def _memory_min_bytes(module: wasmtime.Module) -> int:
    for e in module.exports:
        if e.name == "memory" and isinstance(e.type, wasmtime.MemoryType):
            return int(e.type.limits.min) * wasmimage.PAGE
    raise ImageError("the image exports no memory")


def lookup(cache: ModuleCache, engine: wasmtime.Engine, linker: wasmtime.Linker,
           runtime: templates.Runtime) -> Image | None:
    """The image of ``runtime`` if the cache holds one that passes its check
    (T-CACHE-1, T-IMAGE-1); None otherwise. Never builds."""
    key = image_key(runtime)
    module = cache.lookup(engine, key)
    if module is None:
        return None
    try:
        pre = linker.instantiate_pre(module)
        return Image(key, module, pre, _memory_min_bytes(module))
    except (wasmtime.WasmtimeError, ImageError):
        return None


def _build_engine() -> wasmtime.Engine:
    """The engine that runs the instrumented runtime once, for the capture:
    the session's settings, unoptimised code (compiled once, run for seconds)."""
    cfg = wasmtime.Config()
    cfg.epoch_interruption = True
    cfg.consume_fuel = False
    set_async_stack_size(cfg, WASM_STACK)
    cfg.max_wasm_stack = WASM_STACK
    cfg.cranelift_opt_level = "none"
    return wasmtime.Engine(cfg)


def _linker(engine: wasmtime.Engine, runtime: templates.Runtime) -> wasmtime.Linker:
    linker = wasmtime.Linker(engine)
    linker.define_wasi()
    wasi_shadow.define_shadows(linker)
    define_custom_imports(linker, runtime)  # as a cell's: the image runs the same boot code
    return linker


def build(runtimes: Runtimes, progress: Callable[[str], None] | None = None) -> Image:
    """Build (or find) the image of the python3 runtime in ``runtimes``' cache;
    ``ImageError`` says why it could not be built."""
    try:
        return _build(runtimes, progress)
    except (wasmtime.WasmtimeError, wasmimage.WasmFormatError, guest_state.StateError) as e:
        raise ImageError(str(e).split("\n", 1)[0][:300]) from e


def _build(runtimes: Runtimes, progress: Callable[[str], None] | None) -> Image:
    say = progress or (lambda _m: None)
    base = runtimes.get("python3")
    runtime = base.runtime
    found = lookup(runtimes.cache, runtimes.engine, runtimes.python_linker(runtime), runtime)
    if found is not None:
        return found
    key = image_key(runtime)
    started = time.monotonic()
    source = templates.verified_bytes(runtime.wasm, runtime.sha256)  # T-SUPPLY-1: only the pinned runtime
    instrumented = wasmimage.export_mutable_globals(source)
    wasmimage.check_imageable(instrumented)  # before minutes of compiling, not after
    say("building the python image: compiling the instrumented runtime (once per machine)")
    engine = _build_engine()
    module = wasmtime.Module(engine, instrumented)
    linker = _linker(engine, runtime)
    loaded = Loaded(engine=engine, runtime=runtime, module=module, pre=linker.instantiate_pre(module),
                    stdlib_dir=base.stdlib_dir, mpl_data_dir=base.mpl_data_dir)
    say(f"building the python image: running the recipe ({time.monotonic() - started:.0f}s so far)")
    root = Path(tempfile.mkdtemp(prefix="cell-image-"))
    try:
        pool = root / "pool"
        pool.mkdir(mode=0o700)
        volume = pool / "build"
        volume.mkdir(mode=0o700)
        # Same preopens, same order, same environment as a cell (sessions.py).
        session = PythonSession(loaded, str(volume), BUILD_MEMORY, None, None, use_image=False)
        try:
            for code in (IMAGE_RECIPE, FD_CHECK):
                out = session.run(code.encode(), 300.0, 1 << 16, None, None)
                if out.status != "ok":
                    raise ImageError(f"the image recipe failed: {out.stderr.strip()[-300:]}")
            preopens = 3 + (1 if base.mpl_data_dir is not None else 0)  # /data, /usr/local/lib, [mpl-data], /tmp
            expected = " ".join(str(fd) for fd in range(3, 3 + preopens))
            if out.stdout.strip() != expected:
                raise ImageError(f"descriptors open at capture: {out.stdout.strip()!r}, expected the preopens {expected}")
            state = guest_state.capture(module, session.instance, session.store)
            # Checked after the capture, so the captured bytes are what this
            # builder version always wrote; the check's own turn is not in them.
            out = session.run(IMPORT_CACHE_CHECK.encode(), 60.0, 1 << 16, None, None)
            if out.status != "ok" or out.stdout.strip() != "[]":
                raise ImageError(f"import cache entries outside the stdlib at capture: {out.stdout.strip()[:300]!r}")
        finally:
            session.close()
    finally:
        scratch.remove_tmp_dir(str(root / "pool" / "build"))
        shutil.rmtree(root, ignore_errors=True)
    image_bytes = wasmimage.write_image(instrumented, state.memory, state.globals)
    del state, instrumented, source, loaded, module, linker, engine
    say(f"building the python image: compiling the image ({len(image_bytes) >> 20} MiB; "
        f"{time.monotonic() - started:.0f}s so far)")

    def compile_image() -> wasmtime.Module:
        return wasmtime.Module(runtimes.engine, image_bytes)

    runtimes.cache.load(runtimes.engine, key, compile_image, None)
    image = lookup(runtimes.cache, runtimes.engine, runtimes.python_linker(runtime), runtime)
    if image is None:
        raise ImageError("the image was written but does not load back")
    say(f"python image ready in {time.monotonic() - started:.0f}s ({image.min_bytes >> 20} MiB of memory)")
    return image
