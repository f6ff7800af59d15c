"""Shared test fixtures: where the real data lives, and a per-session decode cache."""

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

# One persistent XLA compilation cache for the whole session, set before jax is first
# imported and inherited by the CLI subprocesses the tests start (SIGTERM/kill -9 and
# multi-device checks): a program the suite compiled once is loaded, not compiled
# again, in later tests and in subprocesses. Cached executables are the compiled ones,
# so numerics do not change; tests that count compilations count traces, or JAX's
# backend_compile events, which a load from the cache reports too (checked with jax
# 0.10.2). An explicit JAX_COMPILATION_CACHE_DIR is respected.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  _XLA_CACHE = tempfile.mkdtemp(prefix="picpq-jax-tests-xla-cache-")
  atexit.register(shutil.rmtree, _XLA_CACHE, ignore_errors=True)
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _XLA_CACHE
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

# ../shared beside the repository root (CI and developer machines have it).
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CIFAR10_ZIP = SHARED_DATA / "cifar10" / "train.zip"


def require(path: Path) -> Path:
  """Skips the calling test, with the reason, when ``path`` is absent."""
  if not path.exists():
    pytest.skip(f"real data not found at {path} (it lives in ../shared/data beside the repo)")
  return path


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> str:
  """Decode cache for the session: $PICPQ_CACHE when set (CI), else a temporary folder."""
  return os.environ.get("PICPQ_CACHE") or str(tmp_path_factory.mktemp("picpq_cache"))
