"""The report of a compression run: JSON, markdown and PNG plots a person reads."""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import numpy as np

from picpq_jax.compress import cost_model as cost_lib
from picpq_jax.models.structure import ModelStructure
from picpq_jax.utils import figure, read_jsonl, write_atomic


def layer_rows(structure: ModelStructure, masks, quant) -> list[dict[str, Any]]:
  """One row per conv/dense layer: kept input/output channels, bits, MACs before/after."""
  pruned = cost_lib.layer_costs(structure, masks, quant)
  rows = []
  for i, info in enumerate(structure.layers):
    rows.append({
        "layer": info.name, "in": int(pruned.c_in[i]), "in_full": info.in_features,
        "out": int(pruned.c_out[i]), "out_full": info.out_features,
        "w_bits": int(pruned.w_bits[i]), "a_bits": int(pruned.a_bits[i]),
        "macs": float(pruned.macs[i]), "macs_full": float(info.macs)})
  return rows


def _plot_layers(path: str, rows: list[dict]) -> None:
  names = [r["layer"] for r in rows]
  x = np.arange(len(rows))
  fig = figure(figsize=(max(8, len(rows) * 0.18), 6))
  top, bottom = fig.subplots(2, 1, sharex=True)
  top.bar(x, [r["out"] / r["out_full"] for r in rows], color="tab:blue")
  top.set_ylabel("kept output channels")
  top.set_ylim(0, 1.05)
  bottom.bar(x, [r["w_bits"] for r in rows], color="tab:orange")
  bottom.set_ylabel("bits (weights = activations)")
  bottom.set_xticks(x, names, rotation=90, fontsize=6)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _plot_evolution(path: str, history: list[float]) -> None:
  fig = figure(figsize=(6, 3.5))
  ax = fig.subplots()
  ax.plot(np.arange(len(history)), history, marker=".")
  ax.set_xlabel("generation")
  ax.set_ylabel("best validation loss in population")
  ax.set_title("(a, b) search")
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def _plot_curves(path: str, workdir: str) -> bool:
  fig = figure(figsize=(6, 3.5))
  ax = fig.subplots()
  drawn = False
  for stage in ("finetune", "qat"):
    metrics = os.path.join(workdir, stage, "metrics.jsonl")
    if os.path.exists(metrics):
      val = [r for r in read_jsonl(metrics) if "val_accuracy" in r]
      ax.plot([r["epoch"] for r in val], [r["val_accuracy"] for r in val], marker=".",
              label=stage)
      drawn = drawn or bool(val)
  if drawn:
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
  return drawn


def _markdown(results: dict, rows: list[dict]) -> str:
  c, base = results["cost"], results["baseline"]["val"]["accuracy"]
  acc = [("pretrained", results["baseline"]["val"]["accuracy"]),
         ("pruned, before fine-tuning", results["pruned"]["val"]["accuracy"]),
         ("pruned, fine-tuned", results["finetuned"]["val"]["accuracy"]),
         ("pruned and quantized (final)", results["final"]["val"]["accuracy"])]
  lines = [f"# PIC-PQ compression of {results['arch']}", "",
           f"From `{results['checkpoint']}` on `{results['data']}`.", "",
           "| model | validation accuracy |", "|---|---|"]
  lines += [f"| {name} | {a:.4f} |" for name, a in acc]
  lines += ["", f"Accuracy drop: {100 * (base - results['final']['val']['accuracy']):.2f} points.",
            "", "| cost | original (32-bit) | compressed | ratio |", "|---|---|---|---|"]
  for k in ("flops", "params", "bops"):
    lines.append(f"| {k} | {c[k + '_full']:,.0f} | {c[k]:,.0f} | {c[k + '_ratio']:.2f}x |")
  d = results.get("deployed")
  if d:
    lines += ["", f"Deployed: compacted to {d['compacted_params']:,} parameters; packed file "
              f"`{os.path.basename(d['file'])}` {d['file_bytes']:,} bytes against "
              f"{d['float32_bytes']:,} in float32 ({d['float32_bytes'] / d['file_bytes']:.1f}x "
              f"smaller). Largest logit difference, compacted vs masked model: "
              f"{d['compacted_vs_masked_max_logit_diff']:.2e}; loaded file vs masked: "
              f"{d['loaded_vs_masked_max_logit_diff']:.2e} (logits up to "
              f"{d['logits_max_abs']:.2f}); top-1 predictions agree on "
              f"{d['compacted_vs_masked_top1_agreement']:.2%} of {d['check_images']} "
              f"validation images."]
  lines += ["", "| layer | in kept | out kept | bits | MACs kept |", "|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['layer']} | {r['in']}/{r['in_full']} | {r['out']}/{r['out_full']} | "
                 f"{r['w_bits']} | {r['macs'] / max(r['macs_full'], 1):.2f} |")
  lines += ["", "Plots: `layers.png` (kept channels and bits per layer), `evolution.png` "
            "(best loss per generation), `curves.png` (fine-tuning accuracy)."]
  return "\n".join(lines) + "\n"


def write_report(workdir: str, results: dict, structure: ModelStructure, masks, quant,
                 print_fn: Callable[[str], None] = print) -> dict:
  """Writes ``report.json``, ``report.md`` and the PNGs into ``workdir``; returns the record."""
  rows = layer_rows(structure, masks, quant)
  results = {**results, "cost": results["pruned"]["cost"], "layers": rows}
  _plot_layers(os.path.join(workdir, "layers.png"), rows)
  if results.get("best_loss_history"):
    _plot_evolution(os.path.join(workdir, "evolution.png"), results["best_loss_history"])
  _plot_curves(os.path.join(workdir, "curves.png"), workdir)
  write_atomic(os.path.join(workdir, "report.json"), json.dumps(results, indent=2))
  text = _markdown(results, rows)
  write_atomic(os.path.join(workdir, "report.md"), text)
  print_fn(text.split("\n| layer |")[0])
  return results
