"""SplitFed with a PIC-PQ-compressed client against an uncompressed one, on the shared CIFAR-10.

ResNet-20 cut after stage 1 (the client runs the stem and stage 1, 7 of its 19 convs),
8 simulated clients (one per simulated CPU device), IID partition, SplitFed-V1, the same
small budget for every run. Both clients start from trained weights, because the
compressed model is a trained one:

* ``uncompressed``: the baseline ResNet-20 (``--init-from
  experiments/baselines/checkpoints/resnet20``), 32-bit, unpruned;
* ``picpq-<weights>``: the PIC-PQ model of a ``picpq compress`` workdir
  (``--client-from``: the plan's masks and bit-widths, its DoReFa quantizer) starting
  from its ``finetune/`` (pruned, full-precision fine-tuned) or ``qat/``
  (quantization-aware fine-tuned) weights (``--client-weights``), so the client runs
  the pruned, low-bit front;
* ``picpq-<weights>-8bit``: the same with 8-bit smashed data and gradients.

Command (from the repo root)::

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        .venv/bin/python -m experiments.federated.picpq_client

writes ``experiments/federated/results/picpq_client.{json,md,png}`` and keeps each run
(checkpoints per round, metrics.jsonl, report.md) in ``runs/federated/picpq_client/``;
rerunning resumes them.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import numpy as np  # pylint: disable=wrong-import-position

from experiments.federated.common import (RESULTS, ROOT, SHARED_ZIP, provenance,  # pylint: disable=wrong-import-position
                                          write_results)
from picpq_jax import data as pdata  # pylint: disable=wrong-import-position
from picpq_jax import models  # pylint: disable=wrong-import-position
from picpq_jax.federated import FederatedConfig, run_federated  # pylint: disable=wrong-import-position
from picpq_jax.federated import edge as fedge  # pylint: disable=wrong-import-position
from picpq_jax.federated.report import edge_rows  # pylint: disable=wrong-import-position
from picpq_jax.train.loop import evaluate_dataset  # pylint: disable=wrong-import-position

BASELINE = ROOT / "experiments" / "baselines" / "checkpoints" / "resnet20"
COMPRESSED = ROOT / "runs" / "compress" / "pic-evolved"


def get_config(name: str, compressed: str, rounds: int, local_steps: int) -> FederatedConfig:
  """One run: ResNet-20, 8 IID clients, cut 1, SplitFed-V1, fine-tuning learning rate.

  ``name`` is ``uncompressed``, ``picpq-<weights>`` or ``picpq-<weights>-8bit``.
  """
  start = ({"client_from": compressed, "client_weights": name.split("-")[1]}
           if name.startswith("picpq") else {"init_from": str(BASELINE)})
  return FederatedConfig(
      arch="resnet20", data=str(SHARED_ZIP), val_size=5000, seed=0, clients=8,
      partition="iid", cut=1, methods="splitfed", rounds=rounds, local_steps=local_steps,
      batch_size=32, lr=0.01, schedule="cosine", momentum=0.9, weight_decay=5e-4,
      smashed_bits=8 if name.endswith("8bit") else 32, client_loop="vmap", resume=True,
      progress=False, plot=False, workdir=f"runs/federated/picpq_client/{name}", **start)


def start_accuracy(config: FederatedConfig, val: pdata.ImageDataset) -> float:
  """Validation accuracy of a run's starting weights (round 0)."""
  if config.client_from:
    start = fedge.load_compressed(config.client_from, config.arch, val.num_classes,
                                  weights=config.client_weights)
  else:
    start = fedge.load_start(config.init_from, config.arch, val.num_classes)
  model = models.get_model(config.arch, num_classes=val.num_classes, quantizer=start.quantizer)
  norm = start.meta["normalization"]
  return evaluate_dataset(model, start.variables, val, 250, np.asarray(norm["mean"], np.float32),
                          np.asarray(norm["std"], np.float32))["accuracy"]


