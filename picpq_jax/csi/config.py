"""The configuration of ``picpq csi``: one frozen dataclass, validated on construction."""

from __future__ import annotations

import dataclasses
from typing import Any

from picpq_jax.errors import UserError
from picpq_jax.options import check, option


METHODS = ("centralized", "fedavg", "split", "pipeline")
SPLIT_METHODS = ("split", "pipeline")
CSI_SCHEDULES = ("constant", "cosine")


@dataclasses.dataclass(frozen=True)
class CsiConfig:
  """Options of a CSI feedback run; ``metadata["help"]`` of each field is its ``--help``."""

  arch: str = option("csinet", "CSI autoencoder: csinet or crnet")
  cr: int = option(16, "compression ratio: codeword M = 2048 / CR values (4, 8, 16, 32, 64)")
  data: str = option("quadriga", "'quadriga' (generated TGn indoor CSI, one scenario per UE, cached) or a CsiNet .mat file with 'HT' [N, 2048] split evenly over the UEs")
  workdir: str = option("runs/csi", "where each method's checkpoints and metrics, results.json, report.md and plot.png go", may_change=True)
  methods: str = option("centralized,fedavg,split,pipeline", "comma-separated methods: centralized, fedavg, split (own encoders, shared BTS decoder), pipeline (split with the BTS decoder pipelined over --stages devices)", may_change=True)
  ues: int = option(4, "number of UEs")
  samples_per_ue: int = option(80, "CSI samples per UE (quadriga: generated; .mat: taken from the file)")
  test_per_ue: int = option(16, "of each UE's samples, the last this many are its held-out test set")
  stages: int = option(2, "pipeline stages of the BTS decoder (devices on the 'stages' mesh axis; at most the decoder's 4 pieces)")
  rounds: int = option(4, "communication rounds", may_change=True)
  local_steps: int = option(4, "local steps per UE and round (E)")
  batch_size: int = option(16, "batch size of each UE (centralized: this times the UEs)")
  lr: float = option(1e-3, "Adam learning rate (cosine: the peak)")
  schedule: str = option("constant", "learning-rate schedule over all local steps: constant (CsiNet's reference) or cosine (CRNet's reference: linear warm-up from 0 over --warmup-rounds, then cosine decay to --end-lr at the last of --rounds)")
  warmup_rounds: int = option(0, "cosine: rounds of linear warm-up")
  end_lr: float = option(0.0, "cosine: the learning rate at the end (CRNet's reference: 5e-5 from a peak of 2e-3)")
  bits: int = option(32, "bits per codeword value on the uplink: 32 = float32, 2..16 = uniform quantization")
  target_bits: int = option(32, "bits per value of the training CSI a UE uploads with its codewords (split methods) or once (centralized)")
  encoder_sync: int = option(0, "split methods: average the UEs' encoders every N rounds (0: never, each UE keeps its own)")
  ue_bits: str = option("", "after training, quantize each split method's UE encoders with LSQ (weight bits per layer kind, e.g. 'conv=8,dense=2', or one number for both; activations stay float), fine-tune each through the frozen BTS decoder, and report cost and NMSE; empty: off")
  ue_finetune_steps: int = option(50, "--ue-bits: fine-tune steps per UE encoder (batch --batch-size, Adam --lr); 0: post-training quantization only")
  eval_every: int = option(1, "evaluate NMSE and rho every N rounds (and after the last)", may_change=True)
  seed: int = option(0, "seed of the data, batches and initialization")
  keep_checkpoints: int = option(2, "how many recent round checkpoints to keep per method", may_change=True)
  resume: bool = option(False, "continue each method from its newest checkpoint in workdir", may_change=True)
  cache_dir: str | None = option(None, "cache of generated CSI (default $PICPQ_CACHE or ~/.cache/picpq_jax)", may_change=True)
  workers: int = option(0, "processes generating quadriga CSI (0: the CPU count, at most 8)", may_change=True)
  progress: bool = option(True, "show progress bars", may_change=True)
  plot: bool = option(True, "write plot.png (needs matplotlib)", may_change=True)

  def __post_init__(self):
    for name in ("ues", "rounds", "local_steps", "batch_size", "stages", "eval_every",
                 "keep_checkpoints"):
      check(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
    check(self.seed >= 0 and self.encoder_sync >= 0 and self.workers >= 0, "seed", self.seed,
          "integers >= 0 for --seed, --encoder-sync and --workers")
    check(self.lr > 0, "lr", self.lr, "a positive number")
    check(self.schedule in CSI_SCHEDULES, "schedule", self.schedule, " or ".join(CSI_SCHEDULES))
    check(0 <= self.end_lr < self.lr, "end_lr", self.end_lr, f"a number in [0, --lr={self.lr})")
    check(0 <= self.warmup_rounds < self.rounds, "warmup_rounds", self.warmup_rounds,
          f"an integer in 0..{self.rounds - 1} (fewer than --rounds)")
    for name in ("bits", "target_bits"):
      v = getattr(self, name)
      check(2 <= v <= 16 or v == 32, name, v, "32 (float32) or 2..16")
    check(1 <= self.test_per_ue < self.samples_per_ue, "test_per_ue", self.test_per_ue,
          f"1..{self.samples_per_ue - 1} (fewer than --samples-per-ue)")
    check(self.ue_finetune_steps >= 0, "ue_finetune_steps", self.ue_finetune_steps,
          "an integer >= 0")
    if self.ue_bit_widths and not set(self.method_list) & set(SPLIT_METHODS):
      raise UserError(f"--ue-bits quantizes the split methods' UE encoders, but --methods="
                      f"{self.methods!r} has none: add split or pipeline to --methods")
    unknown = [m for m in self.method_list if m not in METHODS]
    if unknown or not self.method_list:
      raise UserError(f"--methods={self.methods!r}: unknown {', '.join(unknown) or 'empty'}; "
                      f"choose from {', '.join(METHODS)}")

  @property
  def method_list(self) -> tuple[str, ...]:
    """``methods`` as a tuple of names."""
    return tuple(m.strip() for m in self.methods.split(",") if m.strip())

  @property
  def ue_bit_widths(self) -> dict[str, int] | None:
    """``ue_bits`` as ``{"conv": bits, "dense": bits}``, or None when empty."""
    if not self.ue_bits.strip():
      return None
    fix = "use e.g. --ue-bits conv=8,dense=2 or --ue-bits 8 (bits 2..16)"
    items = [i.strip() for i in self.ue_bits.split(",")]
    try:
      if len(items) == 1 and "=" not in items[0]:
        widths = dict.fromkeys(("conv", "dense"), int(items[0]))
      else:
        widths = {k.strip(): int(v) for k, v in (i.split("=") for i in items)}
    except ValueError:
      raise UserError(f"--ue-bits={self.ue_bits!r} is not 'conv=N,dense=N' or 'N': {fix}") from None
    if set(widths) != {"conv", "dense"} or not all(2 <= b <= 16 for b in widths.values()):
      raise UserError(f"--ue-bits={self.ue_bits!r} needs conv and dense bits in 2..16: {fix}")
    return widths

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)
