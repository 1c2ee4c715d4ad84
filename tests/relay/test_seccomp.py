"""The jail's seccomp filter: its program run by a small classic-BPF interpreter
(every architecture, every denied call), its numbers checked against
libseccomp's tables, and the real filter in a real jail."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import platform
import re
import struct
from pathlib import Path

import pytest
from test_jail import run_jailed  # tests/relay is on sys.path, as for pytest

from tether.relay import jail, seccomp

ALLOW = seccomp.SECCOMP_RET_ALLOW
DENY = seccomp.SECCOMP_RET_ERRNO | errno.EPERM
KILL = seccomp.SECCOMP_RET_KILL_PROCESS
AUDIT_ARCH_I386 = 3 | 0x40000000


def run(arch: int, nr: int, *args: int) -> int:
    """What the filter returns for this system call (a classic-BPF interpreter
    for the instructions the assembler emits, reading the packed program)."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *args, *[0] * (6 - len(args)))
    prog = seccomp.program()
    assert len(prog) % 8 == 0
    insns = [struct.unpack("=HBBI", prog[i : i + 8]) for i in range(0, len(prog), 8)]
    acc, pc = 0, 0
    while True:
        code, jt, jf, k = insns[pc]
        pc += 1
        if code == seccomp.LD_W_ABS:
            assert k % 4 == 0 and k + 4 <= len(data)
            (acc,) = struct.unpack_from("<I", data, k)
        elif code == seccomp.JEQ_K:
            pc += jt if acc == k else jf
        elif code == seccomp.JGE_K:
            pc += jt if acc >= k else jf
        elif code == seccomp.RET_K:
            return k
        else:
            raise AssertionError(f"unknown opcode {code:#x}")


TABLES = {seccomp.AUDIT_ARCH_X86_64: seccomp.X86_64, seccomp.AUDIT_ARCH_AARCH64: seccomp.AARCH64}
COMMON = {"read": (0, 63), "write": (1, 64), "openat": (257, 56), "clone": (56, 220),
          "execve": (59, 221), "wait4": (61, 260), "ppoll": (271, 73)}  # fmt: skip


def test_program_shape() -> None:
    prog = seccomp.program()
    assert 0 < len(prog) // 8 < 4096  # BPF_MAXINSNS
    first = struct.unpack("=HBBI", prog[:8])
    assert first == (seccomp.LD_W_ABS, 0, 0, seccomp.OFF_ARCH)  # the arch, before anything
    last = struct.unpack("=HBBI", prog[-8:])
    assert last[0] == seccomp.RET_K


@pytest.mark.parametrize("arch", list(TABLES), ids=["x86_64", "aarch64"])
def test_denied_calls_get_eperm_and_others_pass(arch: int) -> None:
    table = TABLES[arch]
    for name in seccomp.DENIED:
        if name in table:
            assert run(arch, table[name]) == DENY, name
    index = 0 if arch == seccomp.AUDIT_ARCH_X86_64 else 1
    for name, nrs in COMMON.items():
        assert run(arch, nrs[index]) == ALLOW, name
    assert {"ptrace", "pidfd_getfd", "unshare", "mount", "bpf", "io_uring_setup"} <= set(table)


@pytest.mark.parametrize("arch", list(TABLES), ids=["x86_64", "aarch64"])
def test_ioctl_and_personality_by_argument(arch: int) -> None:
    ioctl, personality = TABLES[arch]["ioctl"], TABLES[arch]["personality"]
    assert run(arch, ioctl, 3, seccomp.TIOCSTI) == DENY
    assert run(arch, ioctl, 3, seccomp.TIOCLINUX) == DENY
    # the kernel takes the request as an unsigned int: high bits change nothing
    assert run(arch, ioctl, 3, (1 << 32) | seccomp.TIOCSTI) == DENY
    assert run(arch, ioctl, 3, 0x5413) == ALLOW  # TIOCGWINSZ
    assert run(arch, ioctl, 3, 0x5401) == ALLOW  # TCGETS
    assert run(arch, personality, 0) == ALLOW
    assert run(arch, personality, 0xFFFFFFFF) == ALLOW  # a query
    assert run(arch, personality, 0x0040000) == DENY  # ADDR_NO_RANDOMIZE
    assert run(arch, personality, 0x0400000) == DENY  # READ_IMPLIES_EXEC


def test_other_abis_are_refused() -> None:
    assert run(AUDIT_ARCH_I386, 26) == KILL  # i386 ptrace: another table of numbers
    assert run(0, 0) == KILL
    x32_read = 0x40000000
    assert run(seccomp.AUDIT_ARCH_X86_64, x32_read) == DENY
    assert run(seccomp.AUDIT_ARCH_X86_64, x32_read + 101) == DENY


def _libseccomp() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("seccomp")
    return ctypes.CDLL(name) if name else None


