"""The ``picpq finetune`` subcommand; ``register(subparsers)`` adds it to the CLI."""

from __future__ import annotations

import argparse

from picpq_jax.finetune.config import FinetuneConfig
from picpq_jax.options import add_config_options, config_from_args


def _run(args: argparse.Namespace) -> int:
  from picpq_jax.finetune.run import run_finetune
  run_finetune(config_from_args(FinetuneConfig, args))
  return 0


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
  """Adds ``finetune`` to ``subparsers`` (from ``parser.add_subparsers``); returns its parser.

  Example::

    picpq finetune --method lora --k 16 --epochs 10 --rank 8 --targets 'query|value' \\
        --workdir runs/lora   # the SST-2 sample in the package; --data ../shared/data for all of it
  """
  parser = subparsers.add_parser(
      "finetune", help="memory-efficient fine-tuning of MiniLM on SST-2 (full, LoRA, BitFit, "
      "prompt, MeZO, QLoRA, federated FedIT/FedKSeed) or a small GPT on tinyshakespeare",
      description="Fine-tune the pretrained all-MiniLM-L6-v2 encoder with a classifier head "
      "on SST-2 (k examples per class) by the chosen method, or train a small GPT from "
      "scratch on tinyshakespeare; report accuracy, trainable parameters, the compiled "
      "step's memory, peak RSS, step time (and bytes per round when federated) in "
      "--workdir/results.json, with Orbax checkpoints (--resume continues).",
      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  add_config_options(parser, FinetuneConfig)
  parser.set_defaults(run=_run)
  return parser
