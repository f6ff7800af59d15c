"""The paper-scale commands in experiments/compress/paper.py parse and validate.

They cannot run here (no accelerator, no prepared tfds data), so this checks that
every option they pass exists in `picpq` and that the configs they build are valid:
a renamed or removed option would otherwise only show on the accelerator.
"""

from __future__ import annotations

import pytest

from experiments.compress import paper
from picpq_jax import cli, models
from picpq_jax.compress.config import CompressConfig
from picpq_jax.train import TrainConfig


@pytest.mark.parametrize("name", sorted(paper.CONFIGS))
def test_paper_commands_build_valid_configs(name):
  lines = paper.commands(name)
  parser = cli.build_parser()
  train = cli.config_from_args(TrainConfig, parser.parse_args(lines["train"][1:]))
  compress = cli.config_from_args(CompressConfig, parser.parse_args(lines["compress"][1:]))
  assert train.arch in models.MODELS
  assert compress.checkpoint == train.workdir  # compress starts from the baseline
  # The reference search settings (DESIGN 4), not a shrunken CPU budget.
  assert (compress.population, compress.sample, compress.generations, compress.tau_hat) == (
      64, 16, 400, 200)