@pytest.mark.parametrize("arch", list(TABLES), ids=["x86_64", "aarch64"])
def test_numbers_match_libseccomp(arch: int) -> None:
    lib = _libseccomp()
    if lib is None:
        pytest.skip("libseccomp is not installed")
    resolve = lib.seccomp_syscall_resolve_name_arch
    resolve.argtypes = [ctypes.c_uint32, ctypes.c_char_p]
    resolve.restype = ctypes.c_int
    for name, nr in TABLES[arch].items():
        assert resolve(arch, name.encode()) == nr, name
    for name in seccomp.DENIED:  # a name missing from a table must not exist there
        if name not in TABLES[arch]:
            assert resolve(arch, name.encode()) < 0, name


def test_numbers_match_the_kernel_headers() -> None:
    for header, table in (
        ("/usr/include/x86_64-linux-gnu/asm/unistd_64.h", seccomp.X86_64),
        ("/usr/include/asm-generic/unistd.h", seccomp.AARCH64),
    ):
        if not Path(header).exists():
            continue
        text = Path(header).read_text()
        for name, nr in table.items():
            m = re.search(rf"^#define __NR(?:3264)?_{name}\s+(\d+)$", text, re.M)
            assert m and int(m.group(1)) == nr, (header, name)


# --- the real filter in a real jail --------------------------------------------------

WHY = jail.jail_unavailable()
needs_jail = pytest.mark.skipif(WHY is not None, reason=f"cannot jail here: {WHY}")


@needs_jail
@pytest.mark.skipif(not seccomp.supported(), reason="no seccomp table for this machine")
def test_the_jail_denies_what_a_compromised_worker_would_try() -> None:
    seen = run_jailed(
        """
        import ctypes, json, os, platform
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        NR = {
            "x86_64": dict(ptrace=101, pidfd_getfd=438, pidfd_open=434, process_vm_readv=310,
                           unshare=272, keyctl=250, bpf=321, io_uring_setup=425,
                           personality=135, getpid=39),
            "aarch64": dict(ptrace=117, pidfd_getfd=438, pidfd_open=434, process_vm_readv=270,
                            unshare=97, keyctl=219, bpf=280, io_uring_setup=425,
                            personality=92, getpid=172),
        }[platform.machine()]
        def call(name, *args):
            r = libc.syscall(NR[name], *[ctypes.c_long(a) for a in args])
            return r if r >= 0 else -ctypes.get_errno()
        out = {}
        out["ptrace"] = call("ptrace", 0, 0, 0, 0)  # PTRACE_TRACEME
        pidfd = os.pidfd_open(os.getpid())
        out["pidfd_getfd"] = call("pidfd_getfd", pidfd, 0, 0)
        buf = ctypes.create_string_buffer(8)
        iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 8)
        out["process_vm_readv"] = call("process_vm_readv", os.getpid(), ctypes.addressof(iov),
                                       1, ctypes.addressof(iov), 1, 0)
        out["unshare"] = call("unshare", 0x20000)  # CLONE_NEWNS
        out["keyctl"] = call("keyctl", 0, -1, 0)  # KEYCTL_GET_KEYRING_ID, thread keyring
        out["bpf"] = call("bpf", 0, 0, 0)
        out["io_uring_setup"] = call("io_uring_setup", 1, 0)
        out["personality"] = call("personality", 0x0040000)
        out["personality_query"] = call("personality", 0xFFFFFFFF)
        out["getpid"] = call("getpid")
        # TIOCSTI into the probe's own controlling terminal, in a child that made it so
        master, slave = os.openpty()
        name = os.ttyname(slave)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.setsid()
            fd = os.open(name, os.O_RDWR)  # becomes the controlling terminal
            res = []
            for req in (0x5412, (1 << 32) | 0x5412, 0x541C):
                c = ctypes.c_char(b"x")
                x = libc.ioctl(fd, ctypes.c_ulong(req), ctypes.byref(c))
                res.append(x if x >= 0 else -ctypes.get_errno())
            os.write(w, json.dumps(res).encode())
            os._exit(0)
        os.waitpid(pid, 0)
        out["tiocsti"] = json.loads(os.read(r, 100))
        print(json.dumps(out))
        """
    )
    eperm = -errno.EPERM
    for name in ("ptrace", "pidfd_getfd", "process_vm_readv", "unshare", "keyctl", "bpf",
                 "io_uring_setup", "personality"):  # fmt: skip
        assert seen[name] == eperm, (name, seen)
    assert seen["tiocsti"] == [eperm, eperm, eperm], seen
    assert seen["personality_query"] == 0  # PER_LINUX
    assert seen["getpid"] == 2


@needs_jail
def test_seccomp_is_on_for_every_jailed_process() -> None:
    seen = run_jailed(
        """
        import json, os
        out = {}
        for p in os.listdir("/proc"):
            if p.isdigit():
                st = dict(l.split(":", 1) for l in open(f"/proc/{p}/status").read().splitlines())
                out[p] = st["Seccomp"].strip()
        print(json.dumps(out))
        """
    )
    if seccomp.supported():
        assert seen == {"1": "2", "2": "2"}  # bwrap's pid 1 and the probe: filtered both


def test_supported_here() -> None:
    if platform.machine() in ("x86_64", "aarch64"):
        assert seccomp.supported()
