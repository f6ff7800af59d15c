"""The configuration of ``picpq compress`` (reference settings as defaults)."""

from __future__ import annotations

import dataclasses
from typing import Any

from picpq_jax.compress.cost_model import METRICS
from picpq_jax.compress.quantizers import QUANTIZERS
from picpq_jax.compress.search import SearchConfig
from picpq_jax.errors import UserError
from picpq_jax.options import check, option

CRITERIA = ("rank", "l1", "l2", "bn_gamma")

# The stages of `picpq compress`, in order, with the fields each one's saved result
# depends on (besides every earlier stage's): --resume with one of them changed is
# refused, or reruns from the first affected stage with --restart-from. The fields in
# no stage (workdir, resume, restart_from, progress) may change.
STAGE_FIELDS = {
    "baseline": ("checkpoint", "data", "val_size", "batch_size"),
    "filter_property": ("criterion", "fp_point", "fp_batches", "fp_batch_size", "seed"),
    "genes": ("evolution", "population", "sample", "generations", "children", "tau_hat",
              "mutation_rate", "search_val_size", "strategy", "target", "metric", "safeguard",
              "min_channels", "lr", "weight_decay", "identity_seed", "sampling", "returns",
              "search_optimizer"),
    "plan": ("allocation", "uniform_bits", "penalty", "max_bits", "act_quant"),
    "finetune": ("ft_epochs",),
    "qat": ("quantizer", "qat_epochs"),
}
STAGES = tuple(STAGE_FIELDS)
ALLOCATIONS = ("global", "uniform")
FP_POINTS = {"conv": "conv", "relu": "activation"}  # --fp-point -> criteria's ``point``
ACT_QUANT = ("inner", "every-conv")
SEARCH_OPTIMIZERS = ("momentum", "nesterov")

# The reference's choice (fanxxxxyi/PIC-PQ b0b46b8) of every option that has one
# here; report.md names each option of a run that differs. Sizes (population,
# generations, tau_hat, epochs, search split) are scale, listed too.
REFERENCE = {
    "criterion": "rank", "fp_point": "conv", "act_quant": "inner", "identity_seed": True,
    "sampling": "replace", "returns": "best-ever", "search_optimizer": "momentum",
    "population": 64, "sample": 16, "generations": 400, "tau_hat": 200,
    "mutation_rate": 0.1, "search_val_size": 5000, "ft_epochs": 30, "qat_epochs": 30,
    "penalty": 1 / 6, "lr": 0.01, "allocation": "global", "evolution": True,
}


