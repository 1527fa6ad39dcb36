"""The worker's seccomp-bpf filter, assembled by hand (threat T-ESCAPE-2).

Pure: this module only builds and interprets the classic-BPF program; the
adapter that installs it is :mod:`appliance.runtime.sandbox`. No dependency:
the program is a list of ``(code, jt, jf, k)`` instructions, checked by
:func:`evaluate` (a small interpreter of exactly the instructions we emit)
and by :func:`disassemble`, which the unit tests read.

What the filter does, in order:

1. The audit architecture must be the one this process runs on
   (``AUDIT_ARCH_X86_64`` or ``AUDIT_ARCH_AARCH64``); any other -> kill the
   process. On x86_64 a syscall number with the x32 bit set -> kill.
2. The most dangerous calls kill the process: ``execve``, ``ptrace``,
   ``process_vm_*``, ``mount`` and friends, ``bpf``, ``keyctl``,
   ``userfaultfd``, ``perf_event_open``, ``unshare``/``setns``, io_uring
   (which would bypass this filter), module loading, ``kcmp``/``pidfd_getfd``.
   ``clone`` asking for a new namespace kills too; ``clone3`` answers ENOSYS
   (its flags sit in memory the filter cannot read), so libc falls back to
   ``clone``, whose flags it can.
3. A fixed allow-list of what a running worker needs (found with strace on
   the Python, JavaScript and wasm templates).
4. Everything else answers EPERM.

Two switches remain in this pure policy, and the sandbox never sets them
(T-ESCAPE-3: ``host_fetch`` and ``host_mcp_call`` are made by the supervisor's
broker, :mod:`appliance.runtime.broker`): ``network`` would let ``socket``
make AF_INET/AF_INET6 sockets, and ``spawn`` would allow process creation and
``execve``. Without them, as every worker runs, a new socket of any kind is
refused and ``execve`` kills.
"""
from __future__ import annotations

import errno
import struct
from dataclasses import dataclass
from typing import Sequence

# -- constants from linux/audit.h, linux/seccomp.h, linux/filter.h ---------
AUDIT_ARCH_X86_64 = 0xC000003E
AUDIT_ARCH_AARCH64 = 0xC00000B7
X32_SYSCALL_BIT = 0x40000000

RET_KILL_PROCESS = 0x80000000
RET_ERRNO = 0x00050000
RET_ALLOW = 0x7FFF0000
RET_DATA = 0x0000FFFF

LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
JSET_K = 0x45  # BPF_JMP | BPF_JSET | BPF_K
JA = 0x05  # BPF_JMP | BPF_JA
RET_K = 0x06  # BPF_RET | BPF_K

# struct seccomp_data: int nr; __u32 arch; __u64 instruction_pointer; __u64 args[6]
OFF_NR, OFF_ARCH = 0, 4


def off_arg_low(index: int) -> int:
    """Offset of the low 32 bits of syscall argument ``index`` (little-endian)."""
    return 16 + 8 * index


CLONE_NEW_MASK = (0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000
                  | 0x00000080)  # NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET, NEWTIME
CLONE_THREAD = 0x00010000
AF_INET, AF_INET6 = 2, 10
# prctl options a running worker may use (thread names, VMA names, reading its own state).
PRCTL_ALLOWED = (15, 16, 0x53564D41, 3, 21, 22, 23, 38, 39)  # SET/GET_NAME, SET_VMA, GET_DUMPABLE,
# GET/SET_SECCOMP (a further filter can only narrow), CAPBSET_READ, SET/GET_NO_NEW_PRIVS

Instruction = tuple[int, int, int, int]

