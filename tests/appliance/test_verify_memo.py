"""Remembered runtime hashes (appliance/runtime/verify_memo.py): a start skips
the full hash of an unchanged file, and never trusts a changed one (T-CACHE-1)."""
from __future__ import annotations

import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any, Callable

import pytest
import wasmtime

from appliance.runtime import verify_memo
from appliance.runtime.engine import ModuleCache, make_engine
from appliance.runtime.verify_memo import VerifyMemo, identity

WAT = '(module (memory (export "memory") 1) (func (export "run") (result i32) i32.const 42))'
KEY = "cd" * 32


@pytest.fixture(autouse=True)
def settled(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The modules here are written moments before they are loaded: treat them
    as settled, except in the test of that very rule."""
    if "racy" not in request.node.name:
        monkeypatch.setattr(verify_memo, "RACY_NS", -1)


def _compile(engine: wasmtime.Engine, calls: list[int]) -> wasmtime.Module:
    calls.append(1)
    return wasmtime.Module(engine, WAT)


def _runs_42(engine: wasmtime.Engine, module: wasmtime.Module) -> bool:
    store = wasmtime.Store(engine)
    store.set_epoch_deadline(1 << 30)
    return bool(wasmtime.Instance(store, module, []).exports(store)["run"](store) == 42)  # type: ignore[operator]


class HashCount:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.n = 0
        real = verify_memo.sha256_fd

        def counted(fd: int, size: int) -> str | None:
            self.n += 1
            return real(fd, size)

        monkeypatch.setattr(verify_memo, "sha256_fd", counted)


def _memo(tmp_path: Path) -> VerifyMemo:
    memo = VerifyMemo.open(tmp_path / "keys" / "verify-memo")
    assert memo is not None
    return memo


def test_an_unchanged_module_is_not_hashed_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    engine, calls, hashes = make_engine(), [], HashCount(monkeypatch)
    ModuleCache(tmp_path / "modules").load(engine, KEY, lambda: _compile(engine, calls))  # written
    first = ModuleCache(tmp_path / "modules", _memo(tmp_path))
    assert _runs_42(engine, first.load(engine, KEY, lambda: _compile(engine, calls)))
    assert hashes.n == 1  # hashed once, and remembered
    again = ModuleCache(tmp_path / "modules", _memo(tmp_path))  # the next start
    assert _runs_42(engine, again.load(engine, KEY, lambda: _compile(engine, calls)))
    assert hashes.n == 1 and len(calls) == 1 and again.hits == 1
    # The key lives outside the module cache; the cache holds only modules and their records.
    assert (tmp_path / "keys" / "verify-memo" / verify_memo.KEY_FILE).stat().st_mode & 0o777 == 0o600
    assert {p.suffix for p in (tmp_path / "modules").iterdir()} == {".cwasm", ".json"}


def _flip_in_place(path: Path) -> None:
    """Change one byte of the same inode and put its mtime back (ctime moves anyway)."""
    st = path.stat()
    with open(path, "r+b") as f:
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


@pytest.mark.parametrize("tamper", ["flip-in-place", "rename-over", "forged-record", "record-copied-to-new-inode"])
def test_t_cache_1_memo_never_vouches_for_a_changed_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                           tamper: str) -> None:
    engine, calls = make_engine(), []
    ModuleCache(tmp_path / "modules", _memo(tmp_path)).load(engine, KEY, lambda: _compile(engine, calls))
    ModuleCache(tmp_path / "modules", _memo(tmp_path)).load(engine, KEY, lambda: _compile(engine, calls))
    cwasm = next((tmp_path / "modules").glob("*.cwasm"))
    memo_dir = tmp_path / "keys" / "verify-memo"
    good = json.loads(cwasm.with_suffix(".json").read_text())["sha256"]
    old_record = next(p for p in memo_dir.iterdir() if p.suffix == ".json")
    if tamper == "flip-in-place":
        _flip_in_place(cwasm)
    elif tamper == "rename-over":
        st = cwasm.stat()
        data = bytearray(cwasm.read_bytes())
        data[len(data) // 2] ^= 0xFF
        swap = cwasm.with_suffix(".swap")
        swap.write_bytes(bytes(data))
        os.chmod(swap, 0o600)
        os.utime(swap, ns=(st.st_atime_ns, st.st_mtime_ns))
        os.replace(swap, cwasm)
    elif tamper == "forged-record":
        # Someone who can write the records but has no key vouches for a tampered file.
        _flip_in_place(cwasm)
        ident = identity(os.stat(cwasm))
        msg = "cell-verify-memo/1|" + "|".join(str(v) for v in ident) + "|" + good
        mac = hmac.new(b"\0" * 32, msg.encode(), hashlib.sha256).hexdigest()
        (memo_dir / f"{ident[0]:x}-{ident[1]:x}.json").write_text(
            json.dumps({"identity": list(ident), "sha256": good, "mac": mac}))
    elif tamper == "record-copied-to-new-inode":
        # The old, genuine record renamed to the new inode's name: its identity no longer matches.
        st = cwasm.stat()
        data = bytearray(cwasm.read_bytes())
        data[len(data) // 2] ^= 0xFF
        swap = cwasm.with_suffix(".swap")
        swap.write_bytes(bytes(data))
        os.chmod(swap, 0o600)
        os.replace(swap, cwasm)
        ident = identity(os.stat(cwasm))
        os.replace(old_record, memo_dir / f"{ident[0]:x}-{ident[1]:x}.json")
        del st
    module = ModuleCache(tmp_path / "modules", _memo(tmp_path)).load(engine, KEY, lambda: _compile(engine, calls))
    assert len(calls) == 2  # the tampered file was refused and the module compiled again
    assert _runs_42(engine, module)


def test_t_cache_1_a_write_in_place_during_the_load_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The memo checks the descriptor's identity again after deserializing it,
    so the same inode rewritten between the check and the load is not used."""
    engine, calls = make_engine(), []
    ModuleCache(tmp_path / "modules", _memo(tmp_path)).load(engine, KEY, lambda: _compile(engine, calls))
    cwasm = next((tmp_path / "modules").glob("*.cwasm"))
    real_load = wasmtime.Module.deserialize_file
    tampered: list[str] = []

    def write_then_load(eng: wasmtime.Engine, path: str) -> wasmtime.Module:
        if not tampered:
            tampered.append(path)
            with open(cwasm, "r+b") as f:  # same inode: the content changes under the open descriptor
                f.seek(0, os.SEEK_END)
                f.write(b"\0")
        return real_load(eng, path)

    monkeypatch.setattr(wasmtime.Module, "deserialize_file", staticmethod(write_then_load))
    module = ModuleCache(tmp_path / "modules", _memo(tmp_path)).load(engine, KEY, lambda: _compile(engine, calls))
    assert tampered and tampered[0].startswith("/proc/self/fd/")
    assert len(calls) == 2  # not the rewritten file: compiled again
    assert _runs_42(engine, module)


@pytest.mark.parametrize("bad_key", ["group-readable", "wrong-size", "symlink"])
def test_t_cache_1_no_private_key_means_no_memo(tmp_path: Path, bad_key: str) -> None:
    memo_dir = tmp_path / "keys" / "verify-memo"
    assert VerifyMemo.open(memo_dir) is not None
    key = memo_dir / verify_memo.KEY_FILE
    if bad_key == "group-readable":
        os.chmod(key, 0o640)
    elif bad_key == "wrong-size":
        key.write_bytes(b"short")
    elif bad_key == "symlink":
        other = tmp_path / "other-key"
        other.write_bytes(os.urandom(verify_memo.KEY_BYTES))
        os.chmod(other, 0o600)
        key.unlink()
        os.symlink(other, key)
    assert VerifyMemo.open(memo_dir) is None  # every file is hashed in full instead


def test_runtimes_remember_the_shipped_runtime_and_drop_the_key(module_cache: None, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The real start-up path: the second worker start hashes neither the
    runtime nor its compiled module; the key is dropped once loading is over."""
    from appliance.runtime.loader import Runtimes
    from tests.liveserver import shared_cache

    memo_dir = tmp_path / "keys" / "verify-memo"
    first = Runtimes(shared_cache(), confining=True, verify_memo=memo_dir)
    try:
        first.get("javascript")
    finally:
        first.close()
    calls: list[Any] = []

    def no_hash(*a: Any) -> None:
        calls.append(a)
        raise AssertionError("hashed again")

    monkeypatch.setattr(verify_memo, "sha256_fd", no_hash)
    second = Runtimes(shared_cache(), confining=True, verify_memo=memo_dir)
    try:
        second.get("javascript")
        assert not calls and second.cache.hits == 1
        second.forget_memo()
        assert second.memo is None and second.cache.memo is None
    finally:
        second.close()


def test_t_cache_1_a_file_changed_moments_ago_is_not_remembered_racy(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """File times tick coarsely, so a file written within RACY_NS is hashed at
    every load until it has settled: a second write in the same tick cannot
    hide behind a remembered hash."""
    engine, calls, hashes = make_engine(), [], HashCount(monkeypatch)
    for _ in range(3):  # written, then loaded twice
        module = ModuleCache(tmp_path / "modules", _memo(tmp_path)).load(engine, KEY, lambda: _compile(engine, calls))
        assert _runs_42(engine, module)
    assert hashes.n == 2 and len(calls) == 1  # both loads hashed in full
    assert not [p for p in (tmp_path / "keys" / "verify-memo").iterdir() if p.suffix == ".json"]


# -- matplotlib's data tree (T-SUPPLY-1): remembered by its fingerprint ----------------------
MPL_FILES = {"matplotlibrc": b"backend: agg\n", "fonts/ttf/DejaVuSans.ttf": b"\x00\x01\x00\x00" + b"f" * 4000,
             "stylelib/classic.mplstyle": b"lines.linewidth: 1.0\n"}


def _mpl_runtime(tmp_path: Path) -> tuple[Any, Path]:
    """A runtime whose stdlib zip carries a small matplotlib data archive (the real one is ~10 MB)."""
    import io
    import zipfile

    from appliance.runtime import templates

    inner = io.BytesIO()
    with zipfile.ZipFile(inner, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in MPL_FILES.items():
            z.writestr(name, data)
    stdlib_dir = tmp_path / "python-stdlib"
    stdlib_dir.mkdir()
    with zipfile.ZipFile(stdlib_dir / "python315.zip", "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(templates.MPL_DATA_MEMBER, inner.getvalue())
    runtime = templates.Runtime(template="python3", version="test", wasm=tmp_path / "none.wasm", sha256="00" * 32,
                                license="test", stdlib_zip=stdlib_dir / "python315.zip", stdlib_sha256="ab" * 32)
    return runtime, stdlib_dir


class FullChecks:
    """Counts the full checks of the tree against the archive."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from appliance.runtime import templates

        self.n = 0
        real = templates._prepare_mpl_data

        def counted(*a: Any) -> Path | None:
            self.n += 1
            return real(*a)

        monkeypatch.setattr(templates, "_prepare_mpl_data", counted)


def _intact(data: Path) -> bool:
    found = {str(p.relative_to(data)): p.read_bytes() for p in data.rglob("*") if p.is_file() and not p.is_symlink()}
    return found == MPL_FILES and not [p for p in data.rglob("*") if p.is_symlink()]


def test_t_supply_1_an_unchanged_mpl_tree_is_checked_in_full_once(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.runtime import templates

    runtime, stdlib_dir = _mpl_runtime(tmp_path)
    checks, memo = FullChecks(monkeypatch), _memo(tmp_path)
    first = templates.prepare_mpl_data(runtime, stdlib_dir, tmp_path, memo)  # extracted: nothing to remember yet
    assert first is not None and _intact(first)
    for _ in range(3):  # checked in full (and remembered), then vouched for by the memo
        assert templates.prepare_mpl_data(runtime, stdlib_dir, tmp_path, memo) == first
    assert checks.n == 2
    assert templates.prepare_mpl_data(runtime, stdlib_dir, tmp_path, None) == first  # no memo: the full check
    assert checks.n == 3


def _touch_back(path: Path, st: os.stat_result) -> None:
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back: only ctime tells


def _rewrite_same_size(data: Path) -> None:
    rc = data / "matplotlibrc"
    st = rc.stat()
    os.chmod(rc, 0o644)
    rc.write_bytes(b"backend: evil\n"[:st.st_size].ljust(st.st_size, b"\n"))
    os.chmod(rc, 0o444)
    _touch_back(rc, st)


def _replace_by_rename(data: Path) -> None:
    font = data / "fonts" / "ttf" / "DejaVuSans.ttf"
    st = font.stat()
    other = data / "fonts" / "ttf" / ".planted"
    other.write_bytes(b"P" * st.st_size)
    _touch_back(other, st)
    os.rename(other, font)


def _symlink(data: Path) -> None:
    rc = data / "matplotlibrc"
    rc.unlink()
    rc.symlink_to("/etc/passwd")


def _planted(data: Path) -> None:
    (data / "stylelib" / "planted.mplstyle").write_text("axes.prop_cycle: cycler('color', ['r'])\n")


def _removed(data: Path) -> None:
    (data / "stylelib" / "classic.mplstyle").unlink()


def _whole_tree_swapped(data: Path) -> None:
    import shutil

    copy = data.with_name(data.name + ".copy")
    shutil.copytree(data, copy, symlinks=True)
    os.chmod(copy / "matplotlibrc", 0o644)
    (copy / "matplotlibrc").write_bytes(b"backend: evl\n")
    shutil.rmtree(data)
    os.rename(copy, data)


TREE_ATTACKS = [
    pytest.param(_rewrite_same_size, id="rewritten-in-place-same-size-mtime-set-back"),
    pytest.param(_replace_by_rename, id="replaced-by-rename-same-size-mtime-set-back"),
    pytest.param(_symlink, id="file-replaced-by-symlink"),
    pytest.param(_planted, id="file-planted"),
    pytest.param(_removed, id="file-removed"),
    pytest.param(_whole_tree_swapped, id="whole-tree-swapped"),
]


@pytest.mark.parametrize("attack", TREE_ATTACKS)
def test_t_supply_1_memo_never_vouches_for_a_changed_mpl_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              attack: Callable[[Path], None]) -> None:
    from appliance.runtime import templates

    runtime, stdlib_dir = _mpl_runtime(tmp_path)
    memo = _memo(tmp_path)
    data = templates.prepare_mpl_data(runtime, stdlib_dir, tmp_path, memo)
    assert data is not None
    assert templates.prepare_mpl_data(runtime, stdlib_dir, tmp_path, memo) == data  # remembered now
    checks = FullChecks(monkeypatch)
    attack(data)
    assert templates.prepare_mpl_data(runtime, stdlib_dir, tmp_path, memo) == data
    assert checks.n == 1 and _intact(data)  # the full check ran and extracted the archive afresh


def test_t_supply_1_a_forged_tree_record_is_ignored(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A record whose MAC is not made with the memo's key vouches for nothing,
    even one naming the tree's true fingerprint."""
    from appliance.runtime import templates

    runtime, stdlib_dir = _mpl_runtime(tmp_path)
    memo = _memo(tmp_path)
    data = templates.prepare_mpl_data(runtime, stdlib_dir, tmp_path, memo)
    assert data is not None
    templates.prepare_mpl_data(runtime, stdlib_dir, tmp_path, memo)
    records = [p for p in (tmp_path / "keys" / "verify-memo").iterdir() if p.name.startswith("tree-")]
    assert len(records) == 1
    record = json.loads(records[0].read_bytes())
    _rewrite_same_size(data)
    seen = verify_memo.tree_fingerprint(data)
    assert seen is not None and seen[0] != record["fingerprint"]
    msg = f"cell-verify-memo-tree/1|{record['label']}|{seen[0]}".encode()
    record.update(fingerprint=seen[0], mac=hmac.new(b"\0" * 32, msg, hashlib.sha256).hexdigest())
    records[0].write_text(json.dumps(record))
    checks = FullChecks(monkeypatch)
    assert templates.prepare_mpl_data(runtime, stdlib_dir, tmp_path, memo) == data
    assert checks.n == 1 and _intact(data)


def test_t_supply_1_an_mpl_tree_changed_moments_ago_is_not_remembered_racy(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.runtime import templates

    runtime, stdlib_dir = _mpl_runtime(tmp_path)
    memo, checks = _memo(tmp_path), FullChecks(monkeypatch)
    for _ in range(3):
        assert templates.prepare_mpl_data(runtime, stdlib_dir, tmp_path, memo) is not None
    assert checks.n == 3  # just extracted: checked in full at every load until it has settled
    assert not [p for p in (tmp_path / "keys" / "verify-memo").iterdir() if p.name.startswith("tree-")]


def test_tree_fingerprint_refuses_what_is_not_a_plain_tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "tree"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "f").write_text("x")
    assert verify_memo.tree_fingerprint(root) is not None
    assert verify_memo.tree_fingerprint(tmp_path / "missing") is None
    (root / "a" / "fifo").unlink(missing_ok=True)
    os.mkfifo(root / "a" / "fifo")
    assert verify_memo.tree_fingerprint(root) is None  # not a regular file
    os.unlink(root / "a" / "fifo")
    monkeypatch.setattr(verify_memo, "MAX_TREE_ENTRIES", 2)
    assert verify_memo.tree_fingerprint(root) is None  # too large: checked in full instead


# -- the stdlib zip copy the guest imports from (T-SUPPLY-1) ------------------------
STDLIB_ZIP = b"PK pinned stdlib bytes " * 64


def _stdlib_runtime(tmp_path: Path) -> Any:
    from appliance.runtime import templates

    source = tmp_path / "pkg" / "python315.zip"
    source.parent.mkdir()
    source.write_bytes(STDLIB_ZIP)
    return templates.Runtime(template="python3", version="test", wasm=tmp_path / "none.wasm", sha256="00" * 32,
                             license="test", stdlib_zip=source, stdlib_sha256=hashlib.sha256(STDLIB_ZIP).hexdigest())


def _same_size_rewrite(target: Path) -> None:
    st = target.stat()
    target.unlink()  # a hard link to the package's file: write a file of its own, as an attacker would
    target.write_bytes(b"X" * st.st_size)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime set back; ctime cannot be


def _rewrite_in_place(target: Path) -> None:
    with open(target, "r+b") as f:
        f.write(b"evil")


def _symlink(target: Path) -> None:
    evil = target.parent / "evil.zip"
    evil.write_bytes(b"X" * len(STDLIB_ZIP))
    target.unlink()
    target.symlink_to(evil)


def _truncate(target: Path) -> None:
    target.unlink()
    target.write_bytes(STDLIB_ZIP[:10])


def _directory(target: Path) -> None:
    target.unlink()
    target.mkdir()


@pytest.mark.parametrize("with_memo", [True, False], ids=["memo", "no-memo"])
@pytest.mark.parametrize("tamper", [_same_size_rewrite, _symlink, _truncate],
                         ids=["same-size-rewrite-mtime-kept", "symlink", "truncated"])
def test_t_supply_1_a_tampered_stdlib_copy_is_replaced_by_the_pinned_one(tmp_path: Path, tamper: Callable[[Path], None],
                                                                         with_memo: bool) -> None:
    from appliance.runtime import templates

    runtime = _stdlib_runtime(tmp_path)
    memo = VerifyMemo.open(tmp_path / "memo") if with_memo else None
    cache_root = tmp_path / "cache"
    target = templates.prepare_stdlib_dir(runtime, cache_root, memo) / "python315.zip"
    assert target.read_bytes() == STDLIB_ZIP
    templates.prepare_stdlib_dir(runtime, cache_root, memo)  # remembered now (settled), when there is a memo
    tamper(target)
    assert templates.prepare_stdlib_dir(runtime, cache_root, memo) == target.parent
    assert not target.is_symlink() and target.read_bytes() == STDLIB_ZIP


@pytest.mark.parametrize("with_memo", [True, False], ids=["memo", "no-memo"])
@pytest.mark.parametrize("tamper", [_rewrite_in_place, _directory], ids=["rewritten-in-place-with-its-source", "directory"])
def test_t_supply_1_a_stdlib_copy_that_cannot_be_made_right_fails_closed(tmp_path: Path, tamper: Callable[[Path], None],
                                                                       with_memo: bool) -> None:
    """The copy is a hard link of the package's own file: written in place, the
    source is wrong too and the start is refused; a directory in its place is
    never replaced by us, nor served."""
    from appliance.runtime import templates

    runtime = _stdlib_runtime(tmp_path)
    memo = VerifyMemo.open(tmp_path / "memo") if with_memo else None
    cache_root = tmp_path / "cache"
    target = templates.prepare_stdlib_dir(runtime, cache_root, memo) / "python315.zip"
    templates.prepare_stdlib_dir(runtime, cache_root, memo)
    tamper(target)
    with pytest.raises((templates.RuntimeMissing, OSError)):
        templates.prepare_stdlib_dir(runtime, cache_root, memo)


def test_t_supply_1_an_unchanged_stdlib_copy_is_hashed_once_with_the_memo(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance.runtime import templates

    runtime = _stdlib_runtime(tmp_path)
    memo = VerifyMemo.open(tmp_path / "memo")
    hashed: list[int] = []
    real = verify_memo.sha256_fd

    def counted(fd: int, size: int) -> str | None:
        hashed.append(size)
        return real(fd, size)

    monkeypatch.setattr(verify_memo, "sha256_fd", counted)
    cache_root = tmp_path / "cache"
    for _ in range(3):
        templates.prepare_stdlib_dir(runtime, cache_root, memo)
    assert len(hashed) == 1  # the first check of the copy; the later ones by its remembered identity
