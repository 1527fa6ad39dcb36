"""Attack corpus for tests/red_team.py: data only.

Each SSRF input must be refused by policy (host_fetch returns -1 with a
T-SSRF-1 denial) before any connection; each path input must never reach a
byte outside the cell volume.
"""
from __future__ import annotations

import ipaddress

# Names the red-team server resolves from a static map (SYNAPSE_EGRESS_HOSTS),
# so no DNS query ever leaves the machine.
EGRESS_HOSTS: dict[str, list[str]] = {
    "metadata.attacker.example": ["169.254.169.254"],
    "loop.attacker.example": ["127.0.0.1"],
    "lan.attacker.example": ["192.168.1.1"],
    "ten.attacker.example": ["10.10.10.10"],
    "cgnat.attacker.example": ["100.64.1.1"],
    "v6loop.attacker.example": ["::1"],
    "ula.attacker.example": ["fd12:3456::1"],
    "mapped.attacker.example": ["::ffff:10.0.0.1"],
    "mixed.attacker.example": ["93.184.215.14", "10.0.0.1"],
    "mixed6.attacker.example": ["2606:2800:220:1::1", "fe80::1"],
}

_DENY_ROW_SAMPLES = [
    "0.0.0.0", "0.1.2.3", "10.0.0.1", "10.255.255.254", "100.64.0.1", "100.127.255.254", "127.0.0.1", "127.255.255.254",
    "169.254.0.1", "169.254.169.254", "172.16.0.1", "172.31.255.254", "192.0.0.1", "192.0.2.1", "192.88.99.1",
    "192.168.0.1", "192.168.255.254", "198.18.0.1", "198.19.255.254", "198.51.100.1", "203.0.113.1", "224.0.0.1",
    "239.255.255.250", "240.0.0.1", "255.255.255.255",
]
_DENY_ROW_V6 = [
    "::", "::1", "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::127.0.0.1", "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",
    "64:ff9b:1::1", "100::1", "2001::1", "2001:db8::1", "2002:7f00:1::", "2002:a9fe:a9fe::", "fc00::1", "fd00:ec2::254",
    "fe80::1", "fec0::1", "ff02::1", "2001:10::1", "2001:20::1",
]


def _numeric_forms(ip: str) -> list[str]:
    n = int(ipaddress.IPv4Address(ip))
    a, b, c, d = (int(x) for x in ip.split("."))
    return [
        str(n),  # 2130706433
        hex(n),  # 0x7f000001
        f"0{a:o}.{b}.{c}.{d}",  # 0177.0.0.1
        f"0x{a:x}.{b}.{c}.{d}",  # 0x7f.0.0.1
        f"{a}.{(b << 16) | (c << 8) | d}",  # 127.1 style
        f"{a}.{b}.{(c << 8) | d}",
        f"0x{a:x}.0x{b:x}.0x{c:x}.0x{d:x}",
        f"{ip}.",  # trailing dot
        f"0{a:o}.0{b:o}.0{c:o}.0{d:o}",
    ]


def ssrf_urls() -> list[str]:
    urls: list[str] = []
    for ip in _DENY_ROW_SAMPLES:
        urls += [f"http://{ip}/", f"https://{ip}:8443/x"]
    for ip in _DENY_ROW_V6:
        urls += [f"http://[{ip}]/"]
    for ip in ("127.0.0.1", "169.254.169.254", "10.0.0.1", "192.168.1.1"):
        urls += [f"http://{form}/" for form in _numeric_forms(ip)]
    urls += [f"http://{name}/" for name in EGRESS_HOSTS]
    urls += [
        "http://localhost/", "http://localhost:8080/admin", "http://LocalHost./", "http://sub.localhost/",
        "http://printer.local/", "http://nas.home.arpa/", "http://db.internal/", "http://metadata/",
        "http://metadata.google.internal/computeMetadata/v1/", "http://user@169.254.169.254/",
        "http://user:pass@127.0.0.1:22/", "http://example.com@10.0.0.1/", "http://169.254.169.254#@example.com/",
        "http://169.254.169.254\\@example.com/", "http://example.com\\@169.254.169.254/", "http:// 169.254.169.254/",
        "http://169.254.169.254%09/", "http://%31%36%39.254.169.254/", "http://169。254。169。254/",
        "http://１２７.０.０.１/", "http://[::1%25lo]/", "http://[0:0:0:0:0:ffff:7f00:1]/", "http://[::ffff:7f00:1]/",
        "file:///etc/passwd", "gopher://127.0.0.1:70/", "ftp://10.0.0.1/", "dict://127.0.0.1:11211/",
        "ldap://169.254.169.254/", "http://127.0.0.1:0/", "http://127.0.0.1:65536/", "http:///etc/passwd",
        "http://", "", "javascript:alert(1)", "HTTP://169.254.169.254/", "http://169.254.169.254:80@example.com/",
        "http://0/", "http://0.0.0.0:8080/", "http://[::]:80/",
    ]
    return urls


def _deep(n: int, tail: str = "etc/passwd") -> str:
    return "../" * n + tail


