"""Memory of a compiled step and of the process, as measured numbers.

:func:`compiled_memory` reads XLA's buffer assignment of a jitted function for given
arguments (``lowered.compile().memory_analysis()``): bytes of the arguments, the
outputs, the temporaries (activations, gradients, optimizer intermediates) and the
outputs aliased onto donated arguments. The program's peak is at most
``argument + output + temp - alias`` bytes; that bound is what is reported as
``peak_bytes``. It needs no run, only a compile, and is the same on every host with
the same backend. :func:`peak_rss_bytes` is the process's high-water mark of
resident memory (``getrusage``), which also counts the Python runtime, XLA's
compiler and every buffer alive at once.
"""

from __future__ import annotations

import resource
import sys
from typing import Any, Callable

import jax


def memory_of(compiled: Any) -> dict[str, int | None]:
  """The buffer sizes of an already compiled executable (``jit(f).lower(...).
  compile()``), so a step that is run anyway is not compiled twice.

  Returns:
    ``{"argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
    "generated_code_bytes", "peak_bytes"}``; all ``None`` when the backend gives no
    analysis.
  """
  stats = compiled.memory_analysis()
  names = ("argument", "output", "temp", "alias", "generated_code")
  if stats is None:
    return {**{f"{n}_bytes": None for n in names}, "peak_bytes": None}
  out = {f"{n}_bytes": int(getattr(stats, f"{n}_size_in_bytes")) for n in names}
  out["peak_bytes"] = (out["argument_bytes"] + out["output_bytes"] + out["temp_bytes"]
                       - out["alias_bytes"])
  return out


def compiled_memory(fn: Callable, *args: Any, **kwargs: Any) -> dict[str, int | None]:
  """Bytes that XLA assigns to ``fn`` compiled for ``args`` (:func:`memory_of`).

  Args:
    fn: a jitted function (anything with ``.lower``) or a plain one (jitted here,
      without donation).
    *args, **kwargs: arrays or ``jax.ShapeDtypeStruct`` s, as for ``fn.lower``.
  """
  lowered = (fn if hasattr(fn, "lower") else jax.jit(fn)).lower(*args, **kwargs)
  return memory_of(lowered.compile())


def peak_rss_bytes() -> int:
  """The process's peak resident set size in bytes (``ru_maxrss``: KiB on Linux,
  bytes on macOS)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(peak if sys.platform == "darwin" else peak * 1024)
