"""Guest path syntax: turn an untrusted path string into volume components.

Pure policy: this module reads no files, no clock and no environment, and
imports no I/O module. ``appliance.confine`` is the adapter that opens the
components it returns, always beneath the cell volume's directory fd.

Threats (``SECURITY.md``):

* T-PATH-1 — traversal (``..``), absolute paths, NUL/control bytes, names
  that only look harmless after some other layer normalises them.
* T-TENANT-1 — a path can never name another tenant's volume, because it
  never leaves its own: no ``..``, no absolute path except the guest's own
  ``/data`` view, and no string-prefix comparison anywhere.

Decisions, each one deliberate:

* ``..`` is rejected wherever it appears, even where it would resolve inside
  the volume (``a/../b``). Resolving it lexically is how traversal bugs are
  born, and no legitimate client needs it.
* ``.`` components and empty components (``a//b``, trailing ``/``) are
  dropped: they cannot move the path anywhere.
* But a path that *ends* in ``/`` or ``/.`` (``notes.txt/``, ``notes.txt//``,
  ``notes.txt/.``) is in directory form: POSIX says it names a directory or
  nothing, and opening a regular file that way is ``ENOTDIR``. Dropping the
  slash would quietly turn it into the file (T-PATH-1), so
  ``parse_guest_path`` keeps that fact as ``GuestPath.dir_only`` and the
  adapter refuses a non-directory leaf for it (``GuestPath.admits``).
* Absolute paths are rejected, except ``/data`` and ``/data/...`` when the
  caller passes ``allow_data_prefix=True`` (the guest sees its volume at
  ``/data``; the files API accepts that form). ``/data2/x``, ``//data/x`` and
  ``/data/../x`` are rejected.
* Backslash is rejected (reason ``backslash``): on Linux it is an ordinary
  byte, but Windows clients and SDKs read it as a separator, so a name like
  ``..\\x`` means traversal to someone. Nothing needs it.
* Components whose Unicode compatibility form (NFKC) is ``.`` or ``..`` or
  contains ``/`` or ``\\`` are rejected (reason ``confusable``): fullwidth
  dots ``．．``, the two-dot leader ``‥``, fullwidth solidus ``／``. The kernel
  treats them as plain names, but a client, proxy or later layer that
  normalises would not.
* Percent-escapes are *not* decoded: ``%2e%2e`` is a literal 6-byte name and
  stays inside the volume. Decoding is the transport's job, done once.
* Control characters (Unicode category Cc: C0, DEL, C1) are rejected; NUL has
  its own reason because it truncates C strings.
* The path must be valid UTF-8 (no lone surrogates), at most 4096 bytes in
  UTF-8 in total and at most 255 bytes per component (Linux ``PATH_MAX`` and
  ``NAME_MAX``).
* The empty path (and anything that reduces to no components, like ``.`` or
  ``/data``) names the volume root; it is rejected with reason ``empty``
  unless ``allow_root=True`` (listing and stat of the root).
"""
from __future__ import annotations

import unicodedata

MAX_PATH_BYTES = 4096
MAX_COMPONENT_BYTES = 255
DATA_PREFIX = "/data"

# Every machine-readable reason this module can give.
REASONS = frozenset(
    {
        "type",
        "empty",
        "nul",
        "control",
        "backslash",
        "bad_utf8",
        "too_long",
        "component_too_long",
        "absolute",
        "dotdot",
        "confusable",
    }
)


