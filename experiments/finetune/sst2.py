"""SST-2 with all-MiniLM-L6-v2: accuracy, memory and speed of each fine-tuning method.

For every method (full, full with per-block remat, LoRA, BitFit, prompt tuning, MeZO,
4-bit QLoRA) and every k (examples per class, same seed), one ``picpq finetune`` run
in its own process (so that its peak RSS is its own), then the federated variants
(FedIT with LoRA, FedKSeed-style seed-only zeroth order) over ``--clients`` clients
holding k examples per class each. Each run's ``results.json`` gives the dev accuracy
(on the same fixed sample of ``--eval-size`` dev sentences), trainable parameters,
the compiled step's ``memory_analysis()`` (argument, temporary bytes), the process's
peak RSS, the median step time and, federated, the bytes per round.

Command (from the repo root; the budget of the committed results is in the README):

    .venv/bin/python -m experiments.finetune.sst2 [--ks 16,64] [--epochs 10] \\
        [--mezo-steps 200] [--eval-size 1000] [--workdir runs/finetune_sst2]

writes ``experiments/finetune/results/sst2.json`` and ``sst2.md`` after every run (a
rerun skips the runs whose ``results.json`` is already complete; ``--report`` only
rewrites ``sst2.md`` from ``sst2.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
MIB = 2 ** 20

# name -> extra picpq finetune options
METHODS = {
    "full": ["--method", "full"],
    "full+remat": ["--method", "full", "--remat"],
    "lora": ["--method", "lora", "--rank", "8", "--targets", "query|value"],
    "bitfit": ["--method", "bitfit"],
    "prompt": ["--method", "prompt", "--prompt-length", "20"],
    "mezo": ["--method", "mezo"],
    "qlora-4bit": ["--method", "qlora", "--qlora-bits", "4", "--rank", "8",
                   "--targets", "query|value"],
}


def runs(args) -> list[tuple[str, int, list[str]]]:
  """``(name, k, options)`` in the order they run: every method at the first k,
  then the federated variants, then the other ks."""
  out = []
  common = ["--data", args.data, "--eval-size", str(args.eval_size), "--max-len",
            str(args.max_len), "--batch-size", str(args.batch_size), "--seed", str(args.seed)]
  for i, k in enumerate(args.ks):
    for name, extra in METHODS.items():
      length = (["--steps", str(args.mezo_steps)] if name == "mezo"
                else ["--epochs", str(args.epochs)])
      out.append((name, k, [*extra, "--k", str(k), *length, *common]))
    if i == 0:
      fed = ["--clients", str(args.clients), "--k", str(k), *common]
      out.append(("fedit-lora", k, ["--method", "lora", "--federated", "fedit", "--rounds",
                                    str(args.fedit_rounds), "--local-steps",
                                    str(args.fedit_local_steps), *fed]))
      out.append(("fedkseed-zo", k, ["--method", "mezo", "--federated", "fedkseed", "--rounds",
                                     str(args.zo_rounds), "--local-steps",
                                     str(args.zo_local_steps), *fed]))
  return out


def row(name: str, k: int, r: dict, command: str) -> dict:
  mem = r["step_memory"]
  return {
      "name": name, "k": k, "eval_accuracy": r["eval_accuracy"], "eval_loss": r["eval_loss"],
      "num_eval": r["num_eval"], "num_train": r["num_train"], "steps": r["steps"],
      "trainable_params": r["trainable_params"], "total_params": r["total_params"],
      "step_argument_bytes": mem["argument_bytes"], "step_temp_bytes": mem["temp_bytes"],
      "step_output_bytes": mem["output_bytes"], "step_alias_bytes": mem["alias_bytes"],
      "step_peak_bytes": mem["peak_bytes"],
      "opt_state_bytes": r["opt_state_bytes"], "peak_rss_bytes": r["peak_rss_bytes"],
      "median_step_s": r["median_step_s"], "wall_time_s": r["wall_time_s"],
      "learning_rate": r["learning_rate"], "bytes_per_round": r.get("bytes_per_round"),
      "traffic_per_round": r.get("traffic_per_round"), "clients": r.get("clients"),
      "local_steps": r.get("local_steps"), "command": command,
  }


def table(rows: list[dict]) -> str:
  base = {r["k"]: r for r in rows if r["name"] == "full"}
  lines = ["| method | k/class | dev acc | trainable params | step args MiB | step temp MiB "
           "| args+temp MiB | full / this | peak RSS MiB | median step s | steps | bytes/round |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for r in rows:
    at = (r["step_argument_bytes"] + r["step_temp_bytes"]) / MIB
    full = base.get(r["k"])
    # Federated rows run all clients in one program: not one device's step.
    ratio = (f"{(full['step_argument_bytes'] + full['step_temp_bytes']) / MIB / at:.1f}x"
             if full and r["name"] != "full" and not r["clients"] else "-")
    name = r["name"] + (f" ({r['clients']} clients)" if r["clients"] else "")
    lines.append(
        f"| {name} | {r['k']} | {r['eval_accuracy']:.3f} | {r['trainable_params']:,} "
        f"| {r['step_argument_bytes'] / MIB:.1f} | {r['step_temp_bytes'] / MIB:.1f} | {at:.1f} "
        f"| {ratio} | {r['peak_rss_bytes'] / MIB:.0f} | {r['median_step_s']:.3f} | {r['steps']} "
        f"| {r['bytes_per_round'] if r['bytes_per_round'] is not None else '-'} |")
  return "\n".join(lines)


def write(rows: list[dict], args, started: float, command: str) -> None:
  RESULTS.mkdir(parents=True, exist_ok=True)
  meta = {"command": command, "wall_time_s": time.time() - started, "machine":
          platform.machine(), "cpus": os.cpu_count(), "args": vars(args)}
  (RESULTS / "sst2.json").write_text(json.dumps({**meta, "rows": rows}, indent=1))
  text = (f"# SST-2 fine-tuning methods (all-MiniLM-L6-v2)\n\nCommand: `{command}`\n\n"
          f"Wall time: {meta['wall_time_s'] / 60:.1f} min on a shared {os.cpu_count()}-CPU "
          f"machine (XLA:CPU).\n\nDev accuracy on a fixed sample of {args.eval_size} dev "
          f"sentences; memory from `memory_analysis()` of the compiled training step (batch "
          f"{args.batch_size}, sequences trimmed to the longest training sentence, at most "
          f"{args.max_len} tokens); peak RSS of the run's process.\n\n{table(rows)}\n")
  (RESULTS / "sst2.md").write_text(text)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="../shared/data/sst2")
  parser.add_argument("--ks", default="16,64", help="comma-separated examples per class")
  parser.add_argument("--epochs", type=float, default=10.0, help="first-order methods")
  parser.add_argument("--mezo-steps", type=int, default=200)
  parser.add_argument("--eval-size", type=int, default=1000)
  parser.add_argument("--max-len", type=int, default=64)
  parser.add_argument("--batch-size", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--clients", type=int, default=4)
  parser.add_argument("--fedit-rounds", type=int, default=10)
  parser.add_argument("--fedit-local-steps", type=int, default=2)
  parser.add_argument("--zo-rounds", type=int, default=10)
  parser.add_argument("--zo-local-steps", type=int, default=5)
  parser.add_argument("--workdir", default="runs/finetune_sst2")
  parser.add_argument("--report", action="store_true",
                      help="only rewrite sst2.md from the rows in sst2.json")
  args = parser.parse_args()
  if args.report:
    saved = json.loads((RESULTS / "sst2.json").read_text())
    args = argparse.Namespace(**saved["args"])
    write(saved["rows"], args, time.time() - saved["wall_time_s"], saved["command"])
    print(table(saved["rows"]))
    return
  args.ks = [int(k) for k in args.ks.split(",")]
  command = "python -m experiments.finetune.sst2 " + shlex.join(sys.argv[1:])
  started = time.time()
  rows = []
  for name, k, options in runs(args):
    workdir = os.path.join(args.workdir, f"{name}_k{k}")
    argv = ["picpq", "finetune", *options, "--workdir", workdir, "--no-progress"]
    results = Path(workdir) / "results.json"
    done = results.is_file() and json.loads(results.read_text()).get("finished")
    if not done:
      resume = ["--resume"] if (Path(workdir) / "checkpoints").is_dir() else []
      print(f"[{(time.time() - started) / 60:5.1f} min] {shlex.join(argv)}", flush=True)
      proc = subprocess.run([sys.executable, "-m", "picpq_jax.cli", *argv[1:], *resume],
                            capture_output=True, text=True)
      if proc.returncode:
        print(proc.stderr[-3000:], flush=True)
        continue
    r = json.loads(results.read_text())
    rows.append(row(name, k, r, shlex.join(argv)))
    print(f"  {name} k={k}: acc {r['eval_accuracy']:.3f}, temp "
          f"{r['step_memory']['temp_bytes'] / MIB:.1f} MiB, step {r['median_step_s']:.3f} s, "
          f"run {r['wall_time_s']:.0f} s", flush=True)
    write(rows, args, started, command)
  write(rows, args, started, command)
  print(table(rows))


if __name__ == "__main__":
  main()
