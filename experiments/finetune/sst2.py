"""SST-2 with all-MiniLM-L6-v2: accuracy, memory and speed of each fine-tuning method.

For every method (full, full with per-block remat, LoRA, BitFit, prompt tuning, MeZO,
4-bit QLoRA on the uniform and the NF4 grid) and every k (examples per class, same
seed; the zeroth-order rows for every seed of ``--seeds``, from the head ``--zo-head``
with ``--zo-lr``/``--zo-eps``), one ``picpq finetune`` run
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
rewrites ``sst2.md`` from ``sst2.json``; ``--only mezo,fedkseed-zo --merge`` re-runs
some rows into the existing table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

from experiments.bench.common import cpu_model

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
    "qlora-nf4": ["--method", "qlora", "--qlora-bits", "4", "--qlora-grid", "nf4", "--rank",
                  "8", "--targets", "query|value"],
}
ZO = ("mezo", "fedkseed-zo")  # rows run for every seed of --seeds, from --zo-head


def runs(args) -> list[tuple[str, int, int, list[str]]]:
  """``(name, k, seed, options)`` in the order they run: every method at the first k,
  then the federated variants (at every k of ``--fed-ks``), then the other ks; the
  zeroth-order rows once per seed of ``--seeds``, the others at ``--seed``; only the
  names in ``--only`` when given."""
  out = []
  common = ["--data", args.data, "--eval-size", str(args.eval_size), "--max-len",
            str(args.max_len), "--batch-size", str(args.batch_size)]
  head = ["--head", args.head]
  zo_name = lambda name: name if args.zo_part == "full" else f"{name}-{args.zo_part}"  # noqa: E731
  zo = ["--head", args.zo_head, "--lr", str(args.zo_lr), "--mezo-eps", str(args.zo_eps),
        "--zo-part", args.zo_part, "--dropout", str(args.zo_dropout),
        *(["--zo-layers", str(args.zo_layers)] if args.zo_layers else []),
        "--checkpoint-every", str(args.zo_checkpoint_every),
        "--mezo-n", str(args.zo_n), *(["--head-l2", str(args.zo_l2)] if args.zo_l2 else [])]
  # --zo-full-batch: every step sees all 2k examples (per client): SST-2's 2 classes
  zo_batch = lambda k: ["--batch-size", str(2 * k)] if args.zo_full_batch else []  # noqa: E731
  for i, k in enumerate(args.ks):
    for name, extra in METHODS.items():
      if name == "mezo":
        out += [(zo_name(name), k, seed, [*extra, *zo, "--k", str(k), "--steps", str(args.mezo_steps),
                                 *common, *zo_batch(k), "--seed", str(seed)]) for seed in args.seeds]
      else:
        out.append((name, k, args.seed, [*extra, *head, "--k", str(k), "--epochs",
                                         str(args.epochs), *common, "--seed", str(args.seed)]))
    if k in args.fed_ks or (not args.fed_ks and i == 0):
      fed = ["--clients", str(args.clients), "--k", str(k), *common]
      out.append(("fedit-lora", k, args.seed, [
          "--method", "lora", "--federated", "fedit", "--rounds", str(args.fedit_rounds),
          "--local-steps", str(args.fedit_local_steps), *head, *fed, "--seed",
          str(args.seed)]))
      out += [(zo_name("fedkseed-zo"), k, seed, [
          "--method", "mezo", "--federated", "fedkseed", *zo, "--rounds", str(args.zo_rounds),
          "--local-steps", str(args.zo_local_steps), *fed, *zo_batch(k), "--seed", str(seed)])
              for seed in args.seeds]
  return [r for r in out if not args.only or r[0] in args.only
          or r[0].rsplit("-", 1)[0] in args.only]


def row(name: str, k: int, r: dict, command: str, config: dict) -> dict:
  """One run's results.json as a table row (``head`` and ``start_accuracy``: the
  classifier head it started from and that start's accuracy on the same sentences)."""
  mem = r["step_memory"]
  start = r.get("start_eval") or {}
  return {
      "name": name, "k": k, "seed": r["seed"], "head": config.get("head", "random"),
      "start_accuracy": start.get("eval_accuracy"),
      "eval_accuracy": r["eval_accuracy"], "eval_loss": r["eval_loss"],
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
      # --zo-part head/ffn: the step runs on activations made once by an inference pass
      # (about the evaluation program, batch 64) and holds them (cache_bytes, a constant
      # of the compiled step): the method's memory is the larger of the two.
      "embed_pass_bytes": (r["eval_memory"]["argument_bytes"] + r["eval_memory"]["temp_bytes"]
                           if r.get("zo_part") in ("head", "ffn") else None),
      "cache_bytes": r.get("cache_bytes"),
  }


