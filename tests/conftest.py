"""Shared test fixtures: where the real data lives, and a per-session decode cache."""

import os
from pathlib import Path

import pytest

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
