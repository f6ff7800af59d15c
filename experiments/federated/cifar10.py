"""CPU-scale federated split training on the shared CIFAR-10: SplitFed vs FedAvg vs centralized.

8 simulated clients (8 simulated CPU devices, one client each), IID and Dirichlet(0.5)
label skew, ResNet-8 cut after stage 1, a fixed budget of rounds; SplitFed-V1 and the
sequential-server variant with float32, 8-bit and 4-bit smashed data (SplitFed-V1)
or float32 only (sequential), FedAvg, and centralized training on the union of the
data (partition-independent, run once). Command (from the repo root):

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        .venv/bin/python -m experiments.federated.cifar10

writes ``experiments/federated/results/cifar10.{json,md,png}`` and keeps each
invocation's runs (Orbax checkpoints per round, metrics.jsonl, report.md, plot.png) in
``runs/federated/cifar10/<partition>-<bits>bit``; rerunning resumes them. ``--quick``
runs two rounds on the bundled 5,000-image subset instead, to check the script.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

# One simulated CPU device per client, unless the caller chose (must precede jax's import).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

from experiments.federated.common import (RESULTS, ROOT, SHARED_ZIP, provenance,  # pylint: disable=wrong-import-position
                                          write_results)
from picpq_jax.federated import FederatedConfig, run_federated  # pylint: disable=wrong-import-position
from picpq_jax.federated.report import histogram_rows  # pylint: disable=wrong-import-position

# (partition, methods, smashed bits): one `run_federated` call each.
PLAN = (
    ("iid", "centralized,fedavg,splitfed,sequential", 32),
    ("iid", "splitfed", 8),
    ("iid", "splitfed", 4),
    ("dirichlet", "fedavg,splitfed,sequential", 32),
    ("dirichlet", "splitfed", 8),
    ("dirichlet", "splitfed", 4),
)


def get_config(partition: str, methods: str, bits: int, quick: bool, rounds: int,
               local_steps: int) -> FederatedConfig:
  """The CPU-scale recipe: ResNet-8, 8 clients, batch 32 per client, cut after stage 1."""
  common = dict(arch="resnet8", clients=8, partition=partition, alpha=0.5, cut=1,
                methods=methods, smashed_bits=bits, batch_size=32, lr=0.05,
                schedule="cosine", momentum=0.9, weight_decay=5e-4, seed=0, resume=True,
                client_loop="vmap", progress=False)
  if quick:
    return FederatedConfig(data="embedded", val_size=500, rounds=2, local_steps=2,
                           workdir=f"runs/federated/cifar10-quick/{partition}-{bits}bit",
                           **common)
  return FederatedConfig(data=str(SHARED_ZIP), val_size=5000, rounds=rounds,
                         local_steps=local_steps,
                         workdir=f"runs/federated/cifar10/{partition}-{bits}bit", **common)


def _row(partition: str, name: str, s: dict) -> str:
  acc = lambda a: "-" if a is None else f"{a:.4f}"
  saving = (f"{s['fp32_total_bytes'] / s['total_bytes']:.2f}x" if s["total_bytes"]
            and s["fp32_total_bytes"] != s["total_bytes"] else "-")
  return (f"| {partition} | {s['label']} | {s['smashed_bits'] or '-'} | {acc(s['final_val_accuracy'])} "
          f"| {acc(s['best_val_accuracy'])} | {s['up_bytes'] / 1e6:,.1f} | "
          f"{s['down_bytes'] / 1e6:,.1f} | {s['total_bytes'] / 1e6:,.1f} | {saving} | "
          f"{s['train_time_s']:.0f} |")


def _markdown(record: dict) -> str:
  c = record["setup"]
  rows = "\n".join(_row(p, n, s) for p, runs in record["runs"].items() for n, s in runs.items())
  names = [(p, n) for p, runs in record["runs"].items() for n in runs]
  rounds = max(len(record["runs"][p][n]["curve"]) for p, n in names)
  header = "| round | " + " | ".join(f"{p} {n}" for p, n in names) + " |"
  curve = "\n".join(
      f"| {i + 1} | " + " | ".join(
          f"{record['runs'][p][n]['curve'][i]['val_accuracy']:.4f}"
          if i < len(record["runs"][p][n]["curve"]) else "-" for p, n in names) + " |"
      for i in range(rounds))
  return f"""# Federated split training on CIFAR-10 (CPU scale)

