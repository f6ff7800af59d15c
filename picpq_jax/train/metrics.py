"""Metrics as JSON lines and tables: re-exported from :mod:`picpq_jax.utils`."""

from picpq_jax.utils import JsonlWriter  # noqa: F401
from picpq_jax.utils import format_table  # noqa: F401
from picpq_jax.utils import read_jsonl  # noqa: F401
from picpq_jax.utils import write_atomic  # noqa: F401
