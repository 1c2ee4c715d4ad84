"""The replica jail's seccomp filter, assembled as classic BPF in pure Python.

bubblewrap's ``--seccomp FD`` loads a compiled program, the array of ``struct
sock_filter`` that libseccomp's ``seccomp_export_bpf`` writes. The jail already
has no capabilities, so most of what is denied here would fail anyway; the
filter removes the kernel interfaces a compromised tmux or worker would reach
for next (ptrace and cross-process memory or file descriptor access, keyrings,
BPF, io_uring, userfaultfd, new namespaces and mounts, injecting keys into a
terminal), so that a kernel bug behind one of them is out of reach too.

Denied calls fail with ``EPERM``; everything else is allowed (a deny list: the
worker, tmux and ``sleep`` must keep working as their libraries change). A
system call made through another ABI (i386 or x32 on x86_64, arm32 on arm64)
could bypass a table of numbers, so an unknown architecture kills the process
and x32 numbers are denied.
"""

from __future__ import annotations

import errno
import platform
import struct

# struct sock_filter opcodes (linux/bpf_common.h)
LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
JGE_K = 0x35  # BPF_JMP | BPF_JGE | BPF_K
RET_K = 0x06  # BPF_RET | BPF_K

# struct seccomp_data offsets: int nr; u32 arch; u64 ip; u64 args[6]
OFF_NR = 0
OFF_ARCH = 4


def off_arg_low(i: int) -> int:
    """Offset of the low 32 bits of args[i] (both architectures are little-endian)."""
    return 16 + 8 * i


SECCOMP_RET_KILL_PROCESS = 0x80000000
SECCOMP_RET_ERRNO = 0x00050000
SECCOMP_RET_ALLOW = 0x7FFF0000
RET_DENY = SECCOMP_RET_ERRNO | errno.EPERM

AUDIT_ARCH_X86_64 = 62 | 0x80000000 | 0x40000000  # EM_X86_64, 64-bit, little-endian
AUDIT_ARCH_AARCH64 = 183 | 0x80000000 | 0x40000000  # EM_AARCH64, 64-bit, little-endian
X32_SYSCALL_BIT = 0x40000000

TIOCSTI = 0x5412
"""Pushes bytes into a terminal's input: keys typed "by" whoever reads the tty."""
TIOCLINUX = 0x541C
"""Console operations, including pasting the selection (input injection again)."""
PER_LINUX = 0
PERSONALITY_QUERY = 0xFFFFFFFF

DENIED = (
    # other processes' memory, file descriptors and state
    "ptrace", "pidfd_getfd", "process_vm_readv", "process_vm_writev", "kcmp",
    # kernel attack surface an unprivileged process can still reach
    "bpf", "keyctl", "add_key", "request_key", "userfaultfd",
    "io_uring_setup", "io_uring_enter", "io_uring_register", "perf_event_open",
    "mbind", "migrate_pages", "move_pages", "set_mempolicy", "lookup_dcookie",
    # namespaces, mounts and file handles: the jail's walls
    "unshare", "setns", "mount", "umount2", "pivot_root", "move_mount", "open_tree",
    "fsopen", "fsmount", "fspick", "mount_setattr", "open_by_handle_at",
    "name_to_handle_at",
    # the machine's administration
    "kexec_load", "kexec_file_load", "init_module", "finit_module", "delete_module",
    "quotactl", "acct", "swapon", "swapoff", "reboot", "syslog", "fanotify_init",
    # x86_64 only
    "iopl", "ioperm", "modify_ldt", "uselib",
)  # fmt: skip
"""Always fail with EPERM. ``ioctl`` (TIOCSTI, TIOCLINUX) and ``personality``
(anything but PER_LINUX) are checked by argument."""

X86_64 = {
    "ioctl": 16, "personality": 135,
    "ptrace": 101, "pidfd_getfd": 438, "process_vm_readv": 310, "process_vm_writev": 311,
    "kcmp": 312, "bpf": 321, "keyctl": 250, "add_key": 248, "request_key": 249,
    "userfaultfd": 323, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "perf_event_open": 298, "mbind": 237, "migrate_pages": 256,
    "move_pages": 279, "set_mempolicy": 238, "lookup_dcookie": 212, "unshare": 272,
    "setns": 308, "mount": 165, "umount2": 166, "pivot_root": 155, "move_mount": 429,
    "open_tree": 428, "fsopen": 430, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "open_by_handle_at": 304, "name_to_handle_at": 303, "kexec_load": 246,
    "kexec_file_load": 320, "init_module": 175, "finit_module": 313, "delete_module": 176,
    "quotactl": 179, "acct": 163, "swapon": 167, "swapoff": 168, "reboot": 169,
    "syslog": 103, "fanotify_init": 300, "iopl": 172, "ioperm": 173, "modify_ldt": 154,
    "uselib": 134,
}  # fmt: skip
"""arch/x86/entry/syscalls/syscall_64.tbl (asm/unistd_64.h)."""

