"""The ``picpq csi`` subcommand; ``register(subparsers)`` adds it to the CLI."""

from __future__ import annotations

import argparse

from picpq_jax.csi.config import CsiConfig
from picpq_jax.options import add_config_options, config_from_args


def _run(args: argparse.Namespace) -> int:
  config = config_from_args(CsiConfig, args)
  import jax
  # On CPU, one simulated device per pipeline stage (before any array exists). Not one
  # per UE: simulated devices share the same cores, and every 'clients' device
  # computes the BTS decoder (replicated), so more of them only repeat its work.
  try:
    jax.config.update("jax_num_cpu_devices", config.stages)
  except RuntimeError:
    pass  # the backend is already up (or XLA_FLAGS set the count): use its devices
  from picpq_jax.csi.run import run_csi
  run_csi(config)
  return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
  """Adds ``csi`` to ``subparsers``; returns its parser.

  Example::

    picpq csi --arch crnet --cr 4 --ues 8 --rounds 20 --methods fedavg,split,pipeline
  """
  parser = subparsers.add_parser(
      "csi", help="federated CSI feedback: centralized, FedAvg, split (UE encoders, BTS "
      "decoder) and split with a pipelined BTS; NMSE, rho and bytes",
      description="Train a CSI autoencoder (CsiNet or CRNet) over simulated UEs with each "
      "method on the run engine (a checkpoint per round, --resume continues), report test "
      "NMSE and rho per round, exact bytes per UE, and results.json, report.md and "
      "plot.png in --workdir. Default data: generated quadriga-lib indoor CSI (cached).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_config_options(parser, CsiConfig)
  parser.set_defaults(run=_run)
  return parser
