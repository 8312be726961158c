"""The supervisor's own isolation: namespaces, read-only mounts, hidden homes, kept interpreter.

Standard library only: this module runs inside the sandbox's supervisor.
"""

from __future__ import annotations

import os
import re
import sys

from .kernel import (
  _CLONE_NEWNET,
  _CLONE_NEWNS,
  _CLONE_NEWUSER,
  _MOUNT_FLAGS,
  _MS_BIND,
  _MS_NODEV,
  _MS_NOSUID,
  _MS_PRIVATE,
  _MS_RDONLY,
  _MS_REC,
  _MS_REMOUNT,
  _SECRET_NAMES,
  LAYERS,
  _mount,
  _mount_over,
  _mounts,
  _sys,
  _try_mount,
)


def _isolate_supervisor(cfg: dict) -> dict:
  """Enters new namespaces where allowed and returns which layers are active."""
  off = set(cfg["disable"])
  feats = {k: False for k in LAYERS}
  feats.update(readonly_fs=False, supervisor_pid_ns=False, proc=False, audit_hook=False)
  if os.geteuid() == 0:
    feats["uid_drop"] = "uid_drop" not in off
    for layer, flag in (("mount_ns", _CLONE_NEWNS), ("net_ns", _CLONE_NEWNET)):
      if layer not in off:
        try:
          _sys("unshare", flag)
          feats[layer] = True
        except OSError:
          pass
  elif "userns" not in off:
    flags = _CLONE_NEWUSER | (0 if "mount_ns" in off else _CLONE_NEWNS)
    flags |= 0 if "net_ns" in off else _CLONE_NEWNET
    uid, gid = os.getuid(), os.getgid()
    try:
      _sys("unshare", flags)
      maps = (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1"))
      for path, text in maps:
        with open(f"/proc/self/{path}", "w") as f:
          f.write(text)
      feats.update(userns=True, mount_ns=bool(flags & _CLONE_NEWNS),
                   net_ns=bool(flags & _CLONE_NEWNET))
    except OSError:
      pass
  if feats["mount_ns"]:
    try:
      _mount(None, "/", None, _MS_REC | _MS_PRIVATE)  # nothing below may propagate to the host
    except OSError:
      feats["mount_ns"] = False
  if feats["mount_ns"]:
    _hide_homes(cfg)
    feats["readonly_fs"] = _remount_readonly()
  elif feats["uid_drop"] and not _others_can_read(sys.prefix):
    feats["warning"] = (f"{sys.prefix} is not readable by the sandbox's uid and there is no mount "
                        "namespace to expose it: only pre-imported modules can be imported")
  return feats


def _others_can_read(path: str) -> bool:
  """Whether every directory from / down to `path` is searchable by any uid."""
  path = os.path.realpath(path)
  while True:
    try:
      if not os.stat(path).st_mode & 0o001:
        return False
    except OSError:
      return False
    if path == "/":
      return True
    path = os.path.dirname(path)


def _remount_readonly() -> bool:
  """Re-binds every mount read-only (keeping its nosuid/nodev/... flags); True if / succeeded."""
  root_ok = False
  for path, opts in _mounts():
    flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
    for name, bit in _MOUNT_FLAGS.items():
      flags |= bit if name in opts else 0
    try:
      _mount(None, path, None, flags)
      root_ok = root_ok or path == "/"
    except OSError:
      pass
  return root_ok


def _hide_homes(cfg: dict) -> None:
  """Covers /tmp and home directories with empty tmpfs mounts, binding back what Python needs.

  Besides hiding secrets (keys, tokens, caches) and the host's /tmp, this makes e.g. a pyenv
  under a 0700 /root traversable for the cell's unprivileged uid. A kept path that cannot be
  bound back raises: the pre-import then fails with a clear message instead of later imports.
  """
  needed = list(cfg["bind_paths"])
  homes = {"/root"}
  if re.match(r"^/(home|root|Users)/[^/]+", cfg.get("host_home") or ""):
    homes.add(cfg["host_home"])
  try:
    homes.update(os.path.join("/home", d) for d in os.listdir("/home"))
  except OSError:
    pass
  homes = sorted({os.path.realpath(h) for h in homes if os.path.isdir(h)})
  _mount_over("/tmp", "size=1m,mode=0755", _MS_NOSUID | _MS_NODEV, needed)
  for home in homes:
    if home == "/tmp" or home.startswith("/tmp/"):
      continue
    if any(home == p or home.startswith(p + "/") for p in needed):
      _hide_secret_files(home)  # the home (or a parent) is itself needed: hide known secrets
      continue
    _mount_over(home, "size=1m,mode=0755", _MS_NOSUID | _MS_NODEV, needed)


def _hide_secret_files(home: str) -> None:
  for name in _SECRET_NAMES:
    path = os.path.join(home, name)
    if os.path.isdir(path):
      _try_mount("tmpfs", path, "tmpfs", _MS_RDONLY | _MS_NOSUID | _MS_NODEV, "size=4k,mode=0700")
    elif os.path.exists(path):
      _try_mount("/dev/null", path, None, _MS_BIND)

