"""Helpers every command shares: files, tables, pytree sizes, plotting, hosts.

Neutral ground: nothing here imports a command, so any module may import it.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Iterable, Mapping

import jax
import numpy as np


# ----------------------------------------------------------------------------- files

def write_atomic(path: str | os.PathLike, text: str) -> None:
  """Writes ``text`` to ``path`` through a temporary file and a rename."""
  path = os.fspath(path)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)


def write_json(path: str | os.PathLike, record: Any) -> None:
  """``record`` as indented JSON in ``path``, written atomically."""
  write_atomic(path, json.dumps(record, indent=2))


def read_json(path: str | os.PathLike) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
  """All records of a JSON-lines file (a last line cut short by a killed writer is
  dropped)."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  lines = [line for line in text.split("\n") if line.strip()]
  if lines and not text.endswith("\n"):
    try:
      json.loads(lines[-1])
    except ValueError:
      lines.pop()
  return [json.loads(line) for line in lines]


class JsonlWriter:
  """Appends one JSON object per line to ``path``, flushed after each write."""

  def __init__(self, path: str | os.PathLike, resume_from_step: int | None = None):
    """Opens ``path``; when resuming, drops records with ``step`` past the restored one
    (written after the checkpoint that the run resumes from); otherwise starts empty."""
    self.path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
    if resume_from_step is not None and os.path.exists(self.path):
      kept = [r for r in read_jsonl(self.path) if r.get("step", 0) <= resume_from_step]
      write_atomic(self.path, "".join(json.dumps(r) + "\n" for r in kept))
    elif resume_from_step is None and os.path.exists(self.path):
      os.remove(self.path)
    self._file = open(self.path, "a", encoding="utf-8")

  def write(self, record: dict[str, Any]) -> None:
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()

  def close(self) -> None:
    self._file.close()


# ----------------------------------------------------------------------------- tables

def format_table(rows: Iterable[tuple[str, Any]]) -> str:
  """A two-column plain-text table of ``(name, value)`` rows."""
  rows = [(str(k), _fmt(v)) for k, v in rows]
  width = max(len(k) for k, _ in rows)
  return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def _fmt(v: Any) -> str:
  if isinstance(v, float):
    return f"{v:.4f}" if abs(v) < 1000 else f"{v:,.0f}"
  if isinstance(v, int):
    return f"{v:,}"
  return str(v)


# ----------------------------------------------------------------------------- pytrees

def tree_bytes(tree: Any) -> int:
  """Raw bytes of every leaf of a pytree of arrays or ``ShapeDtypeStruct`` s."""
  return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def host_array(x: Any) -> np.ndarray:
  """A leaf as one host ``np.ndarray`` (a replicated or multi-host array gathered)."""
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    if not x.is_fully_addressable:
      if x.is_fully_replicated:
        return np.asarray(x.addressable_data(0))
      from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


# ----------------------------------------------------------------------------- plots

def figure(**kwargs) -> Any:
  """A matplotlib ``Figure`` not attached to pyplot (``Figure(**kwargs)``).

  matplotlib is imported here, when a plot is drawn, and the global backend is left
  alone (a notebook's stays what it was); ``fig.savefig(path)`` writes the PNG.
  """
  from picpq_jax.errors import UserError  # pylint: disable=import-outside-toplevel
  try:
    from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise UserError("plots need matplotlib: pip install matplotlib") from None
  return Figure(**kwargs)


def plot_rounds_and_bytes(curves: Mapping[str, tuple[list[dict], str]], path: str, key: str,
                          ylabel: str, short: str, bytes_label: str = "cumulative",
                          title: str | None = None) -> None:
  """Two panels saved to ``path``: ``key`` against the round and against cumulative MB.

  Args:
    curves: ``{legend label: (points, line style)}``; a point is a dict with
      ``"round"``, ``"cumulative_bytes"`` and ``key`` (points where it is ``None``
      are left out, a curve with none is skipped).
    ylabel: the y axis of both panels; ``short``: the metric's name in the titles.
    bytes_label: what the MB axis counts (``"MB communicated ({bytes_label}, log)"``).
    title: an optional figure title.
  """
  fig = figure(figsize=(11, 4.2))
  ax_r, ax_b = fig.subplots(1, 2)
  for label, (points, style) in curves.items():
    pts = [p for p in points if p[key] is not None]
    if not pts:
      continue
    values = [p[key] for p in pts]
    ax_r.plot([p["round"] for p in pts], values, style, marker="o", ms=3, label=label)
    ax_b.plot([max(p["cumulative_bytes"], 1) / 1e6 for p in pts], values, style, marker="o",
              ms=3, label=label)
  ax_r.set(xlabel="round", ylabel=ylabel, title=f"{short} per round")
  ax_b.set(xlabel=f"MB communicated ({bytes_label}, log)", ylabel=ylabel,
           title=f"{short} vs communication", xscale="log")
  for ax in (ax_r, ax_b):
    ax.grid(alpha=0.3)
  ax_r.legend(fontsize=8)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------- hosts

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


def _count(environ: Mapping[str, str], name: str) -> int:
  try:
    return int(environ.get(name, "1"))
  except ValueError:
    return 1


def initialize_if_multihost(environ: Mapping[str, str] | None = None) -> bool:
  """Calls ``jax.distributed.initialize`` when :func:`distributed_env` says so.

  Every ``picpq`` command calls it first, before any JAX computation. Returns True
  when this process is (now) part of a multi-host run.
  """
  if jax.distributed.is_initialized():
    return True
  kwargs = distributed_env(os.environ if environ is None else environ)
  if kwargs is None:
    return False
  jax.distributed.initialize(**kwargs)
  return True


def is_primary() -> bool:
  """Whether this process writes the files a person reads (process 0)."""
  return jax.process_index() == 0


def data_mesh() -> jax.sharding.Mesh:
  """A 1-D mesh ``("data",)`` over every device of the job (batch parallelism)."""
  return jax.sharding.Mesh(np.array(jax.devices()), ("data",))