def _notes(record: dict) -> str:
  """What the numbers say, written from them."""
  runs = record["runs"]
  compressed = [n for n in runs if n.startswith("picpq")]
  if not compressed:
    return ""
  e = runs[compressed[0]]["edge"]
  h, w, c = e["smashed_shape"]
  sent = e["smashed_channels_sent"]
  notes = [
      f"The PIC-PQ client costs {e['client_full']['flops'] / e['client']['flops']:.2f}x fewer "
      f"FLOPs, {e['client_full']['params'] / e['client']['params']:.2f}x fewer parameters and "
      f"{e['client_full']['bops'] / e['client']['bops']:.2f}x fewer BOPs per image than the "
      f"uncompressed client, and its model exchange carries "
      f"{e['client_model_bytes_full'] / e['client_model_bytes']:.2f}x fewer bytes (kept "
      f"entries only)."]
  if sent == c:
    notes.append(
        f"The plan keeps all {c} channels of the stream that is the smashed data at this cut "
        f"(it prunes the blocks' inner channels), so the smashed data is not smaller; "
        f"8-bit messages cut it 4x.")
  else:
    notes.append(f"The smashed data carries {sent} of its {c} channels ({c / sent:.2f}x fewer "
                 f"bytes per message).")
  if any("finetune" in n for n in compressed):
    acc = runs[next(n for n in compressed if "finetune" in n)]["start_accuracy"]
    notes.append(
        f"A `finetune/` start is the pruned model fine-tuned in full precision: fake-quantized "
        f"at the plan's bits with the BatchNorm running statistics of the "
        f"full-precision layers, it starts at {acc:.4f} (chance level) and split training has "
        f"to re-learn the quantized model; a `qat/` start is where `picpq compress` left it.")
  return "\n\n".join(notes)


def _markdown(record: dict) -> str:
  runs = record["runs"]
  rows = []
  for name, r in runs.items():
    e, s = r["edge"], r["summary"]
    rows.append(
        f"| {name} | {r['weights']} | {r['smashed_bits']} | {r['start_accuracy']:.4f} | "
        f"{s['final_val_accuracy']:.4f} | {e['client']['flops'] / 1e6:.2f} | "
        f"{e['client']['params'] / 1e3:.1f} | {e['client']['bops'] / 1e9:.3f} | "
        f"{e['smashed_channels_sent']} | {s['up_bytes'] / 1e6:,.1f} | "
        f"{s['down_bytes'] / 1e6:,.1f} | {s['total_bytes'] / 1e6:,.1f} | "
        f"{s['train_time_s']:.0f} |")
  names = list(runs)
  rounds = max(len(runs[n]["summary"]["curve"]) for n in names)
  curve = ["| 0 (start) | " + " | ".join(f"{runs[n]['start_accuracy']:.4f}" for n in names) + " |"]
  curve += [f"| {i + 1} | " + " | ".join(
      f"{runs[n]['summary']['curve'][i]['val_accuracy']:.4f}"
      if i < len(runs[n]["summary"]["curve"]) else "-" for n in names) + " |"
            for i in range(rounds)]
  c = record["setup"]
  cc = c["compress_config"]
  first = next((n for n in names if n.startswith("picpq") and runs[n]["smashed_bits"] == 32),
               names[-1])
  table = lambda rs: "\n".join(["| " + " | ".join(rs[0]) + " |", "|" + "---|" * len(rs[0])]
                               + ["| " + " | ".join(r) + " |" for r in rs[1:]])
  return f"""# SplitFed with a PIC-PQ-compressed client (CIFAR-10, CPU scale)

Command: `{record['command']}` (commit {record['commit']}, jax {record['jax']}) on
{record['devices']} simulated on a shared {record['cpus']}-core CPU (other jobs were
running; times are indicative only). Training and evaluation of the runs took
{record['rounds_time_s'] / 60:.1f} min (sum of round wall times); this invocation ran
{record['wall_time_s'] / 60:.1f} min (finished runs are read back, not repeated).

Setup: ResNet-20 cut after stage 1 (client: stem and stage 1, 7 of the 19 convs; smashed
data 32x32x16 per image), SplitFed-V1 over 8 IID clients on the shared CIFAR-10
(`train.zip`, seeded split into {c['num_train']:,} training and {c['num_val']:,}
validation images, the split the baseline was trained with), {c['rounds']} rounds x
{c['local_steps']} local steps of batch 32 per client (each round sees
{8 * 32 * c['local_steps']:,} images), SGD-Nesterov 0.9, lr 0.01 cosine, weight decay
5e-4, client momentum restarted each round.

- `uncompressed`: starts from the baseline checkpoint `{c['baseline']}`; full width, 32 bits.
- `picpq-*`: `--client-from {c['compressed']}`, the PIC-PQ model of the background
  compression experiment (evolved genes, {cc['target']:.0%} of the {cc['metric']} kept,
  max bits `{cc['max_bits']}`, penalty {cc['penalty']:.3f}): its plan's masks and
  bit-widths with {cc['quantizer']} fake quantization, starting from its
  `finetune/` or `qat/` weights (`--client-weights`). The whole model is the compressed
  one (its server part too); the client part is what the edge device runs.

| run | starting weights | smashed bits | start acc | final acc | client MFLOPs | client kparams | client GBOPs | smashed channels sent | MB up | MB down | MB total | train s |
|---|---|---|---|---|---|---|---|---|---|---|---|---|
{chr(10).join(rows)}

Client cost per image (cost model: FLOPs = MACs; parameters = kernel entries; BOPs =
MACs x weight bits x activation bits) and traffic of the `{first}` client against the
uncompressed one:

{table(edge_rows(runs[first]['edge'], {'batch_size': 32, 'smashed_bits': runs[first]['smashed_bits']}))}

{_notes(record)}

Validation accuracy ({c['num_val']:,} images) per round:

| round | {' | '.join(names)} |
|{'---|' * (len(names) + 1)}
{chr(10).join(curve)}

![accuracy per round and per byte](picpq_client.png)
"""


