"""Multi-host start-up and the ``clients`` device mesh.

Several hosts (a TPU pod slice, a SLURM or MPI job, or an explicit coordinator) run
the same program; :func:`initialize_if_multihost` calls
``jax.distributed.initialize()`` when the environment says this process is one of
several, before any array is created. There is no other networking: the hosts' devices
form one mesh and every exchange is a JAX collective.
"""

from __future__ import annotations

import os
from typing import Mapping

import jax
import numpy as np
from jax.sharding import Mesh

from picpq_jax.errors import UserError

AXIS = "clients"


def _count(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ.get(name, "1"))
  except ValueError:
    return 1


def distributed_env(environ: Mapping[str, str]) -> dict | None:
  """Keyword arguments for ``jax.distributed.initialize``, or ``None`` on a single host.

  Multi-host when any of these holds:

  * ``JAX_COORDINATOR_ADDRESS`` is set (with ``JAX_NUM_PROCESSES`` and
    ``JAX_PROCESS_ID`` when present): passed through explicitly;
  * SLURM with ``SLURM_NTASKS > 1``, Open MPI with ``OMPI_COMM_WORLD_SIZE > 1``, or a
    Cloud TPU pod (``TPU_WORKER_HOSTNAMES`` lists several hosts): JAX detects the
    cluster itself (empty arguments).
  """
  address = environ.get("JAX_COORDINATOR_ADDRESS")
  if address:
    kwargs: dict = {"coordinator_address": address}
    for env, arg in (("JAX_NUM_PROCESSES", "num_processes"), ("JAX_PROCESS_ID", "process_id")):
      if environ.get(env):
        kwargs[arg] = int(environ[env])
    return kwargs
  if _count(environ, "SLURM_NTASKS") > 1 or _count(environ, "OMPI_COMM_WORLD_SIZE") > 1:
    return {}
  if len([h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
    return {}
  return None


def initialize_if_multihost(environ: Mapping[str, str] | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` when :func:`distributed_env` says so.

  Call it first, before any JAX computation. Returns True when this process is (now)
  part of a multi-host run.
  """
  if jax.distributed.is_initialized():
    return True
  kwargs = distributed_env(os.environ if environ is None else environ)
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  return True


def clients_mesh(participants: int, devices: int = 0) -> Mesh:
  """A 1-D mesh with axis ``clients`` over which ``participants`` clients are sharded.

  Args:
    participants: M, clients per round.
    devices: mesh size; ``0`` picks the largest number of this job's devices that
      divides ``M`` (all of them on several hosts, where ``M`` must be a multiple).

  Returns:
    ``Mesh`` over the first ``D`` of ``jax.devices()``; each holds ``M / D`` clients.
  """
  available = jax.device_count()
  if devices < 0 or devices > available:
    raise UserError(f"--devices={devices} is out of range: this job has {available} "
                    f"devices; use 0 (automatic) or 1..{available}")
  if jax.process_count() > 1 and devices not in (0, available):
    raise UserError(f"--devices={devices}: a multi-host run uses all {available} devices; "
                    f"pass 0")
  if devices == 0:
    candidates = [available] if jax.process_count() > 1 else range(available, 0, -1)
    devices = next((d for d in candidates if participants % d == 0), 0)
  if devices == 0 or participants % devices:
    raise UserError(f"{participants} clients per round do not split over {devices or available} "
                    f"devices: choose --clients and --participation so that the clients "
                    f"per round are a multiple of the devices")
  return Mesh(np.array(jax.devices()[:devices]), (AXIS,))
