"""``register`` adds ``picpq federated``; options come from FederatedConfig and bad
values end as one-line UserErrors."""

import argparse

import pytest

from picpq_jax.cli import config_from_args
from picpq_jax.errors import UserError
from picpq_jax.federated import FederatedConfig
from picpq_jax.federated.command import register


def _parser():
  parser = argparse.ArgumentParser(prog="picpq")
  register(parser.add_subparsers(dest="command", required=True))
  return parser


def test_federated_subcommand_parses_the_issue_example():
  args = _parser().parse_args(
      "federated --arch resnet20 --clients 8 --partition dirichlet --alpha 0.5 --cut 1 "
      "--rounds 3 --smashed-bits 8 --no-progress".split())
  config = config_from_args(FederatedConfig, args)
  assert (config.arch, config.clients, config.partition, config.alpha, config.cut,
          config.rounds, config.smashed_bits, config.progress) == (
              "resnet20", 8, "dirichlet", 0.5, 1, 3, 8, False)
  assert config.method_list == ("splitfed", "sequential", "fedavg", "centralized")
  assert config.run_name("splitfed") == "splitfed-8bit" and config.run_name("fedavg") == "fedavg"
  assert callable(args.run)
  args = _parser().parse_args("federated --arch vgg16 --cut 5 --methods splitfed "
                              "--client-from runs/c".split())
  config = config_from_args(FederatedConfig, args)
  assert (config.arch, config.cut, config.client_from, config.init_from) == (
      "vgg16", 5, "runs/c", "")


@pytest.mark.parametrize("flag,message", [
    ("--smashed-bits 40", "--smashed-bits=40"),
    ("--methods splitfed,gossip", "--methods="),
    ("--partition shards", "--partition="),
    ("--participation 0", "--participation="),
    ("--cut 4", "--cut="),
    ("--client-loop pmap", "--client-loop="),
])
def test_bad_options_are_user_errors(flag, message):
  args = _parser().parse_args(["federated", *flag.split()])
  with pytest.raises(UserError, match=message):
    config_from_args(FederatedConfig, args)
