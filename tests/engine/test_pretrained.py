"""The pretrained ResNet-20 that ships in the package (`--from embedded`)."""

from pathlib import Path

import jax
import numpy as np

from picpq_jax.engine import load_trained
from picpq_jax.pretrained import PRETRAINED_DIR, QUICKSTART_VAL_SIZE

BASELINE = Path(__file__).resolve().parents[2] / "experiments/baselines/checkpoints/resnet20"


def _size(path: str) -> int:
  return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def test_embedded_is_the_committed_baseline_pointing_at_embedded_data():
  packaged, baseline = load_trained("embedded"), load_trained(str(BASELINE))
  assert _size(PRETRAINED_DIR) < 1_500_000  # variables only, no optimizer state
  assert packaged.step == baseline.step
  for a, b in zip(jax.tree.leaves(packaged.variables), jax.tree.leaves(baseline.variables)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  config = packaged.meta["config"]
  assert (config["arch"], config["data"], config["val_size"]) == ("resnet20", "embedded",
                                                                  QUICKSTART_VAL_SIZE)
  assert packaged.meta["normalization"] == baseline.meta["normalization"]
  assert packaged.meta["class_names"] == baseline.meta["class_names"]
