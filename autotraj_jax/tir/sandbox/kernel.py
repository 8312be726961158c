"""Kernel interfaces of the sandbox (ctypes, namespaces, mounts, seccomp) and its constants.

Each use is guarded so a missing interface only disables its isolation layer. Standard library
only: this module also runs inside the sandbox's supervisor.
"""

from __future__ import annotations

import ctypes
import os
import platform
import re
import struct
from typing import Any

LAYERS = ("uid_drop", "userns", "mount_ns", "net_ns", "pid_ns", "seccomp")
_UID_BASE = 1_000_000
_SESSION_CPU_FACTOR = 20  # a session's processes may use 20 x cpu_s CPU seconds in total
_MAX_REPORT = 64 << 10  # bytes of a cell's result line
_READY_TIMEOUT_S = 120.0  # first start imports numpy/sympy on a busy 2-core box

_CLONE_NEWNS, _CLONE_NEWUSER = 0x00020000, 0x10000000
_CLONE_NEWPID, _CLONE_NEWNET = 0x20000000, 0x40000000
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC = 1, 2, 4, 8
_MS_REMOUNT, _MS_NOATIME, _MS_NODIRATIME, _MS_BIND = 32, 1024, 2048, 4096
_MS_REC, _MS_PRIVATE, _MS_RELATIME = 1 << 14, 1 << 18, 1 << 21
_MOUNT_FLAGS = {"nosuid": _MS_NOSUID, "nodev": _MS_NODEV, "noexec": _MS_NOEXEC,
                "noatime": _MS_NOATIME, "nodiratime": _MS_NODIRATIME, "relatime": _MS_RELATIME}
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_SECCOMP, _PR_SET_NO_NEW_PRIVS = 1, 4, 22, 38

# Syscalls the cell never needs; numbers per architecture (x32 and foreign ABIs are refused too).
_SYSCALLS = {
  "x86_64": dict(arch=0xC000003E, socket=41, io_uring_setup=425, unshare=272, setns=308,
                 mount=165, umount2=166, pivot_root=155, ptrace=101, bpf=321, perf_event_open=298,
                 keyctl=250, add_key=248, request_key=249, userfaultfd=323,
                 process_vm_writev=311, kexec_load=246, open_by_handle_at=304,
                 clone=56, clone3=435, kill=62),
  "aarch64": dict(arch=0xC00000B7, socket=198, io_uring_setup=425, unshare=97, setns=268,
                  mount=40, umount2=39, pivot_root=41, ptrace=117, bpf=280, perf_event_open=241,
                  keyctl=219, add_key=217, request_key=218, userfaultfd=282,
                  process_vm_writev=271, kexec_load=104, open_by_handle_at=265,
                  clone=220, clone3=435, kill=129),
}
_AUDIT_BLOCKED = frozenset({"socket.__new__", "socket.connect", "socket.bind", "socket.sendto",
                            "subprocess.Popen", "os.system", "os.exec", "os.posix_spawn",
                            "os.spawn", "ctypes.dlopen"})
_SECRET_NAMES = (".ssh", ".aws", ".gnupg", ".config/gcloud", ".docker", ".kube", ".netrc",
                 ".git-credentials", ".pypirc", ".cache/huggingface", ".huggingface", ".azure")



try:
  _libc = ctypes.CDLL(None, use_errno=True)
  _libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong,
                          ctypes.c_char_p]
  _libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong,
                          ctypes.c_ulong]
except (OSError, AttributeError):  # not Linux/glibc: every namespace layer reports unavailable
  _libc = None


def _sys(name: str, *args: Any) -> None:
  if _libc is None or not hasattr(_libc, name):
    raise OSError(38, f"{name} unavailable")
  if getattr(_libc, name)(*args) != 0:
    err = ctypes.get_errno()
    raise OSError(err, f"{name}: {os.strerror(err)}")


def _mount(src: str | None, target: str, fstype: str | None, flags: int, data: str | None = None):
  enc = lambda s: None if s is None else s.encode()
  _sys("mount", enc(src), enc(target), enc(fstype), flags, enc(data))


def _prctl(option: int, arg: int) -> None:
  _sys("prctl", option, arg, 0, 0, 0)