def _plot(record: dict, path) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(11, 4.2))
  for name, r in record["runs"].items():
    pts = r["summary"]["curve"]
    acc = [r["start_accuracy"]] + [p["val_accuracy"] for p in pts]
    ax_r.plot(range(len(acc)), acc, marker="o", ms=3, label=name)
    ax_b.plot([p["cumulative_bytes"] / 1e6 for p in pts], acc[1:], marker="o", ms=3, label=name)
  ax_r.set(xlabel="round (0: starting weights)", ylabel="validation accuracy",
           title="accuracy per round")
  ax_b.set(xlabel="MB communicated (cumulative)", ylabel="validation accuracy",
           title="accuracy vs communication")
  for ax in (ax_r, ax_b):
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=4)
  parser.add_argument("--local-steps", type=int, default=10)
  parser.add_argument("--compressed", default=str(COMPRESSED),
                      help="the picpq compress workdir of a ResNet-20")
  parser.add_argument("--runs", default="uncompressed,picpq-finetune,picpq-finetune-8bit,"
                      "picpq-qat,picpq-qat-8bit")
  args = parser.parse_args(argv)
  t0 = time.time()
  dataset = pdata.load_dataset(str(SHARED_ZIP), split="train")
  _, val = pdata.train_val_split(dataset, 5000, 0)
  runs, results = {}, None
  for name in args.runs.split(","):
    config = get_config(name, args.compressed, args.rounds, args.local_steps)
    results = run_federated(config)
    summary = next(iter(results["runs"].values()))
    runs[name] = {"summary": summary, "edge": results["edge"], "start": results["start"],
                  "weights": results["start"]["weights"], "smashed_bits": config.smashed_bits,
                  "start_accuracy": start_accuracy(config, val)}
    print(f"{name}: start {runs[name]['start_accuracy']:.4f}, final "
          f"{summary['final_val_accuracy']:.4f}", flush=True)
  record = {
      **provenance("experiments.federated.picpq_client", sys.argv[1:]),
      "devices": results["devices"], "wall_time_s": time.time() - t0,
      "rounds_time_s": sum(r["summary"]["train_time_s"] for r in runs.values()),
      "setup": {"num_train": results["num_train"], "num_val": results["num_val"],
                "rounds": args.rounds, "local_steps": args.local_steps,
                "baseline": str(BASELINE.relative_to(ROOT)),
                "compressed": os.path.relpath(args.compressed, ROOT),
                "compress_config": json.loads(
                    (Path(args.compressed) / "config.json").read_text()),
                "config": results["config"]},
      "runs": runs,
  }
  write_results(RESULTS, "picpq_client", record, _markdown, _plot)
  return 0


if __name__ == "__main__":
  sys.exit(main())
