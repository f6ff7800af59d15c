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


def _title(results: dict) -> str:
  """``run · target · BOPs · accuracy`` for a plot title."""
  cfg, c = results.get("config", {}), results["cost"]
  split = "test" if "test" in results["final"] else "val"
  return (f"{os.path.basename(os.path.normpath(cfg.get('workdir', '')))} · {results['arch']} · "
          f"keep {cfg.get('target', float('nan')):.0%} {cfg.get('metric', '')} · "
          f"{c['bops'] / 1e9:.2f} GBOPs ({c['bops_ratio']:.1f}x less) · {split} accuracy "
          f"{results['final'][split]['accuracy']:.4f}")


def plot_layers(path: str, rows: list[dict], title: str = "") -> None:
  """Kept channels, then bits, per layer. Bits have their own axis, 0-9: layers left
  at 32 bits are drawn as grey bars labelled "fp" so they do not squash 2-8 bits."""
  names = [r["layer"] for r in rows]
  x = np.arange(len(rows))
  fig = figure(figsize=(max(8, len(rows) * 0.2), 7))
  top, middle, bottom = fig.subplots(3, 1, sharex=True)
  top.bar(x, [r["out"] / r["out_full"] for r in rows], color="tab:blue")
  top.set_ylabel("kept output\nchannels")
  top.set_ylim(0, 1.05)
  for ax, key, color in ((middle, "w_bits", "tab:orange"), (bottom, "a_bits", "tab:green")):
    bits = np.array([r[key] for r in rows])
    full = bits >= 32
    ax.bar(x[~full], bits[~full], color=color)
    ax.bar(x[full], np.full(full.sum(), 8.5), color="lightgrey")
    for i in x[full]:
      ax.text(i, 4, "fp", ha="center", va="center", fontsize=6, rotation=90)
    ax.set_ylim(0, 9)
    ax.set_yticks(range(0, 9, 2))
    ax.set_ylabel({"w_bits": "weight bits", "a_bits": "input activation\nbits"}[key])
  bottom.set_xticks(x, names, rotation=90, fontsize=6)
  if title:
    top.set_title(title, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def plot_evolution(path: str, population_best: list[float], best_ever: list[float],
                   chosen: int | None, title: str = "") -> None:
  """Best loss in the population and best ever seen, per generation; ``chosen`` marks
  the generation whose candidate the search returned."""
  fig = figure(figsize=(6, 3.5))
  ax = fig.subplots()
  gens = np.arange(len(population_best))
  ax.plot(gens, population_best, marker=".", lw=0.8, label="best in population")
  if len(best_ever):
    ax.step(gens, best_ever, where="post", color="k", label="best so far")
  if chosen is not None:
    ax.plot([chosen], [best_ever[chosen] if len(best_ever) else population_best[chosen]],
            "r*", ms=12, label="returned candidate")
  ax.set_xlabel("generation (0: initial population)")
  ax.set_ylabel("search-split loss")
  ax.set_title(title or "(a, b) search", fontsize=8)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


def chosen_generation(results: dict) -> int | None:
  """The generation whose member the search returned: where the best-ever loss was
  first reached (``--returns best-ever``), else the last one."""
  ever = results.get("best_ever_history") or []
  if not results.get("best_loss_history"):
    return None
  if results.get("config", {}).get("returns", "best-ever") == "final" or not ever:
    return len(results["best_loss_history"]) - 1
  return int(np.argmin(np.asarray(ever)))


def plot_accuracy_vs_bops(path: str, points: list[dict], baseline: dict | None = None,
                          title: str = "") -> None:
  """Accuracy against BOPs (log x) across runs, one series per ``label``.

  Args:
    points: ``{"label", "bops", "accuracy", "spread"}`` each (``spread``: half the
      error bar, e.g. the std over seeds; 0 for one run).
    baseline: ``{"bops", "accuracy"}`` of the uncompressed model, drawn as a star
      and a dotted line.
  """
  fig = figure(figsize=(7, 4.5))
  ax = fig.subplots()
  for label in dict.fromkeys(p["label"] for p in points):
    ps = [p for p in points if p["label"] == label]
    ax.errorbar([p["bops"] for p in ps], [p["accuracy"] for p in ps],
                yerr=[p.get("spread", 0.0) for p in ps], marker="o", capsize=3, ls="",
                label=label)
  if baseline:
    ax.plot([baseline["bops"]], [baseline["accuracy"]], "k*", ms=12, label="baseline (32-bit)")
    ax.axhline(baseline["accuracy"], color="k", ls=":", lw=0.8)
  ax.set_xscale("log")
  ax.set_xlabel("BOPs (log scale)")
  ax.set_ylabel("accuracy")
  ax.set_title(title, fontsize=8)
  ax.legend(fontsize=7)
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


STAGE_NAMES = {"setup": "setup (model and data loaded)", "baseline": "baseline evaluated",
               "filter_property": "filter property", "genes": "(a, b) search",
               "plan": "pruning and bits (pruned model evaluated)", "finetune": "fine-tuning",
               "qat": "quantization-aware training", "export": "compaction and export",
               "evaluate": "final evaluation"}


def stage_seconds_table(seconds: dict[str, float]) -> list[str]:
  """Markdown lines: wall seconds and share of each stage of ``picpq compress``."""
  if not seconds:
    return []
  total = sum(seconds.values())
  lines = ["", "| stage | wall time (s) | share |", "|---|---|---|"]
  for stage, name in STAGE_NAMES.items():
    if stage in seconds:
      lines.append(f"| {name} | {seconds[stage]:.1f} | {seconds[stage] / total:.0%} |")
  return lines + [f"| total | {total:.1f} | |"]


def _markdown(results: dict, rows: list[dict]) -> str:
  c = results["cost"]
  split = "test" if "test" in results["final"] else "val"
  stages = [("pretrained", "baseline"), ("pruned, before fine-tuning", "pruned"),
            ("pruned, fine-tuned", "finetuned"), ("pruned and quantized (final)", "final")]
  header = "| model | validation accuracy |" + (" test accuracy |" if split == "test" else "")
  lines = [f"# PIC-PQ compression of {results['arch']}", "",
           f"From `{results['checkpoint']}` on `{results['data']}`.", "",
           header, "|---|---|" + ("---|" if split == "test" else "")]
  for name, key in stages:
    cells = [results[key]["val"]["accuracy"]] + (
        [results[key]["test"]["accuracy"]] if split == "test" else [])
    lines.append(f"| {name} | " + " | ".join(f"{a:.4f}" for a in cells) + " |")
  drop = results["baseline"][split]["accuracy"] - results["final"][split]["accuracy"]
  lines += ["", f"Accuracy drop ({'test' if split == 'test' else 'validation'}): "
            f"{100 * drop:.2f} points. Candidates were scored on a search split of "
            f"{results.get('search_split', 0):,} training images; nothing was chosen on the "
            f"validation{' or test' if split == 'test' else ''} split."]
  dev = results.get("deviations", {})
  lines += ["", "Deviations from the reference (fanxxxxyi/PIC-PQ): " + (
      "; ".join(f"`--{k.replace('_', '-')}` {v[0]!r} (reference {v[1]!r})"
                for k, v in dev.items()) + "." if dev else "none.")]
  lines += ["",
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
  lines += stage_seconds_table(results.get("stage_seconds", {}))
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
  title = _title(results)
  plot_layers(os.path.join(workdir, "layers.png"), rows, title)
  if results.get("best_loss_history"):
    plot_evolution(os.path.join(workdir, "evolution.png"), results["best_loss_history"],
                   results.get("best_ever_history", []), chosen_generation(results), title)
  _plot_curves(os.path.join(workdir, "curves.png"), workdir)
  write_atomic(os.path.join(workdir, "report.json"), json.dumps(results, indent=2))
  text = _markdown(results, rows)
  write_atomic(os.path.join(workdir, "report.md"), text)
  print_fn(text.split("\n| layer |")[0])
  return results