Command: `{record['command']}` (commit {record['commit']}, jax {record['jax']}) on
{record['devices']} simulated on a shared {record['cpus']}-core CPU (other jobs were
running; times are indicative only). Training and evaluation of all runs took
**{record['rounds_time_s'] / 60:.1f} min** (the sum of every round's wall time); this
invocation ran {record['wall_time_s'] / 60:.1f} min (a resumed run's finished rounds are
not repeated).

Setup (reduced to fit this CPU):

- data: shared CIFAR-10 `train.zip`, seeded split into {c['num_train']:,} training and
  {c['num_val']:,} validation images (all training images used); 8 clients, IID or
  Dirichlet(alpha=0.5) over labels (client sizes {c['dirichlet_sizes']} for Dirichlet);
- ResNet-8 (not ResNet-20, for time), cut after stage 1: the client runs the stem and
  stage 1 (smashed data 32x32x16 per image);
- {c['rounds']} rounds x {c['local_steps']} local steps of batch 32 per client (each round
  the 8 clients see {8 * 32 * c['local_steps']:,} images; the whole budget is
  {c['rounds'] * 8 * 32 * c['local_steps'] / c['num_train']:.2f} epochs), every client in
  every round; SGD-Nesterov 0.9, lr 0.05 cosine over all local steps, weight decay 5e-4;
  client momentum restarted each round (not exchanged); centralized: the same
  {c['local_steps']} steps per round on global batches of 256 with the same learning rate;
- bytes are exact payloads from array shapes and dtypes: split methods send smashed data
  and labels up, gradients down every step, and the client part both ways every round;
  FedAvg the whole model both ways every round; centralized uploads the training images
  once.

| partition | method | smashed bits | final acc | best acc | MB up | MB down | MB total | saving vs fp32 | train s |
|---|---|---|---|---|---|---|---|---|---|
{rows}

Centralized training does not depend on the partition; it ran once (listed under iid).
SplitFed-V1 at 32 bits computes what FedAvg computes (every part is averaged with the
same weights) except that the server keeps its copies' averaged momentum between rounds,
where FedAvg restarts the whole model's: their round-1 accuracies agree exactly and later
ones differ only through that momentum. Their traffic differs.

Reading the numbers: the sequential server updates its one model once per client per
local step (8 x {c['local_steps']} updates of batch 32 per round), where each SplitFed-V1
server copy takes {c['local_steps']} and the copies are averaged, and centralized training
takes {c['local_steps']} steps of batch 256 at the same learning rate; in a budget this
short, more server updates win. Split traffic dwarfs FedAvg's here because ResNet-8 is
small (75k parameters, about 0.3 MB with BN statistics) while the smashed data after
stage 1 is 16,384 values (64 KB in float32) per image, sent up, with its gradient sent
down, at every step; 8-bit and 4-bit messages cut the total by {_saving(record, 8)} and
{_saving(record, 4)} (the range header, the int32 labels and the model exchange stay). Split learning pays off when the model is large and
the cut activations small (a later cut, fewer bits).

Validation accuracy ({c['num_val']:,} images) per round:

{header}
|{'---|' * (len(names) + 1)}
{curve}

![accuracy per round and per byte](cifar10.png)

Dirichlet(0.5) partition, training images per client and class:

{_table(histogram_rows(record['setup']['dirichlet_histogram'], record['setup']['class_names']))}
"""


def _saving(record: dict, bits: int) -> str:
  """How many times fewer bytes the IID SplitFed-V1 run at ``bits`` sent than at 32."""
  s = record["runs"].get("iid", {}).get(f"splitfed-{bits}bit")
  return f"{s['fp32_total_bytes'] / s['total_bytes']:.2f}x" if s else "-"


def _table(rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def _plot(record: dict, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
  central = record["runs"]["iid"].get("centralized")
  names = sorted({n for runs in record["runs"].values() for n in runs})
  colors = {n: f"C{i}" for i, n in enumerate(names)}
  for row, partition in enumerate(("iid", "dirichlet")):
    runs = dict(record["runs"].get(partition, {}))
    if central and "centralized" not in runs:
      runs["centralized"] = central
    for name, s in runs.items():
      pts = [p for p in s["curve"] if p["val_accuracy"] is not None]
      style = "--" if s["method"] == "centralized" else ":" if s["method"] == "sequential" else "-"
      acc = [p["val_accuracy"] for p in pts]
      axes[row, 0].plot([p["round"] for p in pts], acc, style, marker="o", ms=3, label=name,
                        color=colors[name])
      axes[row, 1].plot([p["cumulative_bytes"] / 1e6 for p in pts], acc, style, marker="o",
                        ms=3, label=name, color=colors[name])
    axes[row, 0].set(title=f"{partition}: accuracy per round", xlabel="round",
                     ylabel="validation accuracy")
    axes[row, 1].set(title=f"{partition}: accuracy vs bytes", xscale="log",
                     xlabel="MB communicated (cumulative)", ylabel="validation accuracy")
    for ax in axes[row]:
      ax.grid(alpha=0.3)
    axes[row, 0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=12)
  parser.add_argument("--local-steps", type=int, default=20)
  parser.add_argument("--quick", action="store_true")
  args = parser.parse_args(argv)
  t0 = time.time()
  record_runs: dict[str, dict] = {}
  sizes, histograms = {}, {}
  results = None
  for partition, methods, bits in PLAN:
    config = get_config(partition, methods, bits, args.quick, args.rounds, args.local_steps)
    results = run_federated(config)
    record_runs.setdefault(partition, {}).update(results["runs"])
    sizes[partition] = results["client_sizes"]
    histograms[partition] = results["label_histogram"]
  record = {
      **provenance("experiments.federated.cifar10", sys.argv[1:]),
      "machine": platform.processor() or platform.machine(),
      "devices": results["devices"], "wall_time_s": time.time() - t0,
      "rounds_time_s": sum(r["train_time_s"] for runs in record_runs.values()
                           for r in runs.values()),
      "setup": {"num_train": results["num_train"], "num_val": results["num_val"],
                "rounds": args.rounds if not args.quick else 2,
                "local_steps": args.local_steps if not args.quick else 2,
                "iid_sizes": sizes.get("iid"), "dirichlet_sizes": sizes.get("dirichlet"),
                "dirichlet_histogram": histograms.get("dirichlet"),
                "class_names": results["class_names"],
                "config": results["config"]},
      "runs": record_runs,
  }
  out = RESULTS if not args.quick else ROOT / "runs" / "federated" / "cifar10-quick"
  write_results(out, "cifar10", record, _markdown, _plot)
  return 0


if __name__ == "__main__":
  sys.exit(main())