SYSCALLS: dict[str, tuple[int | None, int | None]] = {
    "read": (0, 63), "write": (1, 64), "readv": (19, 65), "writev": (20, 66), "pread64": (17, 67),
    "pwrite64": (18, 68), "preadv": (295, 69), "pwritev": (296, 70), "preadv2": (327, 286), "pwritev2": (328, 287),
    "open": (2, None), "openat": (257, 56), "openat2": (437, 437), "close": (3, 57), "close_range": (436, 436),
    "creat": (85, None), "lseek": (8, 62), "stat": (4, None), "fstat": (5, 80), "lstat": (6, None),
    "newfstatat": (262, 79), "statx": (332, 291), "statfs": (137, 43), "fstatfs": (138, 44), "access": (21, None),
    "faccessat": (269, 48), "faccessat2": (439, 439), "readlink": (89, None), "readlinkat": (267, 78),
    "getdents64": (217, 61), "getcwd": (79, 17), "chdir": (80, 49), "fchdir": (81, 50), "mkdir": (83, None),
    "mkdirat": (258, 34), "rmdir": (84, None), "unlink": (87, None), "unlinkat": (263, 35), "rename": (82, None),
    "renameat": (264, 38), "renameat2": (316, 276), "link": (86, None), "linkat": (265, 37), "symlink": (88, None),
    "symlinkat": (266, 36), "mknod": (133, None), "mknodat": (259, 33), "chmod": (90, None), "fchmod": (91, 52),
    "fchmodat": (268, 53), "chown": (92, None), "fchown": (93, 55), "lchown": (94, None), "fchownat": (260, 54),
    "truncate": (76, 45), "ftruncate": (77, 46), "fsync": (74, 82), "fdatasync": (75, 83), "fallocate": (285, 47),
    "fadvise64": (221, 223), "utimensat": (280, 88), "futimesat": (261, None), "utime": (132, None),
    "utimes": (235, None), "sync_file_range": (277, 84), "flock": (73, 32), "copy_file_range": (326, 285),
    "sendfile": (40, 71), "splice": (275, 76), "tee": (276, 77), "dup": (32, 23), "dup2": (33, None),
    "dup3": (292, 24), "fcntl": (72, 25), "ioctl": (16, 29), "pipe": (22, None), "pipe2": (293, 59),
    "mmap": (9, 222), "munmap": (11, 215), "mprotect": (10, 226), "mremap": (25, 216), "madvise": (28, 233),
    "msync": (26, 227), "mincore": (27, 232), "mlock": (149, 228), "munlock": (150, 229), "brk": (12, 214),
    "membarrier": (324, 283), "futex": (202, 98), "futex_waitv": (449, 449), "set_robust_list": (273, 99),
    "get_robust_list": (274, 100), "rseq": (334, 293), "set_tid_address": (218, 96), "clone": (56, 220),
    "clone3": (435, 435), "fork": (57, None), "vfork": (58, None), "execve": (59, 221), "execveat": (322, 281),
    "exit": (60, 93), "exit_group": (231, 94), "wait4": (61, 260), "waitid": (247, 95), "kill": (62, 129),
    "tgkill": (234, 131), "tkill": (200, 130), "rt_sigaction": (13, 134), "rt_sigprocmask": (14, 135),
    "rt_sigreturn": (15, 139), "rt_sigtimedwait": (128, 137), "rt_sigsuspend": (130, 133),
    "rt_sigpending": (127, 136), "rt_sigqueueinfo": (129, 138), "sigaltstack": (131, 132),
    "restart_syscall": (219, 128), "nanosleep": (35, 101), "clock_nanosleep": (230, 115),
    "clock_gettime": (228, 113), "clock_getres": (229, 114), "gettimeofday": (96, 169), "time": (201, None),
    "getrandom": (318, 278), "sched_yield": (24, 124), "sched_getaffinity": (204, 123),
    "sched_setaffinity": (203, 122), "sched_getparam": (143, 121), "sched_getscheduler": (145, 120),
    "sched_get_priority_max": (146, 125), "sched_get_priority_min": (147, 126), "getpid": (39, 172),
    "getppid": (110, 173), "gettid": (186, 178), "getuid": (102, 174), "geteuid": (107, 175), "getgid": (104, 176),
    "getegid": (108, 177), "getgroups": (115, 158), "getresuid": (118, 148), "getresgid": (120, 150),
    "getpgrp": (111, None), "getpgid": (121, 155), "getsid": (124, 156), "setsid": (112, 157), "setpgid": (109, 154),
    "getrlimit": (97, 163), "setrlimit": (160, 164), "prlimit64": (302, 261), "getrusage": (98, 165),
    "times": (100, 153), "sysinfo": (99, 179), "uname": (63, 160), "arch_prctl": (158, None), "prctl": (157, 167),
    "umask": (95, 166), "poll": (7, None), "ppoll": (271, 73), "select": (23, None), "pselect6": (270, 72),
    "epoll_create": (213, None), "epoll_create1": (291, 20), "epoll_ctl": (233, 21), "epoll_wait": (232, None),
    "epoll_pwait": (281, 22), "epoll_pwait2": (441, 441), "eventfd": (284, None), "eventfd2": (290, 19),
    "timerfd_create": (283, 85), "timerfd_settime": (286, 86), "timerfd_gettime": (287, 87),
    "memfd_create": (319, 279), "socket": (41, 198), "socketpair": (53, 199), "connect": (42, 203),
    "bind": (49, 200), "listen": (50, 201), "accept": (43, 202), "accept4": (288, 242), "sendto": (44, 206),
    "recvfrom": (45, 207), "sendmsg": (46, 211), "recvmsg": (47, 212), "sendmmsg": (307, 269),
    "recvmmsg": (299, 243), "shutdown": (48, 210), "getsockname": (51, 204), "getpeername": (52, 205),
    "setsockopt": (54, 208), "getsockopt": (55, 209), "ptrace": (101, 117), "process_vm_readv": (310, 270),
    "process_vm_writev": (311, 271), "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41),
    "chroot": (161, 51), "bpf": (321, 280), "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218),
    "userfaultfd": (323, 282), "perf_event_open": (298, 241), "unshare": (272, 97), "setns": (308, 268),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294), "init_module": (175, 105), "finit_module": (313, 273),
    "delete_module": (176, 106), "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    "move_mount": (429, 429), "open_tree": (428, 428), "mount_setattr": (442, 442), "iopl": (172, None),
    "ioperm": (173, None), "swapon": (167, 224), "swapoff": (168, 225), "reboot": (169, 142), "acct": (163, 89),
    "quotactl": (179, 60), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426),
    "io_uring_register": (427, 427), "kcmp": (312, 272), "pidfd_getfd": (438, 438), "pidfd_open": (434, 434),
    "pidfd_send_signal": (424, 424), "process_madvise": (440, 440), "seccomp": (317, 277),
    "landlock_create_ruleset": (444, 444), "landlock_add_rule": (445, 445), "landlock_restrict_self": (446, 446),
    "personality": (135, 92), "setuid": (105, 146), "setgid": (106, 144), "setreuid": (113, 145),
    "setregid": (114, 143), "setresuid": (117, 147), "setresgid": (119, 149), "setgroups": (116, 159),
    "setfsuid": (122, 151), "setfsgid": (123, 152), "capset": (126, 91), "modify_ldt": (154, None),
    "lookup_dcookie": (212, 18), "vhangup": (153, 58), "syslog": (103, 116), "settimeofday": (164, 170),
    "clock_settime": (227, 112), "clock_adjtime": (305, 266), "adjtimex": (159, 171), "sethostname": (170, 161),
    "setdomainname": (171, 162), "mbind": (237, 235), "set_mempolicy": (238, 237), "migrate_pages": (256, 238),
    "move_pages": (279, 239), "fanotify_init": (300, 262), "inotify_init1": (294, 26),
    "inotify_add_watch": (254, 27), "inotify_rm_watch": (255, 28),
}

