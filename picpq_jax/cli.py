"""The ``picpq`` command.

Each subcommand's options are generated from its frozen config dataclass, so the
``--help`` text, the defaults and the validation live in one place. Bad input ends
with one ``picpq: error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
import typing
from typing import Sequence

from picpq_jax.errors import UserError
from picpq_jax.options import add_config_options, config_from_args


class _Parser(argparse.ArgumentParser):
  """argparse, but a usage error is one line that points at ``--help``."""

  def error(self, message: str) -> typing.NoReturn:
    self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _cmd_train(args: argparse.Namespace) -> int:
  from picpq_jax.train import TrainConfig, train_and_evaluate  # jax loads only when needed
  train_and_evaluate(config_from_args(TrainConfig, args))
  return 0


def _cmd_compress(args: argparse.Namespace) -> int:
  from picpq_jax.compress.config import CompressConfig
  from picpq_jax.compress.pipeline import run_compress
  run_compress(config_from_args(CompressConfig, args))
  return 0


def _cmd_models(args: argparse.Namespace) -> int:
  del args
  import jax
  from picpq_jax import models
  from picpq_jax.utils import format_table
  rows = []
  for name, spec in sorted(models.MODELS.items()):
    model = spec.build(num_classes=spec.num_classes)
    params = jax.eval_shape(model.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, *spec.input_shape), "float32"))["params"]
    macs = models.model_structure(model, spec.input_shape).macs
    rows.append((name, f"input {spec.input_shape}, {models.param_count(params) / 1e6:.2f}M "
                       f"params, {macs / 1e6:.1f}M MACs"))
  print(format_table(rows))
  return 0


def build_parser() -> argparse.ArgumentParser:
  """The parser with all subcommands."""
  from picpq_jax.train.config import TrainConfig
  parser = _Parser(prog="picpq", description="Compress, train and fine-tune neural "
                   "networks for edge devices with JAX (picpq-jax).")
  commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                   parser_class=_Parser)
  train = commands.add_parser(
      "train", help="train a model; evaluate, checkpoint and print a results table",
      description="Train a model with SGD (Nesterov), evaluating each epoch on a held-out "
      "split, saving Orbax checkpoints and metrics.jsonl in --workdir.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_config_options(train, TrainConfig)
  train.set_defaults(run=_cmd_train)
  from picpq_jax.compress.config import CompressConfig
  compress = commands.add_parser(
      "compress", help="PIC-PQ: prune to a budget and quantize a trained model; write a report",
      description="Run the PIC-PQ pipeline on a `picpq train` checkpoint: filter property, "
      "evolution of (a, b), pruning to the target, bit assignment, full-precision and "
      "quantization-aware fine-tuning, and a report (JSON, markdown, PNG plots) in --workdir.",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_config_options(compress, CompressConfig)
  compress.set_defaults(run=_cmd_compress)
  from picpq_jax.federated.command import register as register_federated
  register_federated(commands)
  from picpq_jax.finetune.command import register as register_finetune
  register_finetune(commands)
  from picpq_jax.deploy.command import register as register_deploy
  register_deploy(commands)
  from picpq_jax.csi.command import register as register_csi
  register_csi(commands)
  listing = commands.add_parser("models", help="list the architectures with params and MACs")
  listing.set_defaults(run=_cmd_models)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  """Entry point of the ``picpq`` console script; returns the exit code.

  Every command starts the same way: ``jax.distributed`` is initialized when the
  environment names several hosts, and SIGINT/SIGTERM are caught so that a run saves
  its last finished state, prints one line and exits (130 or 143).
  """
  parser = build_parser()
  args = parser.parse_args(argv)
  from picpq_jax import engine  # pylint: disable=import-outside-toplevel  (loads jax)
  from picpq_jax.utils import initialize_if_multihost  # pylint: disable=import-outside-toplevel
  try:
    with engine.catching_signals():
      initialize_if_multihost()  # before any array exists
      return args.run(args)
  except UserError as e:
    print(f"picpq: error: {e}", file=sys.stderr)
    return 2
  except engine.Interrupted as e:
    return e.exit_code
  except KeyboardInterrupt:
    return 130


if __name__ == "__main__":
  sys.exit(main())
