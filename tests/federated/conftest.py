"""Runs multi-device checks in a subprocess that simulates CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=N`` only takes effect before jax is
imported, so each multi-device test runs its script in a fresh interpreter.
"""

from __future__ import annotations

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run_on_devices(script: str, devices: int = 4, timeout: int = 300) -> str:
  """Runs ``script`` with ``devices`` simulated CPU devices; returns stdout, asserting "OK"."""
  env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
         "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
      proc.stdout[-2000:] + proc.stderr[-4000:])
  return proc.stdout


@pytest.fixture
def on_devices():
  return run_on_devices


def _fill(path, leaf, rng: np.random.Generator):
  """Random values of a variable's shape: BN statistics non-trivial, masks 1, 32 bits."""
  collection, last = path[0].key, path[-1].key
  if collection == "masks":
    return jnp.ones(leaf.shape, leaf.dtype)
  if collection == "quant":
    return jnp.full(leaf.shape, 32, leaf.dtype)
  if last in ("scale", "var"):
    return jnp.asarray(rng.uniform(0.5, 1.5, size=leaf.shape), leaf.dtype)
  if last == "kernel":
    scale = np.sqrt(2.0 / max(1, int(np.prod(leaf.shape[:-1]))))
    return jnp.asarray(rng.normal(size=leaf.shape) * scale, leaf.dtype)
  return jnp.asarray(rng.normal(size=leaf.shape) * 0.1, leaf.dtype)


def random_variables(model, input_shape, seed: int = 0) -> dict:
  """Variables of ``model`` on ``(1, *input_shape)`` inputs drawn with NumPy (``init``
  runs threefry under XLA, which takes long on a small CPU): ``{collection: dict}``."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0),
                            jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  filled = jax.tree_util.tree_map_with_path(lambda p, l: _fill(p, l, rng), abstract)
  return {col: dict(tree) for col, tree in filled.items()}