# Calls that end the process at once (T-ESCAPE-2): each is a step an escaped
# guest would take toward another process, the kernel's attack surface, or a
# way around this filter.
KILL = (
    "execve", "execveat", "ptrace", "process_vm_readv", "process_vm_writev", "process_madvise", "kcmp", "pidfd_getfd",
    "mount", "umount2", "pivot_root", "chroot", "fsopen", "fsconfig", "fsmount", "fspick", "move_mount", "open_tree",
    "mount_setattr", "open_by_handle_at", "bpf", "keyctl", "add_key", "request_key", "userfaultfd", "perf_event_open",
    "unshare", "setns", "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module", "iopl", "ioperm",
    "swapon", "swapoff", "reboot", "acct", "quotactl", "io_uring_setup", "io_uring_enter", "io_uring_register",
)

# What a running worker uses (strace of the python3, javascript and wasm
# templates: sessions, FIFOs, volumes, the epoch thread, wasmtime's runtime).
ALLOW = (
    # the hottest first (strace counts of a busy worker): the filter is a linear scan
    "futex", "statx", "newfstatat", "close", "read", "write", "openat2", "pread64", "lseek", "openat", "mmap",
    "mprotect", "rt_sigaction", "getdents64", "munmap", "brk", "sched_yield", "fcntl", "rt_sigprocmask",
    "epoll_wait", "gettid", "getrandom", "clock_gettime", "clock_nanosleep", "poll", "readv", "writev", "pwrite64",
    "preadv", "pwritev", "preadv2", "pwritev2", "close_range", "mremap", "madvise", "msync", "mincore", "membarrier",
    "open", "stat", "fstat", "lstat", "statfs", "fstatfs", "access", "faccessat", "faccessat2", "readlink",
    "readlinkat", "getcwd", "chdir", "fchdir", "mkdir", "mkdirat", "rmdir", "unlink", "unlinkat", "rename",
    "renameat", "renameat2", "link", "linkat", "symlink", "symlinkat", "mknod", "mknodat", "chmod", "fchmod",
    "fchmodat", "truncate", "ftruncate", "fsync", "fdatasync", "fallocate", "fadvise64", "utimensat", "flock",
    "copy_file_range", "sendfile", "dup", "dup2", "dup3", "pipe", "pipe2", "set_robust_list", "get_robust_list",
    "rseq", "set_tid_address", "exit", "exit_group", "wait4", "waitid", "kill", "tgkill", "tkill", "rt_sigreturn",
    "rt_sigtimedwait", "rt_sigsuspend", "rt_sigpending", "sigaltstack", "restart_syscall", "nanosleep",
    "clock_getres", "gettimeofday", "time", "sched_getaffinity", "sched_getparam", "sched_getscheduler",
    "sched_get_priority_max", "sched_get_priority_min", "getpid", "getppid", "getuid", "geteuid", "getgid",
    "getegid", "getgroups", "getresuid", "getresgid", "getpgrp", "getpgid", "getsid", "getrlimit", "prlimit64",
    "getrusage", "times", "sysinfo", "uname", "arch_prctl", "umask", "ppoll", "select", "pselect6", "epoll_create",
    "epoll_create1", "epoll_ctl", "epoll_pwait", "epoll_pwait2", "eventfd", "eventfd2", "timerfd_create",
    "timerfd_settime", "timerfd_gettime", "memfd_create",
    # calls on sockets the worker already holds (its channel); making one is gated below
    "sendto", "recvfrom", "sendmsg", "recvmsg", "sendmmsg", "recvmmsg", "shutdown", "getsockname", "getpeername",
    "getsockopt", "setsockopt",
)
# Making sockets: refused unless the worker needs the network (never set for a worker: the broker, T-ESCAPE-3).
SOCKET_MAKING = ("socket", "socketpair", "connect", "bind", "listen", "accept", "accept4")
NETWORK_CLIENT = ("connect",)  # with ``network``: connect; socket() is checked by its domain
# A spare narrowing itself at its tenant bind (with ``narrowing``).
NARROWING = ("landlock_create_ruleset", "landlock_add_rule", "landlock_restrict_self", "seccomp")
# Starting the operator's stdio MCP servers (with ``spawn``; never set for a worker).
SPAWNING = ("fork", "vfork", "execve", "setsid", "setpgid")
IOCTL_ALLOWED = (0x5401, 0x5413, 0x541B, 0x5421, 0x5450, 0x5451)  # TCGETS, TIOCGWINSZ, FIONREAD, FIONBIO, FIONCLEX, FIOCLEX

