"""The ``clients`` device mesh.

Several hosts (a TPU pod slice, a SLURM or MPI job, or an explicit coordinator) run
the same program; every command starts with
:func:`picpq_jax.utils.initialize_if_multihost` (re-exported here), which calls
``jax.distributed.initialize()`` when the environment says this process is one of
several. There is no other networking: the hosts' devices form one mesh and every
exchange is a JAX collective.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from picpq_jax.errors import UserError
from picpq_jax.utils import distributed_env, initialize_if_multihost  # noqa: F401  (re-exported)

AXIS = "clients"


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
