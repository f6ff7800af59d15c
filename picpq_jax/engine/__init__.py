"""The run engine every command uses: workdir, resume, checkpoints, the loop, artifacts.

* :func:`open_workdir` checks a ``--workdir`` (writable, no run overwritten, options
  that must match on resume do) before any work; :class:`Workdir` writes its files.
* :class:`Checkpoints`: Orbax checkpoints with a digest of their contents, verified
  on restore; a damaged newest one is named and the previous one used.
* :class:`Task` and :func:`run_task`: the one loop (progress, metrics, checkpoints,
  SIGINT/SIGTERM) that training, federated rounds, fine-tuning and the search run.
* :func:`load_trained` and :func:`load_compressed`: the typed way to read a run.
"""

from picpq_jax.engine.artifacts import Compressed
from picpq_jax.engine.artifacts import Trained
from picpq_jax.engine.artifacts import load_compressed
from picpq_jax.engine.artifacts import load_trained
from picpq_jax.engine.checkpoints import Checkpoints
from picpq_jax.engine.checkpoints import DamagedCheckpoint
from picpq_jax.engine.checkpoints import tree_digest
from picpq_jax.engine.loop import Outcome
from picpq_jax.engine.loop import Task
from picpq_jax.engine.loop import run_task
from picpq_jax.engine.workdir import Interrupted
from picpq_jax.engine.workdir import Workdir
from picpq_jax.engine.workdir import catching_signals
from picpq_jax.engine.workdir import check_resume
from picpq_jax.engine.workdir import check_writable
from picpq_jax.engine.workdir import may_change_fields
from picpq_jax.engine.workdir import open_workdir