ARCHES = {"x86_64": AUDIT_ARCH_X86_64, "aarch64": AUDIT_ARCH_AARCH64}


def errno_ret(code: int) -> int:
    return RET_ERRNO | (code & RET_DATA)


@dataclass(frozen=True)
class FilterPolicy:
    """What the filter admits beyond the base allow-list."""
    network: bool = False  # AF_INET/AF_INET6 client sockets (egress on or MCP configured)
    spawn: bool = False  # process creation and execve (stdio MCP servers configured)
    # An unbound spare (T-TENANT-1): it may narrow its own sandbox once more
    # (a second Landlock layer, a second filter without this switch) when it
    # is bound to a tenant. Both only ever take rights away; a spare runs no guest.
    narrowing: bool = False


def _nr(name: str, arch: str) -> int | None:
    x86, a64 = SYSCALLS[name]
    return x86 if arch == "x86_64" else a64


class _Builder:
    def __init__(self) -> None:
        self.code: list[Instruction] = []

    def emit(self, code: int, jt: int, jf: int, k: int) -> None:
        self.code.append((code, jt, jf, k))

    def ret(self, value: int) -> None:
        self.emit(RET_K, 0, 0, value)

    def on_nr(self, nr: int, body: list[Instruction]) -> None:
        """if nr == ``nr``: run ``body`` (which must end in returns), else skip it."""
        if len(body) > 255:
            raise ValueError("a syscall block is too long for a BPF jump")
        self.emit(JEQ_K, 0, len(body), nr)
        self.code.extend(body)


