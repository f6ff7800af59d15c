"""The configuration of ``picpq federated``: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Any

from picpq_jax import models
from picpq_jax.errors import UserError
from picpq_jax.federated.edge import CLIENT_WEIGHTS
from picpq_jax.federated.partition import SCHEMES
from picpq_jax.federated.split import check_cut
from picpq_jax.options import check, option
from picpq_jax.train.config import SCHEDULES

METHODS = ("splitfed", "sequential", "fedavg", "centralized")
SPLIT_METHODS = ("splitfed", "sequential")
CLIENT_LOOPS = ("vmap", "unroll")


@dataclasses.dataclass(frozen=True)
class FederatedConfig:
  """Options of a federated run; ``metadata["help"]`` of each field is its ``--help``."""

  arch: str = option("resnet20", "architecture: resnet8..resnet110, vgg16, mobilenetv2 or resnet18")
  data: str = option("embedded", "'embedded', a folder or .zip of <split>/<class>/<file>, a cifar-10-batches-py folder, or tfds:NAME")
  workdir: str = option("runs/federated", "where each method's checkpoints and metrics, results.json, report.md and plot.png go", may_change=True)
  val_size: int = option(500, "images held out from the training split for validation")
  train_size: int = option(0, "train on a seeded subset of this many images (0: all the rest)")
  methods: str = option("splitfed,sequential,fedavg,centralized", "comma-separated methods: splitfed (SplitFed-V1), sequential (one server model, clients in turn), fedavg, centralized", may_change=True)
  clients: int = option(8, "number of simulated clients")
  partition: str = option("iid", "how the training images are split over clients: iid, dirichlet or classes")
  alpha: float = option(0.5, "Dirichlet concentration over labels (--partition dirichlet)")
  classes_per_client: int = option(2, "classes each client holds (--partition classes)")
  min_client_size: int = option(10, "smallest client a Dirichlet draw may produce")
  participation: float = option(1.0, "fraction of clients (seeded sample) taking part in each round")
  cut: int = option(1, "split point, after piece k: CIFAR ResNets 0 (stem) or 1..3 (stage k); resnet18 0..4; vgg16 1..5 (conv group k with its pool); mobilenetv2 0 (stem) or 1..7 (stage k)")
  rounds: int = option(10, "communication rounds", may_change=True)
  local_steps: int = option(10, "local SGD steps per client and round (E); averaging every E steps")
  batch_size: int = option(32, "batch size of each client (centralized: this times the clients per round)")
  lr: float = option(0.05, "peak learning rate")
  schedule: str = option("cosine", "learning-rate schedule over all local steps: multistep, cosine or constant")
  momentum: float = option(0.9, "Nesterov momentum")
  weight_decay: float = option(5e-4, "L2 weight decay added to the gradients")
  sync_optimizer: bool = option(False, "average the clients' momentum with their models (sent both ways; counted) instead of restarting it each round")
  smashed_bits: int = option(32, "bits per value of the smashed data and its gradient: 32 = float32, 2..16 = uniform quantization")
  client_from: str = option("", "a `picpq compress` workdir: split the PIC-PQ model (its plan's masks and bit-widths, its quantizer, its newest weights) so the client runs the pruned, low-bit front; split methods only")
  client_weights: str = option("newest", "which weights of --client-from start the run: newest (qat/, else finetune/, else the compressed checkpoint with pruned weights zeroed), qat, finetune or checkpoint")
  init_from: str = option("", "start every method from this `picpq train` workdir's weights instead of a random initialization")
  devices: int = option(0, "devices on the 'clients' mesh axis (0: the most that divide the clients per round)", may_change=True)
  client_loop: str = option("vmap", "how a device runs several clients: vmap, or unroll (one after another in one program; faster on CPU)", may_change=True)
  eval_every: int = option(1, "evaluate every N rounds (and after the last)", may_change=True)
  seed: int = option(0, "seed of the split, partition, participation, shuffling, augmentation and initialization")
  keep_checkpoints: int = option(2, "how many recent round checkpoints to keep per method", may_change=True)
  resume: bool = option(False, "continue each method from its newest checkpoint in workdir", may_change=True)
  cache_dir: str | None = option(None, "cache of decoded images (default $PICPQ_CACHE or ~/.cache/picpq_jax)", may_change=True)
  progress: bool = option(True, "show a progress bar", may_change=True)
  plot: bool = option(True, "write plot.png (needs matplotlib)", may_change=True)

  def __post_init__(self):
    check(self.val_size >= 0, "val_size", self.val_size, "an integer >= 0")
    check(self.train_size >= 0, "train_size", self.train_size, "an integer >= 0 (0: all)")
    for m in self.method_list:
      check(m in METHODS, "methods", self.methods, f"a comma-separated subset of {','.join(METHODS)}")
    check(len(set(self.method_list)) == len(self.method_list) and self.method_list, "methods",
           self.methods, "each method once, at least one")
    check(1 <= self.clients <= 100_000, "clients", self.clients, "1..100000")
    check(self.partition in SCHEMES, "partition", self.partition, " or ".join(SCHEMES))
    check(self.alpha > 0, "alpha", self.alpha, "a concentration > 0")
    check(self.classes_per_client >= 1, "classes_per_client", self.classes_per_client, "an integer >= 1")
    check(self.min_client_size >= 1, "min_client_size", self.min_client_size, "an integer >= 1")
    check(0.0 < self.participation <= 1.0, "participation", self.participation, "(0, 1]")
    if any(m in SPLIT_METHODS for m in self.method_list) and self.arch in models.MODELS:
      check_cut(self.arch, models.get_model(self.arch), self.cut)
    check(self.client_weights in CLIENT_WEIGHTS, "client_weights", self.client_weights,
          " or ".join(CLIENT_WEIGHTS))
    if self.client_from and self.init_from:
      raise UserError("--client-from and --init-from both give starting weights: pass one")
    if self.client_from and any(m not in SPLIT_METHODS for m in self.method_list):
      raise UserError(f"--client-from compresses the split client, so --methods must be "
                      f"split methods ({','.join(SPLIT_METHODS)}), not {self.methods!r}: run "
                      f"the others without --client-from")
    check(1 <= self.rounds <= 100_000, "rounds", self.rounds, "1..100000")
    check(1 <= self.local_steps <= 100_000, "local_steps", self.local_steps, "1..100000")
    check(1 <= self.batch_size <= 65_536, "batch_size", self.batch_size, "1..65536")
    check(0.0 < self.lr <= 10.0, "lr", self.lr, "(0, 10]")
    check(self.schedule in SCHEDULES, "schedule", self.schedule, " or ".join(SCHEDULES))
    check(0.0 <= self.momentum < 1.0, "momentum", self.momentum, "[0, 1)")
    check(0.0 <= self.weight_decay < 1.0, "weight_decay", self.weight_decay, "[0, 1)")
    check(self.smashed_bits == 32 or 2 <= self.smashed_bits <= 16, "smashed_bits",
           self.smashed_bits, "32 (no quantization) or 2..16")
    check(self.devices >= 0, "devices", self.devices, "0 (automatic) or a device count")
    check(self.client_loop in CLIENT_LOOPS, "client_loop", self.client_loop, " or ".join(CLIENT_LOOPS))
    check(self.eval_every >= 1, "eval_every", self.eval_every, "an integer >= 1")
    check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
    check(self.keep_checkpoints >= 1, "keep_checkpoints", self.keep_checkpoints, "an integer >= 1")

  @property
  def method_list(self) -> tuple[str, ...]:
    """``methods`` as a tuple of names."""
    return tuple(m.strip() for m in self.methods.split(",") if m.strip())

  def run_name(self, method: str) -> str:
    """The folder and label of a method's run: ``splitfed``, ``splitfed-8bit``,
    ``splitfed-picpq-4bit`` (``--client-from``), ..."""
    if method not in SPLIT_METHODS:
      return method
    return (method + ("-picpq" if self.client_from else "")
            + (f"-{self.smashed_bits}bit" if self.smashed_bits < 32 else ""))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

