"""Checkpoints of a training run: :class:`picpq_jax.engine.Checkpoints` (re-exported).

Read a finished run with :func:`picpq_jax.engine.load_trained`.
"""

from picpq_jax.engine.checkpoints import Checkpoints  # noqa: F401