def _ret(value: int) -> list[Instruction]:
    return [(RET_K, 0, 0, value)]


def _arg_in(index: int, allowed: Sequence[int], yes: int, no: int) -> list[Instruction]:
    """Load argument ``index`` (low 32 bits); ``yes`` if it is one of ``allowed``, else ``no``."""
    body: list[Instruction] = [(LD_W_ABS, 0, 0, off_arg_low(index))]
    n = len(allowed)
    for i, value in enumerate(allowed):
        body.append((JEQ_K, n - i, 0, value))  # jump to the "yes" return after the "no" one
    body += [(RET_K, 0, 0, no), (RET_K, 0, 0, yes)]
    return body


def _clone_body(spawn: bool) -> list[Instruction]:
    body: list[Instruction] = [
        (LD_W_ABS, 0, 0, off_arg_low(0)),
        (JSET_K, 0, 1, CLONE_NEW_MASK),  # a new namespace: kill
        (RET_K, 0, 0, RET_KILL_PROCESS),
    ]
    if spawn:
        return body + [(RET_K, 0, 0, RET_ALLOW)]
    return body + [
        (JSET_K, 1, 0, CLONE_THREAD),  # threads only: a new process is refused
        (RET_K, 0, 0, errno_ret(errno.EPERM)),
        (RET_K, 0, 0, RET_ALLOW),
    ]


