"""Multi-host start-up, and the two rules every process follows afterwards.

`initialize` joins this process to the run, before anything touches a device. Afterwards every
process runs the same program on the same inputs (SPMD): `is_primary` says whether this one writes
the shared outputs (process 0 does; the work directory is on a file system all hosts see), and
`from_primary` hands every process process 0's copy of what only one process should compute
(tool results, a server's answers), so no host can drift from the others.

TPU pods, Slurm/MPI/Kubernetes GPU hosts: JAX finds the coordinator, the process count and this
process's id itself. Anywhere else (several processes on CPU hosts, a test on localhost) the
environment names them: JAX_COORDINATOR_ADDRESS (host:port of process 0), JAX_NUM_PROCESSES,
JAX_PROCESS_ID and optionally JAX_LOCAL_DEVICE_IDS (comma-separated, GPU only).
"""

from __future__ import annotations

import os
import pickle
from typing import Mapping, TypeVar

T = TypeVar("T")

COORDINATOR = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES = "JAX_NUM_PROCESSES"
PROCESS_ID = "JAX_PROCESS_ID"
LOCAL_DEVICE_IDS = "JAX_LOCAL_DEVICE_IDS"


def _int(env: Mapping[str, str], name: str) -> int | None:
  text = env.get(name, "").strip()
  if not text:
    return None
  try:
    return int(text)
  except ValueError:
    raise ValueError(f"{name} must be an integer, got {text!r}") from None


def init_args(env: Mapping[str, str] | None = None) -> dict[str, object]:
  """Keyword arguments for `jax.distributed.initialize` from the environment; empty when it names
  no process count (then JAX detects the cluster itself)."""
  env = os.environ if env is None else env
  num, pid = _int(env, NUM_PROCESSES), _int(env, PROCESS_ID)
  if num is None and pid is None:
    return {}
  address = env.get(COORDINATOR, "").strip()
  if num is None or pid is None or not address:
    raise ValueError(f"{NUM_PROCESSES}, {PROCESS_ID} and {COORDINATOR} must be set together, got "
                     f"{NUM_PROCESSES}={num}, {PROCESS_ID}={pid}, {COORDINATOR}={address or None}")
  if num < 1 or not 0 <= pid < num:
    raise ValueError(f"{PROCESS_ID}={pid} is not in [0, {NUM_PROCESSES}={num})")
  args: dict[str, object] = {"coordinator_address": address, "num_processes": num, "process_id": pid}
  ids = env.get(LOCAL_DEVICE_IDS, "").strip()
  if ids:
    try:
      args["local_device_ids"] = [int(i) for i in ids.split(",")]
    except ValueError:
      raise ValueError(f"{LOCAL_DEVICE_IDS} must be comma-separated integers, got {ids!r}") from None
  return args


def initialize(env: Mapping[str, str] | None = None) -> None:
  """Joins the multi-process run: explicit settings from the environment if it has them, else JAX's
  own cluster detection (TPU pods, Slurm, MPI, Kubernetes). Call once, before the first device use."""
  import jax
  jax.distributed.initialize(**init_args(env))


def is_primary() -> bool:
  """True on process 0, and in a single-process run (never starts a JAX backend there)."""
  import jax
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def from_primary(value: T) -> T:
  """Process 0's `value` on every process (pickled and broadcast; the others pass anything, e.g.
  None). A collective: every process must call it, in the same order."""
  import jax
  if not jax.distributed.is_initialized() or jax.process_count() == 1:
    return value
  import numpy as np
  from jax.experimental import multihost_utils
  primary = jax.process_index() == 0
  data = np.frombuffer(pickle.dumps(value), np.uint8) if primary else np.zeros(0, np.uint8)
  size = int(multihost_utils.broadcast_one_to_all(np.int64(data.size)))
  buf = np.zeros(size, np.uint8)
  buf[:data.size] = data
  got = multihost_utils.broadcast_one_to_all(buf)
  return value if primary else pickle.loads(np.asarray(got).tobytes())