class PathRejected(ValueError):
    """The path's syntax is refused; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


def _is_confusable(component: str) -> bool:
    # T-PATH-1: a name that a normalising client would read as "." / ".." or
    # as containing a separator must not reach the filesystem.
    if component.isascii():
        return False
    folded = unicodedata.normalize("NFKC", component)
    return folded in (".", "..") or "/" in folded or "\\" in folded


class GuestPath:
    """A parsed guest path: its components and whether it was written in directory form.

    A plain class, not a NamedTuple or dataclass: this module imports nothing
    beyond ``unicodedata`` (the layering test checks it).
    """

    __slots__ = ("components", "dir_only")

    def __init__(self, components: tuple[str, ...], dir_only: bool) -> None:
        self.components = components
        # True when the path ends in "/" or "/." ("notes.txt/", "dir/."): it may
        # only name a directory (T-PATH-1: never read as the file before the slash).
        self.dir_only = dir_only

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GuestPath):
            return NotImplemented
        return (self.components, self.dir_only) == (other.components, other.dir_only)

    def __hash__(self) -> int:
        return hash((self.components, self.dir_only))

    def __repr__(self) -> str:
        return f"GuestPath({self.components!r}, dir_only={self.dir_only!r})"

    def admits(self, is_dir: bool) -> bool:
        """Whether a leaf of that kind may answer this path (POSIX: else ENOTDIR)."""
        return is_dir or not self.dir_only


def split_guest_path(
    path: str, *, allow_data_prefix: bool = False, allow_root: bool = False
) -> tuple[str, ...]:
    """Return the components of ``path`` relative to the cell volume.

    Raises ``PathRejected`` for anything outside the rules in the module
    docstring. The result never contains ``""``, ``"."``, ``".."``, ``"/"``,
    ``"\\\\"``, NUL or a control character. Callers that open what the path
    names use ``parse_guest_path``, which also keeps the trailing-slash form.
    """
    return parse_guest_path(path, allow_data_prefix=allow_data_prefix, allow_root=allow_root).components


def parse_guest_path(
    path: str, *, allow_data_prefix: bool = False, allow_root: bool = False
) -> GuestPath:
    """``split_guest_path`` plus ``dir_only``: did the path end in ``/`` or ``/.``?"""
    if not isinstance(path, str):
        raise PathRejected("type", "path must be a string")
    if path == "":
        if allow_root:
            return GuestPath((), False)
        raise PathRejected("empty", "path is empty")
    # T-PATH-1: NUL truncates the path in every C API below us.
    if "\x00" in path:
        raise PathRejected("nul", "path contains a NUL byte")
    # T-PATH-1: control characters (C0, DEL, C1) forge log lines and
    # terminal output, and no real file name needs them.
    if any(unicodedata.category(ch) == "Cc" for ch in path):
        raise PathRejected("control", "path contains a control character")
    # T-PATH-1: backslash is a separator to Windows clients.
    if "\\" in path:
        raise PathRejected("backslash", "path contains a backslash")
    # T-PATH-1: lone surrogates are not UTF-8; the kernel would see bytes the
    # client never meant.
    try:
        encoded = path.encode("utf-8")
    except UnicodeEncodeError:
        raise PathRejected("bad_utf8", "path is not valid UTF-8") from None
    if len(encoded) > MAX_PATH_BYTES:
        raise PathRejected("too_long", f"path is longer than {MAX_PATH_BYTES} bytes")

    rest = path
    if path.startswith("/"):
        # T-PATH-1: an absolute path names the host's tree; only the guest's
        # own "/data" view is accepted, and only by callers that opt in.
        # The exact prefix check stops "/data2/x" and "//data/x".
        if allow_data_prefix and (path == DATA_PREFIX or path.startswith(DATA_PREFIX + "/")):
            rest = path[len(DATA_PREFIX):]
        else:
            raise PathRejected("absolute", "absolute paths are not allowed")

    components: list[str] = []
    parts = rest.split("/")
    # T-PATH-1: "x/", "x//", "x/." and "x/./" name a directory, never the file x.
    dir_only = (len(parts) > 1 and parts[-1] in ("", ".")) or parts == ["."]
    for component in parts:
        if component in ("", "."):
            continue
        # T-PATH-1 / T-TENANT-1: ".." is never resolved, only refused.
        if component == "..":
            raise PathRejected("dotdot", "'..' is not allowed in a path")
        if len(component.encode("utf-8")) > MAX_COMPONENT_BYTES:
            raise PathRejected(
                "component_too_long", f"a path component is longer than {MAX_COMPONENT_BYTES} bytes"
            )
        if _is_confusable(component):
            raise PathRejected("confusable", "a path component normalises to '.', '..' or a separator")
        components.append(component)

    if not components and not allow_root:
        raise PathRejected("empty", "path names the volume root")
    return GuestPath(tuple(components), dir_only)


def join_components(components: tuple[str, ...]) -> str:
    """Relative, slash-separated form (no leading slash; ``""`` is the root)."""
    return "/".join(components)
