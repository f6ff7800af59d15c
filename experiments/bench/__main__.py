"""``python -m experiments.bench``: run the benchmarks, print tables, save JSON.

Examples (from the repository root)::

  python -m experiments.bench --quick                      # seconds: all workloads, tiny
  python -m experiments.bench --workloads step --step-models resnet56 --batches 128,512
  python -m experiments.bench --workloads hrank
  python -m experiments.bench --workloads compile --compile-models resnet20,resnet56,vgg16
  python -m experiments.bench --workloads convs --conv-model resnet56
  python -m experiments.bench --workloads profile --jax-variants jax.jit+materialized
  python -m experiments.bench --workloads accuracy --jax-variants jax.jit+reduce,jax.jit+bf16
  python -m experiments.bench --workloads stages --stages-strategies map,compact

Each workload writes ``<out-dir>/<workload>.json`` (see ``common.result``). PyTorch
parts run when ``torch`` is importable, unless ``--no-torch``.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

from experiments.bench import common

WORKLOADS = ("compile", "step", "hrank", "evolution", "compact", "convs", "profile",
             "accuracy", "stages")
# what runs without --workloads: "stages" runs whole compressions (minutes even --quick)
DEFAULT_WORKLOADS = WORKLOADS[:-1]


@dataclasses.dataclass(frozen=True)
class BenchConfig:
  """Settings of every workload (full-size defaults; :func:`quick` shrinks them)."""

  warmup: int = 1
  reps: int = 5
  batches: tuple[int, ...] = (128, 512)
  use_torch: bool = True
  torch_compile: bool = True
  torch_compile_backend: str = "inductor"
  matmul_size: int = 2048
  child_timeout: float = 1800.0
  # 1 compile time
  compile_models: tuple[str, ...] = ("resnet20", "resnet56", "vgg16")
  compile_batch: int = 128
  compile_reps: int = 3
  # 2 step time
  step_models: tuple[str, ...] = ("resnet56",)
  jax_variants: tuple[str, ...] = ()
  # 3 HRank
  hrank_model: str = "resnet56"
  hrank_batches: int = 6
  hrank_batch_size: int = 128
  hrank_image_size: int = 32
  loop_reps: int = 1
  # 4 evolution
  evo_model: str = "resnet20"
  evo_children: int = 4
  evo_tau_hat: int = 2
  evo_batch: int = 64
  evo_val_size: int = 128
  evo_target: float = 0.45
  evo_strategies: tuple[str, ...] = ("unroll", "vmap", "map")
  evo_pad_to: int = 8
  # 5 compaction
  compact_model: str = "resnet56"
  compact_target: float = 0.45
  compact_pads: tuple[str, ...] = ("8",)
  compact_chunks: tuple[str, ...] = ()
  # 6 convolution parts
  conv_model: str = "resnet56"
  conv_batch: int = 128
  conv_reps: int = 7
  # 7 train-step profile
  profile_model: str = "resnet56"
  profile_batch: int = 128
  # 8 gradient accuracy
  accuracy_batch: int = 32
  # 9 stages of a compression (the README's quick start with evolution)
  stages_strategies: tuple[str, ...] = ("map", "compact")
  stages_criterion: str = "rank"
  stages_fp_batches: int = 2
  stages_population: int = 4
  stages_sample: int = 2
  stages_generations: int = 2
  stages_tau_hat: int = 2
  stages_search_val: int = 128
  stages_ft_epochs: int = 1
  stages_qat_epochs: int = 1


QUICK = dict(
    warmup=1, reps=1, batches=(8,), torch_compile_backend="aot_eager", matmul_size=256,
    compile_models=("resnet8",), compile_batch=8, compile_reps=1, step_models=("resnet8",),
    hrank_model="resnet8", hrank_batches=2, hrank_batch_size=4, hrank_image_size=8,
    evo_model="resnet8", evo_children=2, evo_tau_hat=1, evo_batch=8, evo_val_size=8,
    evo_strategies=("map",), compact_model="resnet8", conv_model="resnet8", conv_batch=8,
    conv_reps=1, profile_model="resnet8", profile_batch=8, accuracy_batch=8,
    stages_fp_batches=1, stages_population=2, stages_sample=1, stages_generations=1,
    stages_tau_hat=1, stages_search_val=16, stages_ft_epochs=0, stages_qat_epochs=0)


def _csv(kind):
  return lambda text: tuple(kind(v) for v in text.split(",") if v)


# the models of each workload that has a PyTorch side
_TWIN_FIELDS = {"compile": "compile_models", "step": "step_models", "hrank": "hrank_model",
                "evolution": "evo_model", "compact": "compact_model"}


def _check_twins(parser: argparse.ArgumentParser, cfg: BenchConfig, workloads) -> None:
  """Fails before any timing when a workload's model has no PyTorch twin."""
  from experiments.bench import torch_models
  for workload in workloads:
    field = _TWIN_FIELDS.get(workload)
    if field is None:
      continue
    value = getattr(cfg, field)
    missing = [m for m in ((value,) if isinstance(value, str) else value)
               if not torch_models.has_twin(m)]
    if missing:
      parser.error(f"--{field.replace('_', '-')}: no PyTorch twin for {', '.join(missing)} "
                   "(twins: resnet{6n+2}, vgg16); drop them or pass --no-torch")