def _nspids() -> list[int]:
  """This process's pid in each PID namespace, outermost (as seen by the mounted /proc) first."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("NSpid:"):
        return [int(x) for x in line.split()[1:]]
  return [os.getpid()]


def _seccomp_program() -> bytes | None:
  """A BPF filter (struct sock_filter[]) denying the syscalls in `_SYSCALLS`, or None."""
  nr = _SYSCALLS.get(platform.machine())
  if nr is None:
    return None
  ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
  errno_ret = lambda e: (ret, 0, 0, 0x00050000 | e)
  eperm, allow = errno_ret(1), (ret, 0, 0, 0x7FFF0000)
  prog = [(ld, 0, 0, 4), (jeq, 1, 0, nr["arch"]), eperm, (ld, 0, 0, 0)]
  if platform.machine() == "x86_64":
    prog += [(jge, 0, 1, 0x40000000), eperm]  # x32 syscalls
  for name in ("socket", "io_uring_setup", "unshare", "setns", "mount", "umount2", "pivot_root",
               "ptrace", "bpf", "perf_event_open", "keyctl", "add_key", "request_key",
               "userfaultfd", "process_vm_writev", "kexec_load", "open_by_handle_at"):
    prog += [(jeq, 0, 1, nr[name]), eperm]
  prog += [(jeq, 0, 1, nr["clone3"]), errno_ret(38)]  # ENOSYS: libc falls back to clone()
  prog += [(jeq, 0, 3, nr["clone"]), (ld, 0, 0, 16), (jset, 0, 1, _CLONE_NEWUSER), eperm]
  prog += [(ld, 0, 0, 0), (jeq, 0, 3, nr["kill"]), (ld, 0, 0, 16), (jeq, 0, 1, 0xFFFFFFFF), eperm]
  prog.append(allow)
  return b"".join(struct.pack("=HBBI", *ins) for ins in prog)


def _install_seccomp() -> bool:
  prog = _seccomp_program()
  if prog is None or _libc is None:
    return False
  buf = ctypes.create_string_buffer(prog, len(prog))
  fprog = struct.pack("=HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
  fbuf = ctypes.create_string_buffer(fprog, len(fprog))
  try:
    _prctl(_PR_SET_NO_NEW_PRIVS, 1)
    _sys("prctl", _PR_SET_SECCOMP, 2, ctypes.addressof(fbuf), 0, 0)
    return True
  except OSError:
    return False


def _audit_guard(event: str, args: tuple) -> None:
  if event in _AUDIT_BLOCKED:
    raise PermissionError(f"{event} is disabled in the sandbox")



def _try_mount(*args: Any) -> bool:
  try:
    _mount(*args)
    return True
  except OSError:
    return False


def _mounts() -> list[tuple[str, set[str]]]:
  out = []
  with open("/proc/self/mountinfo") as f:
    for line in f:
      parts = line.split()
      path = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[4])
      out.append((path, set(parts[5].split(","))))
  return out


_ST_TO_MS = ((getattr(os, "ST_NOSUID", 0), _MS_NOSUID), (getattr(os, "ST_NODEV", 0), _MS_NODEV),
             (getattr(os, "ST_NOEXEC", 0), _MS_NOEXEC), (getattr(os, "ST_NOATIME", 0), _MS_NOATIME),
             (getattr(os, "ST_NODIRATIME", 0), _MS_NODIRATIME),
             (getattr(os, "ST_RELATIME", 0), _MS_RELATIME))


def _inside(paths: list[str], top: str) -> list[str]:
  """The paths strictly below `top`, outermost only (a nested one comes along with its parent)."""
  below = sorted(p for p in paths if p.startswith(top.rstrip("/") + "/"))
  return [p for j, p in enumerate(below) if not any(p.startswith(q + "/") for q in below[:j])]


def _mount_over(target: str, data: str, flags: int, keep: list[str]) -> bool:
  """Covers `target` with an empty tmpfs, then binds each `keep` path below it back, read-only.

  Why: a virtualenv or interpreter under /tmp or a home directory must stay importable at its
  own path. The kept directories are opened before the cover and bound from their open fds, so
  no staging area is needed. False if the tmpfs could not be mounted (then nothing changed).
  """
  held = []
  for p in _inside(keep, target):
    try:
      held.append((p, os.open(p, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)))
    except OSError:
      pass  # vanished or unreadable: nothing to keep
  try:
    if not _try_mount("tmpfs", target, "tmpfs", flags, data):
      return False
    for p, fd in held:
      _bind_back(fd, p, target)
    return True
  finally:
    for _, fd in held:
      os.close(fd)


def _bind_back(fd: int, path: str, top: str) -> None:
  """Binds the directory open as `fd` at `path` (below the fresh tmpfs `top`), read-only."""
  cur = top
  for part in os.path.relpath(path, top).split(os.sep):
    cur = os.path.join(cur, part)
    if not os.path.isdir(cur):
      os.mkdir(cur)
      os.chmod(cur, 0o755)  # traversable by the cell's uid whatever the umask
  try:
    _mount(f"/proc/self/fd/{fd}", path, None, _MS_BIND | _MS_REC)
  except OSError as e:
    raise OSError(e.errno, f"cannot bind {path} into the sandbox: {e.strerror}") from None
  keep = sum(ms for st, ms in _ST_TO_MS if st and os.statvfs(path).f_flag & st)
  _try_mount(None, path, None, _MS_REMOUNT | _MS_BIND | _MS_RDONLY | keep)
