"""Attack tables for the pure path policy (T-PATH-1, T-TENANT-1)."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from appliance.policy.paths import MAX_PATH_BYTES, REASONS, GuestPath, PathRejected, parse_guest_path, split_guest_path

DATA = {"allow_data_prefix": True}

# (input, keyword arguments, expected reason)
REJECTED: list[tuple[object, dict[str, bool], str]] = [
    # T-PATH-1: traversal, never resolved, always refused
    ("..", {}, "dotdot"),
    ("../x", {}, "dotdot"),
    ("a/../../b", {}, "dotdot"),
    ("a/b/../c", {}, "dotdot"),
    ("a/..", {}, "dotdot"),
    ("../../../../../../etc/passwd", {}, "dotdot"),
    ("./../x", {}, "dotdot"),
    ("x/./../y", {}, "dotdot"),
    ("..//..//etc", {}, "dotdot"),
    ("/data/../etc", DATA, "dotdot"),
    ("/data/a/../../b", DATA, "dotdot"),
    ("/data/..", DATA, "dotdot"),
    # T-PATH-1 / T-TENANT-1: absolute paths name the host's tree
    ("/etc/passwd", {}, "absolute"),
    ("/etc/passwd", DATA, "absolute"),
    ("//etc", DATA, "absolute"),
    ("/", DATA, "absolute"),
    ("/data/x", {}, "absolute"),
    ("/data2/x", DATA, "absolute"),
    ("/datax", DATA, "absolute"),
    ("//data/x", DATA, "absolute"),
    ("/Data/x", DATA, "absolute"),
    ("/proc/self/root/etc/passwd", DATA, "absolute"),
    ("/sandbox_volumes/tenantAB/c1/secret", DATA, "absolute"),
    # T-PATH-1: NUL and control characters (C0, DEL, C1)
    ("a\x00b", {}, "nul"),
    ("\x00", {}, "nul"),
    ("/data/\x00", DATA, "nul"),
    ("\x7f", {}, "control"),
    ("a\x01b", {}, "control"),
    ("\n", {}, "control"),
    ("a\rb", {}, "control"),
    ("tab\there", {}, "control"),
    ("\x1b[31mred", {}, "control"),
    ("next\x85line", {}, "control"),
    ("csi\x9b", {}, "control"),
    # T-PATH-1: backslash is a separator to Windows clients
    ("..\\x", {}, "backslash"),
    ("a\\b", {}, "backslash"),
    ("\\etc\\passwd", {}, "backslash"),
    ("C:\\Windows", {}, "backslash"),
    # T-PATH-1: lone surrogates are not UTF-8
    ("\udc2e\udc2e/x", {}, "bad_utf8"),
    ("a\ud800b", {}, "bad_utf8"),
    # T-PATH-1: size limits
    ("a/" * 2100, {}, "too_long"),
    ("\u00e9" * 2049, {}, "too_long"),
    ("x" * 256, {}, "component_too_long"),
    ("\u00e9" * 128, {}, "component_too_long"),
    ("ok/" + "y" * 300, {}, "component_too_long"),
    # T-PATH-1: names a normalising layer would read as dots or separators
    ("\u2025", {}, "confusable"),  # two-dot leader
    ("\uff0e\uff0e/x", {}, "confusable"),  # fullwidth dots
    ("\uff0e", {}, "confusable"),
    ("a/\uff0e\uff0e/b", {}, "confusable"),
    ("\ufe52\ufe52", {}, "confusable"),  # small full stops
    ("\uff0fetc", {}, "confusable"),  # fullwidth solidus
    ("\uff3c", {}, "confusable"),  # fullwidth reverse solidus
    # the volume root is only for callers that ask for it
    ("", {}, "empty"),
    (".", {}, "empty"),
    ("./", {}, "empty"),
    ("/data", DATA, "empty"),
    ("/data/./", DATA, "empty"),
    # not a string at all
    (None, {}, "type"),
    (b"x", {}, "type"),
]

ACCEPTED: list[tuple[str, dict[str, bool], tuple[str, ...]]] = [
    ("a", {}, ("a",)),
    ("a/b/c.txt", {}, ("a", "b", "c.txt")),
    ("./a", {}, ("a",)),
    ("a//b/", {}, ("a", "b")),
    ("%2e%2e/x", {}, ("%2e%2e", "x")),  # a literal name, never decoded
    ("...", {}, ("...",)),
    (".hidden", {}, (".hidden",)),
    ("a..b", {}, ("a..b",)),
    ("/data/a.txt", DATA, ("a.txt",)),
    ("/data//x", DATA, ("x",)),
    ("data/x", {}, ("data", "x")),
    ("/data/", {"allow_data_prefix": True, "allow_root": True}, ()),
    ("", {"allow_root": True}, ()),
    (".", {"allow_root": True}, ()),
    ("x" * 255, {}, ("x" * 255,)),
    ("\u00e9" * 127, {}, ("\u00e9" * 127,)),
    ("\u65e5\u672c/\u30d5\u30a1\u30a4\u30eb.txt", {}, ("\u65e5\u672c", "\u30d5\u30a1\u30a4\u30eb.txt")),
    ("\u3002\u3002", {}, ("\u3002\u3002",)),  # ideographic full stops stay a plain name
    ("a b", {}, ("a b",)),
    ("-rf", {}, ("-rf",)),
]


@pytest.mark.parametrize(("path", "kwargs", "reason"), REJECTED, ids=[repr(r[0])[:40] for r in REJECTED])
def test_t_path_1_traversal_rejected(path: object, kwargs: dict[str, bool], reason: str) -> None:
    with pytest.raises(PathRejected) as info:
        split_guest_path(path, **kwargs)  # type: ignore[arg-type]
    assert info.value.reason == reason
    assert info.value.reason in REASONS
    assert isinstance(info.value, ValueError)
    assert info.value.message


@pytest.mark.parametrize(("path", "kwargs", "expected"), ACCEPTED, ids=[repr(a[0])[:40] for a in ACCEPTED])
def test_t_path_1_plain_names_accepted(path: str, kwargs: dict[str, bool], expected: tuple[str, ...]) -> None:
    assert split_guest_path(path, **kwargs) == expected


@pytest.mark.parametrize("path", [p for p, _, _ in ACCEPTED])
def test_t_path_1_components_never_escape(path: str) -> None:
    for comp in split_guest_path(path, allow_data_prefix=True, allow_root=True):
        assert comp not in ("", ".", "..")
        assert "/" not in comp and "\\" not in comp and "\x00" not in comp


# T-PATH-1: a path ending in "/" or "/." names a directory or nothing (POSIX
# ENOTDIR for a file). (input, keyword arguments, components, dir_only)
DIR_FORMS: list[tuple[str, dict[str, bool], tuple[str, ...], bool]] = [
    ("notes.txt/", {}, ("notes.txt",), True),
    ("notes.txt//", {}, ("notes.txt",), True),
    ("notes.txt///", {}, ("notes.txt",), True),
    ("notes.txt/.", {}, ("notes.txt",), True),
    ("notes.txt/./", {}, ("notes.txt",), True),
    ("notes.txt/./.", {}, ("notes.txt",), True),
    ("notes.txt/.//", {}, ("notes.txt",), True),
    ("./notes.txt/", {}, ("notes.txt",), True),
    ("dir/notes.txt/", {}, ("dir", "notes.txt"), True),
    ("dir//notes.txt//", {}, ("dir", "notes.txt"), True),
    ("dir/./notes.txt/.", {}, ("dir", "notes.txt"), True),
    ("/data/notes.txt/", DATA, ("notes.txt",), True),
    ("/data/dir/notes.txt/.", DATA, ("dir", "notes.txt"), True),
    ("dir/", {}, ("dir",), True),
    # not directory form: a "." or "" in the middle moves nothing
    ("notes.txt", {}, ("notes.txt",), False),
    ("./notes.txt", {}, ("notes.txt",), False),
    ("dir/./notes.txt", {}, ("dir", "notes.txt"), False),
    ("dir//notes.txt", {}, ("dir", "notes.txt"), False),
    ("/data/notes.txt", DATA, ("notes.txt",), False),
    ("notes.txt.", {}, ("notes.txt.",), False),
    ("notes.txt/..txt", {}, ("notes.txt", "..txt"), False),
]


@pytest.mark.parametrize(("path", "kwargs", "components", "dir_only"), DIR_FORMS, ids=[repr(d[0]) for d in DIR_FORMS])
def test_t_path_1_trailing_slash_form_is_kept(path: str, kwargs: dict[str, bool], components: tuple[str, ...],
                                               dir_only: bool) -> None:
    parsed = parse_guest_path(path, **kwargs)
    assert parsed == GuestPath(components, dir_only)
    assert split_guest_path(path, **kwargs) == components  # the old view is unchanged
    assert parsed.admits(is_dir=True) is True
    assert parsed.admits(is_dir=False) is (not dir_only)  # a file never answers "x/"


@pytest.mark.parametrize("path", ["notes.txt/..", "notes.txt/../", "/data/notes.txt/../x"])
def test_t_path_1_trailing_dotdot_still_refused(path: str) -> None:
    with pytest.raises(PathRejected) as info:
        parse_guest_path(path, allow_data_prefix=True)
    assert info.value.reason == "dotdot"


def test_t_path_1_length_limit_is_inclusive() -> None:
    path = "a/" * 2047 + "aa"
    assert len(path.encode()) == MAX_PATH_BYTES
    assert len(split_guest_path(path)) == 2048


def test_t_tenant_1_data_prefix_is_exact() -> None:
    # T-TENANT-1: the string-prefix bug (tenantA vs tenantAB) has no analogue here.
    assert split_guest_path("/data/tenantAB", allow_data_prefix=True) == ("tenantAB",)
    for path in ("/dataAB", "/data-x/y", "/data./x"):
        with pytest.raises(PathRejected):
            split_guest_path(path, allow_data_prefix=True)


def test_policy_module_imports_no_io() -> None:
    code = (
        "import sys, json; before = set(sys.modules); import appliance.policy.paths; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    new = set(json.loads(out.stdout))
    forbidden = {"flask", "wasmtime", "sqlite3", "socket", "shutil", "pathlib", "subprocess", "textual"}
    assert not new & forbidden
    assert new <= {"appliance", "appliance.policy", "appliance.policy.paths", "unicodedata", "__future__"}