def parse(argv: list[str]) -> tuple[BenchConfig, tuple[str, ...], Path]:
  """``(config, workloads, out_dir)`` from the command line."""
  parser = argparse.ArgumentParser(prog="python -m experiments.bench",
                                   description=__doc__.splitlines()[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter,
                                   epilog="\n".join(__doc__.splitlines()[2:]))
  parser.add_argument("--workloads", type=_csv(str), default=DEFAULT_WORKLOADS,
                      help=f"comma list of {', '.join(WORKLOADS)} (default: all but stages)")
  parser.add_argument("--quick", action="store_true",
                      help="tiny sizes, 1 rep, resnet8 (torch.compile on the aot_eager "
                           "backend, so no Inductor compile): a smoke run of every path")
  parser.add_argument("--out-dir", type=Path, default=None,
                      help="JSON folder (default experiments/bench/results, or "
                           "$TMPDIR/picpq_bench_quick with --quick)")
  parser.add_argument("--no-torch", action="store_true", help="skip every PyTorch variant")
  parser.add_argument("--no-torch-compile", action="store_true",
                      help="skip torch.compile in the step-time workload")
  types = {int: int, float: float, str: str}
  for field in dataclasses.fields(BenchConfig):
    if field.name in ("use_torch", "torch_compile"):
      continue
    flag = "--" + field.name.replace("_", "-")
    if isinstance(field.default, tuple):
      kind = int if field.name == "batches" else str
      parser.add_argument(flag, type=_csv(kind), default=None,
                          help=f"comma list (default {','.join(map(str, field.default)) or 'none'})")
    else:
      parser.add_argument(flag, type=types[type(field.default)], default=None,
                          help=f"default {field.default}")
  args = parser.parse_args(argv)
  unknown = set(args.workloads) - set(WORKLOADS)
  if unknown:
    parser.error(f"unknown workloads {sorted(unknown)}: choose from {', '.join(WORKLOADS)}")
  values = dict(QUICK) if args.quick else {}
  for field in dataclasses.fields(BenchConfig):
    given = getattr(args, field.name, None)
    if given is not None:
      values[field.name] = given
  values["use_torch"] = not args.no_torch and common.torch_available()
  values["torch_compile"] = not args.no_torch_compile
  if not values["use_torch"]:
    print("PyTorch parts skipped (--no-torch or torch not installed)", flush=True)
  else:
    _check_twins(parser, BenchConfig(**values), args.workloads)
  out_dir = args.out_dir or (Path(tempfile.gettempdir()) / "picpq_bench_quick" if args.quick
                             else Path("experiments/bench/results"))
  return BenchConfig(**values), tuple(args.workloads), out_dir


def main(argv: list[str] | None = None) -> dict[str, Path]:
  """Runs the selected workloads; returns ``{workload: JSON path}``."""
  argv = sys.argv[1:] if argv is None else list(argv)
  common.COMMAND[:] = argv
  cfg, workloads, out_dir = parse(argv)
  # Compile times are cold compiles: a persistent compilation cache (the tests set one,
  # users may) would turn them into cache loads and hide recompiles.
  import jax
  from jax.experimental.compilation_cache import compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  compilation_cache.reset_cache()  # a process that already used the cache re-checks it
  from experiments.bench import (compacted, compile_time, conv_parts, evolution,
                                 grad_accuracy, hrank, pipeline_stages, step_profile, step_time)
  modules = {"compile": compile_time, "step": step_time, "hrank": hrank,
             "evolution": evolution, "compact": compacted, "convs": conv_parts,
             "profile": step_profile, "accuracy": grad_accuracy, "stages": pipeline_stages}
  written = {}
  for name in workloads:
    result = modules[name].run(cfg)
    written[name] = common.save(result, out_dir, result["workload"])
    print(f"wrote {written[name]}", flush=True)
  return written


if __name__ == "__main__":
  main()
