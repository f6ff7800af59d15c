"""Runs multi-device checks in a subprocess that simulates CPU devices.

``XLA_FLAGS=--xla_force_host_platform_device_count=N`` only takes effect before jax is
imported, so each multi-device test runs its script in a fresh interpreter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

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
