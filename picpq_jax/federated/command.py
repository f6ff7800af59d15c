"""The ``picpq federated`` subcommand; ``register(subparsers)`` adds it to the CLI."""

from __future__ import annotations

import argparse

from picpq_jax.federated.config import FederatedConfig
from picpq_jax.options import add_config_options, config_from_args


def _run(args: argparse.Namespace) -> int:
  from picpq_jax.federated.run import run_federated
  config = config_from_args(FederatedConfig, args)
  run_federated(config)
  return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
  """Adds ``federated`` to ``subparsers`` (from ``parser.add_subparsers``); returns its parser.

  Example::

    picpq federated --arch resnet20 --clients 8 --partition dirichlet --alpha 0.5 \\
        --cut 1 --rounds 20 --methods splitfed,fedavg,centralized --smashed-bits 8
  """
  parser = subparsers.add_parser(
      "federated", help="federated split training (SplitFed, sequential server, FedAvg, "
      "centralized) over a 'clients' device mesh; report accuracy and bytes",
      description="Partition the training data over simulated clients and train each "
      "method for --rounds rounds on a 'clients' device mesh (jax.shard_map), with a "
      "checkpoint per round (--resume continues), accuracy per round, exact bytes sent "
      "up and down, and results.json, report.md and plot.png in --workdir.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_config_options(parser, FederatedConfig)
  parser.set_defaults(run=_run)
  return parser