def traversal_paths() -> list[str]:
    paths = [_deep(n) for n in range(1, 13)]
    paths += [
        "/etc/passwd", "/etc/shadow", "/proc/self/environ", "/proc/self/mem", "/proc/1/root/etc/passwd",
        "/dev/zero", "/dev/random", "/dev/stdin", "/sys/kernel/notes", "/root/.ssh/id_rsa",
        "/data/../etc/passwd", "/data/../../etc/passwd", "/data/./../etc/passwd", "data/../../etc/passwd",
        "a/../../etc/passwd", "a/b/../../../etc/passwd", "./../etc/passwd", "..", "../", "../.", "...", "..\\..\\etc\\passwd",
        "\\etc\\passwd", "//etc/passwd", "///etc/passwd", "%2e%2e/%2e%2e/etc/passwd", "..%2f..%2fetc%2fpasswd",
        "..%252f..%252fetc/passwd", "\u2025/etc/passwd", "\uff0e\uff0e/etc/passwd", "\u2024\u2024/etc/passwd",
        "etc/passwd\x00.txt", "\x00", "a\x00/../../etc/passwd", "\x1b[31m", "name\x7f", "line\nbreak", "tab\tname",
        "link-out", "link-out/passwd", "dir-link/secret.txt", "dangling", "a" * 300, ("d/" * 2100) + "x",
        "/data2/x", "/Data/x", "~/.ssh/id_rsa", "$HOME/x", "..;/etc/passwd",
    ]
    return paths


def trailing_slash_paths() -> list[str]:
    """T-PATH-1: directory forms of a regular file (POSIX ENOTDIR); never the file."""
    forms = ["{}/", "{}//", "{}///", "{}/.", "{}/./", "{}/.//", "./{}/", "/data/{}/", "/data/{}/."]
    return [form.format(name) for name in ("notes.txt", "dir/notes.txt") for form in forms] + [
        "dir/./notes.txt/", "dir//notes.txt//",
    ]


# T-DOS-1: a JavaScript guest forging the end of its run, then working on.
# After its forgery the guest appends 4 KiB to /data every ~2 ms and spins in
# between: if it ran on after its answer, worker CPU and /data would show it.
JS_KEEP_WORKING = """
const f = std.open("grow.bin", "a");
const chunk = "x".repeat(4096);
for (;;) { f.puts(chunk); f.flush(); const t = Date.now(); while (Date.now() - t < 2) {} }
"""
# The end-of-run marker used to be the last argv entry, written to stderr
# followed by the exit status; a guest could read it from scriptArgs.
JS_FORGED_MARKER = "\x1ecell-end-0123456789abcdef:0\n"
JS_FORGE_STDERR = """
for (const a of scriptArgs) std.err.puts(a + "0\\n");
std.err.puts("\\x1ecell-end-0123456789abcdef:0\\n");
std.err.flush();
"""
JS_FORGE_STDOUT = JS_FORGE_STDERR.replace("std.err", "std.out")
# Reading fd 0 (the host's command channel) in any shape but the boot loop's
# stops the interpreter at once.
JS_READ_STDIN = "std.in.getline();\n"
# Imitating the boot loop's idle read (8 bytes of fd 0) parks the guest for
# real: nothing runs until the next cell, under that run's deadline.
JS_IMITATE_IDLE_READ = "os.read(0, new ArrayBuffer(9), 0, 8);\n"

# name, code, expected status, whether the run lasts until its deadline,
# the stream that carries the forged marker
JS_FORGED_END: list[tuple[str, str, str, bool, str | None]] = [
    ("forged-marker-on-stderr", JS_FORGE_STDERR + JS_KEEP_WORKING, "timeout", True, "stderr"),
    ("forged-marker-on-stdout", JS_FORGE_STDOUT + JS_KEEP_WORKING, "timeout", True, "stdout"),
    ("reads-its-command-channel", JS_READ_STDIN + JS_KEEP_WORKING, "error", False, None),
]

# T-DOS-1: JavaScript timers that try to run after their run's answer. The run
# ends when the job queue and the timers are empty, or at its deadline, where
# pending timers are cancelled and the interpreter is kept: a callback writes
# ``late.txt`` (and keeps writing) if it ever runs. ``{delay}`` is filled with
# a time past the deadline. QuickJS's own timers reached through
# ``import('qjs:os')`` are not the cell's: the run may end without them or be
# held by one until the host stops it at the deadline; either way nothing
# runs after the answer.
JS_LATE_WRITE = "std.writeFile('/data/late.txt', 'x'.repeat(4096)); console.log('late')"
# name, code, expected statuses, whether the cell's timers were cancelled with the interpreter kept
JS_LATE_TIMERS: list[tuple[str, str, frozenset[str], bool]] = [
    ("timeout-past-deadline", "setTimeout(() => { %s }, {delay}); 'armed'" % JS_LATE_WRITE, frozenset({"timeout"}), True),
    ("sleep-async-past-deadline", "os.sleepAsync({delay}).then(() => { %s }); 'armed'" % JS_LATE_WRITE,
     frozenset({"timeout"}), True),
    ("interval-writing-to-deadline",
     "const f = std.open('/data/late.txt', 'a'); setInterval(() => { f.puts('x'.repeat(4096)); f.flush() }, 5); 'armed'",
     frozenset({"timeout"}), True),
    ("awaited-timer-past-deadline", "await new Promise(r => setTimeout(r, {delay})); %s" % JS_LATE_WRITE,
     frozenset({"timeout"}), True),
    ("raw-qjs-os-timer", "const o = await import('qjs:os'); o.setTimeout(() => { %s }, {delay}); 'armed'" % JS_LATE_WRITE,
     frozenset({"ok", "timeout"}), False),
]