@dataclasses.dataclass(frozen=True)
class CompressConfig:
  """Options of the PIC-PQ pipeline; ``metadata["help"]`` of each field is its ``--help``."""

  checkpoint: str = option("embedded", "workdir (or checkpoints folder) of the `picpq train` run to compress; 'embedded': the pretrained CIFAR-10 ResNet-20 that ships in the package", flags=("--from",))
  workdir: str = option("runs/compress", "where every stage's output, checkpoints and the report go", may_change=True)
  data: str = option("", "training data (default: the data the checkpoint was trained on, same validation split)")
  val_size: int | None = option(None, "validation images carved from the training data (default: the checkpoint's val_size, i.e. its own validation split); nothing is chosen on them, they are reported")
  target: float = option(0.45, "fraction of the metric to keep after pruning (0.45 removes 55% of FLOPs)")
  metric: str = option("flops", "budget metric: flops (MACs), params or bops")
  allocation: str = option("global", "how pruning and bits are spread: global (PIC: all channels ranked together, bits from each layer's sparsity) or uniform (the baseline: every group keeps the same fraction, every quantized conv gets --uniform-bits)")
  uniform_bits: int = option(4, "bit-width of every quantized conv with --allocation uniform")
  safeguard: float = option(0.1, "fraction of each channel group always kept")
  min_channels: int = option(2, "channels each group always keeps, at least")
  criterion: str = option("rank", "filter property: rank (HRank feature-map rank), l1, l2 or bn_gamma")
  fp_point: str = option("conv", "feature map the rank is taken of: conv (the raw conv output, before BN; the reference) or relu (HRank's post-activation map; a block's second conv: after the residual add)")
  fp_batches: int = option(6, "training batches the filter property is averaged over")
  fp_batch_size: int = option(128, "batch size of the filter-property batches")
  evolution: bool = option(True, "learn (a, b) by regularized evolution; --no-evolution uses a=1, b=0")
  population: int = option(64, "members of the evolving population")
  sample: int = option(16, "tournament sample size")
  generations: int = option(400, "generations of regularized evolution")
  children: int = option(1, "children evaluated per generation (in one compiled program)")
  tau_hat: int = option(200, "SGD steps of masked fine-tuning per fitness evaluation")
  mutation_rate: float = option(0.1, "fraction of layers a child mutates")
  search_val_size: int = option(5000, "images carved from the training data (the search split, never trained on) that score a candidate; at most a fifth of the training data (reference 5000)")
  identity_seed: bool = option(True, "member 0 of the initial population is a=1, b=0 (reference)")
  sampling: str = option("replace", "tournament members and mutated layers drawn with replacement (replace, reference) or distinct")
  returns: str = option("best-ever", "genes the search returns: best-ever (reference) or final (fittest of the final population)")
  search_optimizer: str = option("momentum", "SGD of the candidates' tau_hat steps: momentum (reference) or nesterov")
  strategy: str = option("auto", "how candidates are evaluated: auto (by measurement: map on accelerators; on CPU unroll up to tau_hat 8, compact above), map (scan loops), unroll (straight-line; compile grows with tau_hat), vmap, or compact (one by one at the pruned size, widths padded to multiples of 8, programs cached by width)")
  act_quant: str = option("inner", "which activations are quantized: inner (each basic block's conv2 input only, at its conv1's bits; block inputs and the residual stream stay float; reference) or every-conv (every quantized conv's input at its own bits)")
  penalty: float = option(1 / 6, "bit penalty: bits = max_bits - ceil(penalty / sparsity)")
  max_bits: str = option("reference", "per-conv maximum bits: 'reference' or a list like 32,8x18,6x18,4x18")
  quantizer: str = option("dorefa", "quantization-aware fine-tuning quantizer: dorefa, lsq or pact")
  ft_epochs: int = option(30, "full-precision fine-tuning epochs after pruning")
  qat_epochs: int = option(30, "quantization-aware fine-tuning epochs")
  lr: float = option(0.01, "fine-tuning learning rate (multi-step x0.2 at 30/60/80%)")
  batch_size: int = option(128, "fine-tuning batch size")
  weight_decay: float = option(5e-4, "fine-tuning weight decay")
  seed: int = option(0, "seed of the search and the fine-tuning")
  resume: bool = option(False, "continue a stopped run in workdir (finished stages are kept)", may_change=True)
  restart_from: str = option("", "with --resume: redo this stage and every later one (baseline, filter_property, genes, plan, finetune or qat), e.g. after changing an option it depends on", may_change=True)
  progress: bool = option(True, "show progress bars", may_change=True)

  def __post_init__(self):
    if not self.checkpoint:
      raise UserError("--from is required: pass the workdir of a `picpq train` run")
    check(self.val_size is None or self.val_size >= 0, "val_size", self.val_size,
          "an integer >= 0, or leave it out for the checkpoint's")
    check(0.0 < self.target <= 1.0, "target", self.target, "(0, 1]")
    check(self.metric in METRICS, "metric", self.metric, " or ".join(METRICS))
    check(self.allocation in ALLOCATIONS, "allocation", self.allocation, " or ".join(ALLOCATIONS))
    check(1 <= self.uniform_bits <= 31, "uniform_bits", self.uniform_bits, "1..31")
    if self.allocation == "uniform" and self.evolution:
      raise UserError("--allocation uniform keeps the same fraction of every group, so there "
                      "are no (a, b) to learn: add --no-evolution")
    check(0.0 <= self.safeguard <= 1.0, "safeguard", self.safeguard, "[0, 1]")
    check(self.min_channels >= 1, "min_channels", self.min_channels, "an integer >= 1")
    check(self.criterion in CRITERIA, "criterion", self.criterion, " or ".join(CRITERIA))
    check(self.fp_point in FP_POINTS, "fp_point", self.fp_point, " or ".join(FP_POINTS))
    check(self.act_quant in ACT_QUANT, "act_quant", self.act_quant, " or ".join(ACT_QUANT))
    check(self.search_optimizer in SEARCH_OPTIMIZERS, "search_optimizer",
          self.search_optimizer, " or ".join(SEARCH_OPTIMIZERS))
    check(self.fp_batches >= 1, "fp_batches", self.fp_batches, "an integer >= 1")
    check(self.fp_batch_size >= 1, "fp_batch_size", self.fp_batch_size, "an integer >= 1")
    check(self.penalty >= 0.0, "penalty", self.penalty, "a number >= 0")
    check(self.quantizer in QUANTIZERS, "quantizer", self.quantizer, " or ".join(QUANTIZERS))
    check(self.ft_epochs >= 0, "ft_epochs", self.ft_epochs, "an integer >= 0")
    check(self.qat_epochs >= 0, "qat_epochs", self.qat_epochs, "an integer >= 0")
    check(0.0 < self.lr <= 10.0, "lr", self.lr, "(0, 10]")
    check(self.batch_size >= 1, "batch_size", self.batch_size, "an integer >= 1")
    check(self.seed >= 0, "seed", self.seed, "an integer >= 0")
    check(self.restart_from in ("", *STAGES), "restart_from", self.restart_from,
          " or ".join(STAGES))
    check(self.sample <= self.population, "sample", self.sample,
          f"1..population ({self.population})")
    self.search_config()  # validates the evolution settings
    parse_max_bits(self.max_bits)

  def search_config(self) -> SearchConfig:
    return SearchConfig(
        population=self.population, sample=self.sample, generations=self.generations,
        children=self.children, tau_hat=self.tau_hat, mutation_rate=self.mutation_rate,
        search_batch_size=self.batch_size, search_val_size=self.search_val_size,
        strategy=self.strategy, identity_seed=self.identity_seed, sampling=self.sampling,
        returns=self.returns)

  def deviations(self) -> dict[str, tuple[Any, Any]]:
    """``{option: (this run's value, the reference's)}`` where they differ."""
    return {k: (getattr(self, k), v) for k, v in REFERENCE.items() if getattr(self, k) != v}

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def parse_max_bits(text: str) -> tuple[int, ...] | None:
  """``"reference"`` -> None; ``"32,8x18,6x2"`` -> ``(32, 8, ..., 6, 6)``."""
  if text == "reference":
    return None
  bits = []
  try:
    for part in text.split(","):
      value, _, count = part.strip().partition("x")
      bits += [int(value)] * (int(count) if count else 1)
  except ValueError:
    raise UserError(f"--max-bits={text!r} is not a list like 32,8x18,6x18,4x18 or "
                    f"'reference'") from None
  if not all(1 <= b <= 32 for b in bits):
    raise UserError(f"--max-bits={text!r}: every entry must lie in 1..32")
  return tuple(bits)