AARCH64 = {
    "ioctl": 29, "personality": 92,
    "ptrace": 117, "pidfd_getfd": 438, "process_vm_readv": 270, "process_vm_writev": 271,
    "kcmp": 272, "bpf": 280, "keyctl": 219, "add_key": 217, "request_key": 218,
    "userfaultfd": 282, "io_uring_setup": 425, "io_uring_enter": 426,
    "io_uring_register": 427, "perf_event_open": 241, "mbind": 235, "migrate_pages": 238,
    "move_pages": 239, "set_mempolicy": 237, "lookup_dcookie": 18, "unshare": 97,
    "setns": 268, "mount": 40, "umount2": 39, "pivot_root": 41, "move_mount": 429,
    "open_tree": 428, "fsopen": 430, "fsmount": 432, "fspick": 433, "mount_setattr": 442,
    "open_by_handle_at": 265, "name_to_handle_at": 264, "kexec_load": 104,
    "kexec_file_load": 294, "init_module": 105, "finit_module": 273, "delete_module": 106,
    "quotactl": 60, "acct": 89, "swapon": 224, "swapoff": 225, "reboot": 142,
    "syslog": 116, "fanotify_init": 262,
}  # fmt: skip
"""include/uapi/asm-generic/unistd.h, which arm64 uses (no iopl, ioperm,
modify_ldt or uselib there)."""

ARCHES = {AUDIT_ARCH_X86_64: X86_64, AUDIT_ARCH_AARCH64: AARCH64}

Insn = tuple[int, int, int, int]


class _Asm:
    """Classic BPF with forward jumps to labels, resolved when done."""

    def __init__(self) -> None:
        self.code: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def load(self, offset: int) -> None:
        self.code.append((LD_W_ABS, 0, 0, offset))

    def jump(self, op: int, k: int, jt: str | int = 0, jf: str | int = 0) -> None:
        self.code.append((op, jt, jf, k))

    def ret(self, k: int) -> None:
        self.code.append((RET_K, 0, 0, k))

    def resolve(self) -> list[Insn]:
        out: list[Insn] = []
        for i, (code, jt, jf, k) in enumerate(self.code):
            offsets = []
            for target in (jt, jf):
                off = target if isinstance(target, int) else self.labels[target] - i - 1
                if not 0 <= off <= 255:
                    raise ValueError(f"jump out of range at {i}")
                offsets.append(off)
            out.append((code, offsets[0], offsets[1], k))
        return out


def instructions() -> list[Insn]:
    """The filter as (code, jt, jf, k) tuples."""
    a = _Asm()
    a.load(OFF_ARCH)
    for arch in ARCHES:
        a.jump(JEQ_K, arch, jt=f"arch{arch:x}")
    a.ret(SECCOMP_RET_KILL_PROCESS)
    for arch, table in ARCHES.items():
        a.label(f"arch{arch:x}")
        a.load(OFF_NR)
        if arch == AUDIT_ARCH_X86_64:
            a.jump(JGE_K, X32_SYSCALL_BIT, jt="deny")
        a.jump(JEQ_K, table["ioctl"], jt="ioctl")
        a.jump(JEQ_K, table["personality"], jt="personality")
        for name in DENIED:
            if name in table:
                a.jump(JEQ_K, table[name], jt="deny")
        a.ret(SECCOMP_RET_ALLOW)
    a.label("ioctl")  # ioctl's request is an unsigned int: the high half is ignored
    a.load(off_arg_low(1))
    a.jump(JEQ_K, TIOCSTI, jt="deny")
    a.jump(JEQ_K, TIOCLINUX, jt="deny")
    a.ret(SECCOMP_RET_ALLOW)
    a.label("personality")  # an unsigned int too
    a.load(off_arg_low(0))
    a.jump(JEQ_K, PER_LINUX, jt="allow")
    a.jump(JEQ_K, PERSONALITY_QUERY, jt="allow")
    a.label("deny")
    a.ret(RET_DENY)
    a.label("allow")
    a.ret(SECCOMP_RET_ALLOW)
    return a.resolve()


def program() -> bytes:
    """The compiled filter, as ``bwrap --seccomp`` reads it (native byte order)."""
    return b"".join(struct.pack("=HBBI", *insn) for insn in instructions())


def supported() -> bool:
    """Whether this machine's own architecture has a table here."""
    return platform.machine() in ("x86_64", "aarch64", "arm64")