def _key(r: dict) -> tuple:
  """A row's identity: (name, k, seed, head)."""
  return r["name"], r["k"], r.get("seed", 0), r.get("head", "random")


def _spread(values: list[float]) -> str:
  """``0.712`` for one value; ``mean ± sd [min, max]`` (sample sd) for several."""
  if len(values) == 1:
    return f"{values[0]:.3f}"
  return (f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f} "
          f"[{min(values):.3f}, {max(values):.3f}]")


def grouped(rows: list[dict]) -> list[list[dict]]:
  """Rows of one (name, k, head) together (several seeds), in first-seen order."""
  groups: dict[tuple, list[dict]] = {}
  for r in rows:
    groups.setdefault(_key(r)[:2] + _key(r)[3:], []).append(r)
  return list(groups.values())


def table(rows: list[dict]) -> str:
  base = {r["k"]: r for r in rows if r["name"] == "full"}
  lines = ["| method | k/class | head | seeds | start acc | dev acc | trainable params "
           "| step args MiB | step temp MiB | args+temp MiB | full / this | peak RSS MiB "
           "| median step s | steps | bytes/round |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for group in grouped(rows):
    r = group[0]
    at = (r["step_argument_bytes"] + r["step_temp_bytes"] + (r.get("cache_bytes") or 0)) / MIB
    at = max(at, (r.get("embed_pass_bytes") or 0) / MIB)
    full = base.get(r["k"])
    # Federated rows run all clients in one program: not one device's step.
    ratio = (f"{(full['step_argument_bytes'] + full['step_temp_bytes']) / MIB / at:.1f}x"
             if full and r["name"] != "full" and not r["clients"] else "-")
    name = r["name"] + (f" ({r['clients']} clients)" if r["clients"] else "")
    starts = [g["start_accuracy"] for g in group if g.get("start_accuracy") is not None]
    lines.append(
        f"| {name} | {r['k']} | {r.get('head', 'random')} "
        f"| {','.join(str(g.get('seed', 0)) for g in group)} "
        f"| {_spread(starts) if starts else '-'} "
        f"| {_spread([g['eval_accuracy'] for g in group])} | {r['trainable_params']:,} "
        f"| {r['step_argument_bytes'] / MIB:.1f} | {r['step_temp_bytes'] / MIB:.1f} | {at:.1f}"
        f"{'*' if r.get('embed_pass_bytes') else ''} "
        f"| {ratio} | {max(g['peak_rss_bytes'] for g in group) / MIB:.0f} "
        f"| {statistics.median(g['median_step_s'] for g in group):.3f} | {r['steps']} "
        f"| {r['bytes_per_round'] if r['bytes_per_round'] is not None else '-'} |")
  return "\n".join(lines)


def merged(rows: list[dict]) -> list[dict]:
  """``rows`` over the rows already in ``sst2.json``: a row of the same (name, k,
  seed) is replaced in place, new ones are appended (``--merge``: several
  invocations, e.g. a re-run of some methods, build one table)."""
  path = RESULTS / "sst2.json"
  old = json.loads(path.read_text())["rows"] if path.is_file() else []
  new = {_key(r): r for r in rows}
  out = [new.pop(_key(r), r) for r in old]
  return out + list(new.values())


def write(rows: list[dict], args, started: float, command: str) -> None:
  RESULTS.mkdir(parents=True, exist_ok=True)
  path = RESULTS / "sst2.json"
  saved = json.loads(path.read_text()) if path.is_file() else {}
  commands = saved.get("commands", [saved["command"]] if "command" in saved else [])
  if getattr(args, "merge", False):
    rows = merged(rows)
    commands = [c for c in commands if c != command] + [command]
  else:
    commands = [command]
  meta = {"command": command, "commands": commands, "wall_time_s": time.time() - started,
          "machine": platform.machine(), "cpu": cpu_model(), "cpus": os.cpu_count(),
          "args": vars(args)}
  path.write_text(json.dumps({**meta, "rows": rows}, indent=1))
  listed = "\n".join(f"    {c}" for c in commands)
  text = (f"# SST-2 fine-tuning methods (all-MiniLM-L6-v2)\n\nCommands (each row's own "
          f"`picpq finetune` command is in `sst2.json`):\n\n{listed}\n\n"
          f"Last invocation's wall time: {meta['wall_time_s'] / 60:.1f} min on a shared "
          f"{os.cpu_count()}-CPU machine ({meta['cpu']}, XLA:CPU).\n\nDev accuracy on a fixed sample of "
          f"{args.eval_size} dev sentences (start acc: the head the run started from, on the "
          f"same sentences; several seeds: mean ± sample sd [min, max]); memory from "
          f"`memory_analysis()` of the compiled training step (batch {args.batch_size}, "
          f"sequences trimmed to the longest training sentence, at most {args.max_len} "
          f"tokens); peak RSS of the run's process. *: `--zo-part head` and `ffn` rows, whose "
          f"step runs on activations made once by an inference pass: args+temp is the larger "
          f"of that pass (the evaluation program, batch 64) and the step's args + temp + the "
          f"cached activations (all clients' for FedKSeed).\n\n{table(rows)}\n")
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
  parser.add_argument("--seeds", default="0", help="comma-separated seeds of the ZO rows")
  parser.add_argument("--only", default="", help="comma-separated row names to run (all: '')")
  parser.add_argument("--fed-ks", default="", help="ks of the federated rows ('': the first)")
  parser.add_argument("--head", default="random", help="--head of the first-order and FedIT rows")
  parser.add_argument("--zo-head", default="labels", help="--head of the ZO rows")
  parser.add_argument("--zo-lr", type=float, default=1e-5)
  parser.add_argument("--zo-eps", type=float, default=1e-3)
  parser.add_argument("--zo-part", default="full")
  parser.add_argument("--zo-layers", type=int, default=0,
                      help="ZO rows with --zo-part head: --zo-layers (top encoder blocks)")
  parser.add_argument("--zo-dropout", type=float, default=0.0)
  parser.add_argument("--zo-n", type=int, default=1, help="ZO rows: --mezo-n (n-SPSA)")
  parser.add_argument("--zo-l2", type=float, default=0.0,
                      help="ZO rows with --zo-part head or ffn: --head-l2 (pull towards "
                      "the start)")
  parser.add_argument("--zo-full-batch", action="store_true",
                      help="ZO rows: --batch-size 2k (all k-shot examples, per client)")
  parser.add_argument("--zo-checkpoint-every", type=int, default=50,
                      help="ZO rows: --checkpoint-every (thousands of 0.5 ms head steps)")
  parser.add_argument("--merge", action="store_true",
                      help="add these rows to those in results/sst2.json (same name, k, "
                      "seed and head: replaced) instead of starting a new table")
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
  args.seeds = [int(x) for x in args.seeds.split(",")]
  args.fed_ks = [int(k) for k in args.fed_ks.split(",") if k]
  args.only = [n for n in args.only.split(",") if n]
  command = "python -m experiments.finetune.sst2 " + shlex.join(sys.argv[1:])
  started = time.time()
  rows = []
  for name, k, seed, options in runs(args):
    workdir = os.path.join(args.workdir, f"{name}_k{k}_s{seed}" + (
        f"_{args.head}" if name not in ZO and not name.startswith(ZO) else ""))
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
    rows.append(row(name, k, r, shlex.join(argv),
                    json.loads((Path(workdir) / "config.json").read_text())))
    print(f"  {name} k={k} seed {seed}: start {rows[-1]['start_accuracy']}, acc "
          f"{r['eval_accuracy']:.3f}, temp "
          f"{r['step_memory']['temp_bytes'] / MIB:.1f} MiB, step {r['median_step_s']:.3f} s, "
          f"run {r['wall_time_s']:.0f} s", flush=True)
    write(rows, args, started, command)
  write(rows, args, started, command)
  print(table(rows))


if __name__ == "__main__":
  main()
