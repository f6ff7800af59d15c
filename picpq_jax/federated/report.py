"""What a person reads after a federated run: summaries, tables, markdown and a plot."""

from __future__ import annotations

from typing import Any, Sequence

from picpq_jax import models
from picpq_jax.federated.comm import message_bytes
from picpq_jax.federated.config import SPLIT_METHODS, FederatedConfig
from picpq_jax.federated.split import valid_cuts
from picpq_jax.utils import plot_rounds_and_bytes

LABELS = {"splitfed": "SplitFed-V1", "sequential": "Split, sequential server",
          "fedavg": "FedAvg", "centralized": "Centralized"}
PICPQ_LABEL = " (PIC-PQ client)"


def summarize(name: str, method: str, config: FederatedConfig,
              records: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One run's summary from its per-round records (``metrics.jsonl``).

  Returns the final and best validation accuracy, bytes up/down/total summed over the
  rounds (and the float32 equivalent for quantized split runs), training time and the
  per-round curve with cumulative bytes.
  """
  evals = [r for r in records if r.get("val_accuracy") is not None]
  curve, total = [], 0
  for r in records:
    total += r["total_bytes"]
    curve.append({"round": r["round"], "train_loss": r["train_loss"],
                  "train_accuracy": r["train_accuracy"], "val_loss": r.get("val_loss"),
                  "val_accuracy": r.get("val_accuracy"), "cumulative_bytes": total})
  split = method in SPLIT_METHODS
  return {
      "name": name, "method": method,
      "label": LABELS[method] + (PICPQ_LABEL if split and config.client_from else ""),
      "smashed_bits": config.smashed_bits if split else None, "cut": config.cut if split else None,
      "rounds": len(records), "rounds_planned": config.rounds,
      "final_val_accuracy": evals[-1]["val_accuracy"] if evals else None,
      "final_val_loss": evals[-1]["val_loss"] if evals else None,
      "best_val_accuracy": max(r["val_accuracy"] for r in evals) if evals else None,
      "up_bytes": sum(r["up_bytes"] for r in records),
      "down_bytes": sum(r["down_bytes"] for r in records),
      "total_bytes": total,
      "fp32_total_bytes": sum(r["fp32_total_bytes"] for r in records),
      "train_time_s": sum(r["round_time_s"] for r in records),
      "curve": curve,
  }


def _mb(n: float | None) -> str:
  return "-" if n is None else f"{n / 1e6:,.2f}"


def _acc(a: float | None) -> str:
  return "-" if a is None else f"{a:.4f}"


def summary_rows(runs: dict[str, dict]) -> list[list[str]]:
  """Header and one row per run: accuracy, bytes and the saving of quantization."""
  rows = [["run", "method", "bits", "rounds", "final acc", "best acc", "MB up", "MB down",
           "MB total", "vs fp32", "time s"]]
  for name, s in runs.items():
    saving = (f"{s['fp32_total_bytes'] / s['total_bytes']:.2f}x less"
              if s["total_bytes"] and s["fp32_total_bytes"] != s["total_bytes"] else "-")
    rows.append([name, s["label"], str(s["smashed_bits"] or "-"), str(s["rounds"]),
                 _acc(s["final_val_accuracy"]), _acc(s["best_val_accuracy"]),
                 _mb(s["up_bytes"]), _mb(s["down_bytes"]), _mb(s["total_bytes"]), saving,
                 f"{s['train_time_s']:.0f}"])
  return rows


def _markdown_table(rows: list[list[str]]) -> str:
  lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
  return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def curve_rows(runs: dict[str, dict]) -> list[list[str]]:
  """Validation accuracy per round (rows) and run (columns)."""
  rounds = max((len(s["curve"]) for s in runs.values()), default=0)
  rows = [["round", *runs]]
  for i in range(rounds):
    rows.append([str(i + 1), *[_acc(s["curve"][i]["val_accuracy"]) if i < len(s["curve"])
                               else "-" for s in runs.values()]])
  return rows


def table(results: dict[str, Any]) -> str:
  """The summary as aligned plain text (what the command prints)."""
  rows = summary_rows(results["runs"])
  widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
  return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def markdown(results: dict[str, Any]) -> str:
  """``report.md``: setup, the summary table and accuracy per round."""
  c = results["config"]
  sizes = results["client_sizes"]
  return (
      f"# Federated split training: {c['arch']}, {c['clients']} clients, "
      f"{c['partition']} partition\n\n"
      f"- data: {c['data']}, {results['num_train']} training / {results['num_val']} "
      f"validation images; client sizes {min(sizes)}..{max(sizes)}\n"
      f"- partition: {c['partition']}"
      + (f" (alpha {c['alpha']})" if c["partition"] == "dirichlet" else "")
      + (f" ({c['classes_per_client']} classes per client)" if c["partition"] == "classes" else "")
      + f"; participation {c['participation']} per round\n"
      f"- rounds {c['rounds']} x {c['local_steps']} local steps of batch {c['batch_size']} "
      f"per client; lr {c['lr']} ({c['schedule']}), momentum {c['momentum']}, "
      f"weight decay {c['weight_decay']}; client momentum "
      f"{'averaged' if c['sync_optimizer'] else 'restarted each round'}\n"
      f"- split at --cut {c['cut']}, after "
      f"{valid_cuts(models.get_model(c['arch'])).get(c['cut'], '?')}; smashed "
      f"data and gradients at {c['smashed_bits']} bits\n"
      f"- starting weights: {_start_line(results.get('start', {}))}\n"
      f"- devices: {results['devices']}, {results['processes']} process(es); wall time "
      f"{results['wall_time_s'] / 60:.1f} min\n\n"
      f"{_markdown_table(summary_rows(results['runs']))}\n\n"
      + (f"Edge cost of the client part (per image; FLOPs = MACs, BOPs = MACs x weight "
         f"bits x activation bits):\n\n{_markdown_table(edge_rows(results['edge'], c))}\n\n"
         if results.get("edge") else "") +
      f"Validation accuracy per round:\n\n{_markdown_table(curve_rows(results['runs']))}\n\n"
      f"Training images per client and class:\n\n"
      f"{_markdown_table(histogram_rows(results['label_histogram'], results['class_names']))}\n")


def _start_line(start: dict[str, Any]) -> str:
  if start.get("client_from"):
    return (f"PIC-PQ model of {start['client_from']} ({start['weights']}; "
            f"{start['quantizer']} quantizer, its plan's masks and bit-widths)")
  if start.get("init_from"):
    return f"{start['init_from']} ({start['weights']})"
  return start.get("weights", "random")


def edge_rows(edge: dict[str, Any], config: dict[str, Any]) -> list[list[str]]:
  """Header and rows: the client part's cost and traffic, unpruned 32-bit vs this run's.

  ``edge`` is :func:`picpq_jax.federated.edge.edge_cost` without ``client_sent``;
  message bytes per step are for ``config["batch_size"]`` images at
  ``config["smashed_bits"]`` bits (see :func:`picpq_jax.federated.comm.message_bytes`).
  """
  b, bits = config["batch_size"], config["smashed_bits"]
  full_msg = message_bytes((b * edge["smashed_values_full"],), "float32", bits)
  msg = message_bytes((b * edge["smashed_values"],), "float32", bits)
  rows = [["client part", "uncompressed (unpruned, 32-bit)", "this run", "reduction"]]
  for key, label in (("flops", "FLOPs (MACs)"), ("params", "params"), ("bops", "BOPs")):
    full, now = edge["client_full"][key], edge["client"][key]
    rows.append([label, f"{full:,.0f}", f"{now:,.0f}", f"{full / now:.2f}x" if now else "-"])
  h, w, c = edge["smashed_shape"]
  rows.append(["smashed channels sent", f"{c} ({h}x{w}x{c})",
               str(edge["smashed_channels_sent"]), f"{c / edge['smashed_channels_sent']:.2f}x"])
  rows.append([f"smashed bytes per step (batch {b}, messages at {bits} bits)", f"{full_msg:,}",
               f"{msg:,}", f"{full_msg / msg:.2f}x"])
  full_model, model = edge["client_model_bytes_full"], edge["client_model_bytes"]
  rows.append(["client model bytes per exchange", f"{full_model:,}", f"{model:,}",
               f"{full_model / model:.2f}x"])
  return rows


def histogram_rows(hist: Sequence[Sequence[int]], class_names: Sequence[str]) -> list[list[str]]:
  """Header and one row per client of a ``[K, C]`` label histogram, plus totals."""
  rows = [["client", *class_names, "total"]]
  for k, row in enumerate(hist):
    rows.append([str(k), *map(str, row), str(sum(row))])
  totals = [sum(col) for col in zip(*hist)]
  return rows + [["all", *map(str, totals), str(sum(totals))]]


def plot(results: dict[str, Any], path: str, title: str | None = None) -> None:
  """``plot.png``: validation accuracy against rounds and against bytes communicated."""
  curves = {name: (s["curve"], "--" if s["method"] == "centralized" else "-")
            for name, s in results["runs"].items()}
  plot_rounds_and_bytes(curves, path, "val_accuracy", "validation accuracy", "accuracy",
                        title=title)