def build(policy: FilterPolicy, arch: str) -> list[Instruction]:
    """The filter program for ``arch`` ("x86_64" or "aarch64")."""
    if arch not in ARCHES:
        raise ValueError(f"no seccomp filter for architecture {arch!r}")
    b = _Builder()
    b.emit(LD_W_ABS, 0, 0, OFF_ARCH)
    b.emit(JEQ_K, 1, 0, ARCHES[arch])
    b.ret(RET_KILL_PROCESS)  # a foreign architecture's calling convention
    b.emit(LD_W_ABS, 0, 0, OFF_NR)
    if arch == "x86_64":
        b.emit(JSET_K, 0, 1, X32_SYSCALL_BIT)
        b.ret(RET_KILL_PROCESS)  # x32 numbers
    deny = errno_ret(errno.EPERM)
    seen: set[str] = set()

    def simple(name: str, action: int) -> None:
        nr = _nr(name, arch)
        seen.add(name)
        if nr is not None:
            b.on_nr(nr, _ret(action))

    for name in ALLOW:  # first, for speed: KILL and ALLOW share no call
        simple(name, RET_ALLOW)
    for name in KILL:
        if policy.spawn and name == "execve":
            continue
        simple(name, RET_KILL_PROCESS)
    clone = _nr("clone", arch)
    assert clone is not None
    b.on_nr(clone, _clone_body(policy.spawn))
    seen.add("clone")
    simple("clone3", errno_ret(errno.ENOSYS))  # libc falls back to clone, whose flags we can read
    ioctl, prctl, socket = _nr("ioctl", arch), _nr("prctl", arch), _nr("socket", arch)
    assert ioctl is not None and prctl is not None and socket is not None
    b.on_nr(ioctl, _arg_in(1, IOCTL_ALLOWED, RET_ALLOW, deny))
    b.on_nr(prctl, _arg_in(0, PRCTL_ALLOWED, RET_ALLOW, deny))
    seen.update(("ioctl", "prctl"))
    if policy.network:
        b.on_nr(socket, _arg_in(0, (AF_INET, AF_INET6), RET_ALLOW, deny))
        seen.add("socket")
        for name in NETWORK_CLIENT:
            simple(name, RET_ALLOW)
    if policy.narrowing:
        for name in NARROWING:
            simple(name, RET_ALLOW)
    if policy.spawn:
        for name in SPAWNING:
            if name not in seen:
                simple(name, RET_ALLOW)
    b.ret(deny)  # anything else: EPERM
    if len(b.code) > 4096:
        raise ValueError("seccomp program too long")
    return b.code


def evaluate(program: Sequence[Instruction], arch_value: int, nr: int, args: Sequence[int] = ()) -> int:
    """Run ``program`` on one syscall, as the kernel would; returns the action."""
    data = [0] * 6
    for i, a in enumerate(args[:6]):
        data[i] = a & 0xFFFFFFFFFFFFFFFF

    def load(offset: int) -> int:
        if offset == OFF_NR:
            return nr & 0xFFFFFFFF
        if offset == OFF_ARCH:
            return arch_value
        index, rest = divmod(offset - 16, 8)
        if 0 <= index < 6 and rest in (0, 4):
            return (data[index] >> (32 * (rest // 4))) & 0xFFFFFFFF
        raise ValueError(f"load from offset {offset}")

    acc, pc = 0, 0
    while 0 <= pc < len(program):
        code, jt, jf, k = program[pc]
        if code == LD_W_ABS:
            acc = load(k)
            pc += 1
        elif code == JEQ_K:
            pc += 1 + (jt if acc == k else jf)
        elif code == JSET_K:
            pc += 1 + (jt if acc & k else jf)
        elif code == JA:
            pc += 1 + k
        elif code == RET_K:
            return k
        else:
            raise ValueError(f"unknown instruction {code:#x}")
    raise ValueError("the program ran off its end")


def action_name(action: int) -> str:
    if action == RET_ALLOW:
        return "allow"
    if action == RET_KILL_PROCESS:
        return "kill"
    if action & 0xFFFF0000 == RET_ERRNO:
        return f"errno {errno.errorcode.get(action & RET_DATA, action & RET_DATA)}"
    return f"{action:#x}"


def disassemble(program: Sequence[Instruction]) -> list[str]:
    """One readable line per instruction (for the tests and `cell doctor --verbose`)."""
    names = {LD_W_ABS: "ld", JEQ_K: "jeq", JSET_K: "jset", JA: "ja", RET_K: "ret"}
    out = []
    for pc, (code, jt, jf, k) in enumerate(program):
        op = names.get(code, f"op{code:#x}")
        if code == RET_K:
            out.append(f"{pc:4d} ret {action_name(k)}")
        elif code == LD_W_ABS:
            out.append(f"{pc:4d} ld [{k}]")
        else:
            out.append(f"{pc:4d} {op} #{k:#x} jt={pc + 1 + jt} jf={pc + 1 + jf}")
    return out


def encode(program: Sequence[Instruction]) -> bytes:
    """The program as ``struct sock_filter[]`` bytes (u16 code, u8 jt, u8 jf, u32 k; native order)."""
    return b"".join(struct.pack("=HBBI", *ins) for ins in program)
