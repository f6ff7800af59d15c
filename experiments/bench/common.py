"""What every benchmark shares: timing, the machine's description, the matmul peak,
and the JSON result file.

A result file is one JSON object (see :func:`result`): the workload, its settings,
the machine (versions, device, CPU model), the load average at start and end (this
machine is shared, so absolute times drift; compare ratios measured within one
run), and ``rows``: one row per measured variant, each with the timing summary of
:func:`summarize` (``median_s``, ``min_s``, ``max_s``, ``reps``, ``times_s``) plus
what identifies it (model, batch, framework, ...).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np

SCHEMA_VERSION = 1
COMMAND: list[str] = []  # the benchmark's arguments, set by ``__main__.main``


def torch_available() -> bool:
  """Whether PyTorch (the optional ``torch`` extra) can be imported."""
  try:
    import torch  # noqa: F401
  except ImportError:
    return False
  return True


def _version(package: str) -> str | None:
  try:
    return metadata.version(package)
  except metadata.PackageNotFoundError:
    return None


def cpu_model() -> str:
  """The CPU's model name from /proc/cpuinfo (or ``platform.processor()``)."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or "unknown"


def environment() -> dict[str, Any]:
  """Versions (python, jax, jaxlib, flax, numpy, torch), JAX device, CPU and its
  vector extensions, the library's XLA option set, date."""
  import jax
  from picpq_jax import compile_options
  return {
      "versions": {"python": platform.python_version(), "jax": _version("jax"),
                   "jaxlib": _version("jaxlib"), "flax": _version("flax"),
                   "numpy": _version("numpy"), "torch": _version("torch")},
      "jax_device": str(jax.devices()[0]),
      "jax_backend": jax.default_backend(),
      "cpu_model": cpu_model(),
      "cpu_vector_extensions": compile_options.vector_extensions(),
      "xla_cpu_options": compile_options.selected(),
      "cpu_count": os.cpu_count(),
      "torch_threads": _torch_threads(),
      "platform": platform.platform(),
      "date": datetime.datetime.now().isoformat(timespec="seconds"),
      "command": " ".join(["python", "-m", "experiments.bench", *COMMAND]),
  }


def _torch_threads() -> int | None:
  if not torch_available():
    return None
  import torch
  return torch.get_num_threads()


def loadavg() -> list[float]:
  """``os.getloadavg()`` (1, 5, 15 minutes), rounded."""
  return [round(x, 2) for x in os.getloadavg()]


def summarize(times: list[float]) -> dict[str, Any]:
  """``{"median_s", "min_s", "max_s", "reps", "times_s"}`` of wall times in seconds."""
  if not times:
    raise ValueError("no timings to summarize")
  return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
          "reps": len(times), "times_s": [round(t, 6) for t in times]}


def measure(fn: Callable[[], Any], *, warmup: int, reps: int) -> dict[str, Any]:
  """Calls ``fn`` ``warmup`` times untimed, then ``reps`` times timed.

  ``fn`` must block until its work is done (``jax.block_until_ready``; PyTorch CPU
  ops are synchronous). Returns :func:`summarize` of the timed calls.
  """
  for _ in range(warmup):
    fn()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return summarize(times)


def matmul_peak(size: int, *, warmup: int, reps: int, use_torch: bool) -> dict[str, Any]:
  """This machine's fp32 matmul rate: ``size x size`` products by XLA and PyTorch.

  Returns ``{"size", "jax_gflops", "torch_gflops", "peak_gflops"}`` (median rates;
  ``peak_gflops`` is the higher of the two, the denominator of every utilization).
  """
  import jax
  import jax.numpy as jnp
  flops = 2.0 * size ** 3
  rng = np.random.default_rng(0)
  a = rng.standard_normal((size, size), dtype=np.float32)
  b = rng.standard_normal((size, size), dtype=np.float32)
  ja, jb = jnp.asarray(a), jnp.asarray(b)
  dot = jax.jit(jnp.dot)
  out = {"size": size,
         "jax_gflops": flops / measure(lambda: dot(ja, jb).block_until_ready(),
                                       warmup=warmup + 1, reps=reps)["median_s"] / 1e9,
         "torch_gflops": None}
  if use_torch:
    import torch
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    with torch.no_grad():
      out["torch_gflops"] = flops / measure(lambda: torch.mm(ta, tb), warmup=warmup + 1,
                                            reps=reps)["median_s"] / 1e9
  out["peak_gflops"] = max(v for v in (out["jax_gflops"], out["torch_gflops"]) if v)
  return out


def result(workload: str, config: dict[str, Any], rows: list[dict[str, Any]],
           load_start: list[float], **extra: Any) -> dict[str, Any]:
  """The JSON object of one workload's run (see the module docstring)."""
  return {"schema": SCHEMA_VERSION, "workload": workload, "config": config,
          "environment": environment(), "loadavg_start": load_start,
          "loadavg_end": loadavg(), **extra, "rows": rows}


def save(obj: dict[str, Any], out_dir: Path, name: str) -> Path:
  """Writes ``obj`` to ``out_dir/name.json`` and returns the path."""
  out_dir.mkdir(parents=True, exist_ok=True)
  path = out_dir / f"{name}.json"
  path.write_text(json.dumps(obj, indent=1, default=_jsonable) + "\n")
  return path


def _jsonable(value: Any) -> Any:
  if isinstance(value, (np.integer, np.floating)):
    return value.item()
  if isinstance(value, np.ndarray):
    return value.tolist()
  raise TypeError(f"not JSON serializable: {type(value).__name__}")


def fmt_s(seconds: float | None) -> str:
  """Seconds for a table cell: 3 significant digits."""
  if seconds is None:
    return "-"
  return f"{seconds:.3g}"


def markdown_table(title: str, header: list[str], lines: list[list[Any]]) -> str:
  """A titled markdown table (title as a level-3 heading)."""
  text = [f"### {title}\n", "| " + " | ".join(header) + " |",
          "| " + " | ".join("---" for _ in header) + " |"]
  text += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
  return "\n".join(text) + "\n"


def run_note(res: dict[str, Any]) -> str:
  """One line under a table: date, command, CPU with its vector extensions (runs
  saved before they were recorded say so), load average at start and end."""
  env = res["environment"]
  isa = env.get("cpu_vector_extensions")
  isa = ", ".join(isa) if isa is not None else "vector extensions not recorded"
  return (f"{env['date']}, `{env['command']}`, {env['cpu_model']} ({isa}; "
          f"{env['cpu_count']} CPUs), load average {res['loadavg_start'][0]} -> "
          f"{res['loadavg_end'][0]}\n")
