"""Run a command under the system call filter a systemd unit's settings describe (tests only).

systemd is not running where the tests run, so ``SystemCallFilter=`` cannot be tried through
it. This builds the same seccomp filter with libseccomp (through ctypes): the syscall groups
come from ``systemd-analyze syscall-filter`` (the same tables systemd compiles in), the first
``SystemCallFilter=`` line is an allow list, later ``~`` lines remove from it, and
``MemoryDenyWriteExecute=yes`` adds systemd's separate filter against writable-and-executable
memory. A filtered call fails with the unit's ``SystemCallErrorNumber=`` (or kills the process
with SIGSYS when it sets none, or with ``--strict``: then a run that completes never even
tried a filtered call). The filter is loaded in this process, which then ``execv``s the
command: it and all its children run under it.

    python -m tests.support.seccomp --unit scripts/queue-processor.service [--user NAME] \
        -- CMD [ARGS...]

``--user`` (as root) switches to that user before the filter is loaded, as ``User=`` does.
"""

from __future__ import annotations

import argparse
import ctypes
import ctypes.util
import errno
import os
import pwd
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

SCMP_ACT_KILL_PROCESS = 0x80000000
SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_MASKED_EQ = 7
PROT_WRITE = 0x2
PROT_EXEC = 0x4
SHM_EXEC = 0o100000
# Implicitly allowed by systemd whatever the list says (systemd.exec(5), SystemCallFilter=).
IMPLICIT = ("execve", "exit", "exit_group", "getrlimit", "rt_sigreturn", "sigreturn")


def scmp_act_errno(code: int) -> int:
    """libseccomp's scmp_act_errno(code)."""
    return 0x00050000 | (code & 0x0000FFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = (
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    )


def syscall_groups() -> dict[str, list[str]]:
    """``@group`` -> members (syscalls and nested groups), from ``systemd-analyze``."""
    analyze = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
    output = subprocess.run(
        [analyze, "syscall-filter", "--no-pager"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "SYSTEMD_LOG_LEVEL": "err"},
    ).stdout
    groups: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in output.splitlines():
        if line.startswith("@"):
            current = groups.setdefault(line.strip(), [])
        elif current is not None and line.strip() and not line.strip().startswith("#"):
            current.append(line.strip())
    return groups


def expand(names: Sequence[str], groups: dict[str, list[str]]) -> set[str]:
    """Syscall names, with ``@groups`` expanded recursively."""
    result: set[str] = set()
    for name in names:
        if name.startswith("@"):
            result |= expand(groups[name], groups)
        else:
            result.add(name)
    return result


def unit_filter(unit_text: str) -> tuple[set[str], bool, int | None]:
    """The allowed syscalls, whether MemoryDenyWriteExecute is on, and the errno a filtered
    call fails with (None: it kills), per the unit."""
    lines = re.findall(r"^SystemCallFilter=(.*)$", unit_text, flags=re.MULTILINE)
    assert lines, "the unit has no SystemCallFilter="
    assert not lines[0].startswith("~"), "expected an allow list first"
    groups = syscall_groups()
    allowed = expand(lines[0].split(), groups) | set(IMPLICIT)
    for line in lines[1:]:
        names = line.removeprefix("~").split()
        if line.startswith("~"):
            allowed -= expand(names, groups)
        else:
            allowed |= expand(names, groups)
    mdwe = re.search(r"^MemoryDenyWriteExecute=(yes|true|1)\s*$", unit_text, re.MULTILINE)
    code = re.search(r"^SystemCallErrorNumber=(\w+)\s*$", unit_text, re.MULTILINE)
    return allowed, mdwe is not None, None if code is None else int(getattr(errno, code[1]))


def _libseccomp() -> ctypes.CDLL:
    path = ctypes.util.find_library("seccomp")
    assert path is not None, "libseccomp is not installed (Debian: libseccomp2)"
    lib = ctypes.CDLL(path, use_errno=True)
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_load.argtypes = [ctypes.c_void_p]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    return lib


def _rule(lib: ctypes.CDLL, ctx: int, action: int, name: str, *conditions: _ArgCmp) -> None:
    number = lib.seccomp_syscall_resolve_name(name.encode())
    if number < 0:  # not a syscall of this architecture
        return
    array = (_ArgCmp * len(conditions))(*conditions) if conditions else None
    code = lib.seccomp_rule_add_array(ctx, action, number, len(conditions), array)
    if code < 0:
        raise OSError(-code, f"seccomp_rule_add({name}): {os.strerror(-code)}")


def _load(lib: ctypes.CDLL, ctx: int) -> None:
    code = lib.seccomp_load(ctx)
    lib.seccomp_release(ctx)
    if code < 0:
        raise OSError(-code, f"seccomp_load: {os.strerror(-code)}")


def install(
    allowed: set[str], *, memory_deny_write_execute: bool, error_number: int | None
) -> None:
    """Load the filters into this process (and every process it starts from now on)."""
    lib = _libseccomp()
    default = SCMP_ACT_KILL_PROCESS if error_number is None else scmp_act_errno(error_number)
    ctx = lib.seccomp_init(default)
    assert ctx, "seccomp_init failed"
    for name in sorted(allowed):
        _rule(lib, ctx, SCMP_ACT_ALLOW, name)
    if memory_deny_write_execute:
        # systemd's MemoryDenyWriteExecute= filter, loaded as a filter of its own.
        mdwe = lib.seccomp_init(SCMP_ACT_ALLOW)
        eperm = scmp_act_errno(errno.EPERM)
        both = PROT_WRITE | PROT_EXEC
        _rule(lib, mdwe, eperm, "mmap", _ArgCmp(2, SCMP_CMP_MASKED_EQ, both, both))
        _rule(lib, mdwe, eperm, "mprotect", _ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC))
        _rule(
            lib, mdwe, eperm, "pkey_mprotect", _ArgCmp(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)
        )
        _rule(lib, mdwe, eperm, "shmat", _ArgCmp(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC))
        _load(lib, mdwe)
    _load(lib, ctx)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.support.seccomp")
    parser.add_argument("--unit", required=True, type=Path, help="the unit file to follow")
    parser.add_argument("--user", help="run as this user (needs root), like User=")
    parser.add_argument("--strict", action="store_true", help="kill on a filtered call")
    parser.add_argument("command", nargs="+")
    args = parser.parse_args(argv)
    allowed, mdwe, error_number = unit_filter(args.unit.read_text())
    command = args.command[1:] if args.command[0] == "--" else args.command
    if args.user is not None:
        entry = pwd.getpwnam(args.user)
        os.setgroups([])
        os.setgid(entry.pw_gid)
        os.setuid(entry.pw_uid)
        os.environ["HOME"] = entry.pw_dir
    install(
        allowed,
        memory_deny_write_execute=mdwe,
        error_number=None if args.strict else error_number,
    )
    os.execv(command[0], command)
    return 127  # not reached


if __name__ == "__main__":
    sys.exit(main())
