"""Choose MeZO's settings on a split carved from SST-2's *training* data.

Each setting (the part MeZO perturbs, learning rate, perturbation scale ``eps``) is
one ``picpq finetune --method mezo`` run from the label-prompt head (``--head
labels``) on k examples per class, scored every ``--eval-every`` steps on
``--eval-size`` sentences of ``train.tsv`` that are not among the training examples
(``--eval-split train``): the dev sentences the results table reports are never
read. The step budget is read off those curves. Writes ``results/zo_sweep.json``
and ``results/zo_sweep.md``.

Command (from the repo root):

    .venv/bin/python -m experiments.finetune.zo_sweep --k 16 --steps 100 \\
        --eval-every 25 --grid full:1e-4:1e-3,full:1e-3:1e-3,bitfit:1e-3:1e-3
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def settings(grid: str) -> list[tuple[str, str, str]]:
  """``"part:lr:eps,..."`` -> ``[(part, lr, eps), ...]``."""
  return [tuple(item.split(":")) for item in grid.split(",") if item]


def curve(workdir: Path, start: dict | None = None) -> list[dict]:
  """The held-out evaluations of a run, ``[{"step", "eval_accuracy", "eval_loss"}]``,
  the start (step 0) first. A run stopped before its end (no ``results.json``) gives
  the evaluations it logged, after ``start`` (the same head on the same sentences)."""
  path = workdir / "results.json"
  results = json.loads(path.read_text()) if path.is_file() else None
  points = [{"step": 0, **(results["start_eval"] if results else start)}]
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "eval_accuracy" in row:
      points.append({k: row[k] for k in ("step", "eval_accuracy", "eval_loss")})
  if results and points[-1]["step"] != results["steps"]:
    points.append({"step": results["steps"], "eval_accuracy": results["eval_accuracy"],
                   "eval_loss": results["eval_loss"]})
  return points


def table(rows: list[dict]) -> str:
  steps = sorted({p["step"] for r in rows for p in r["curve"]})
  lines = ["| k | seed | part | lr | eps | " + " | ".join(f"acc@{s}" for s in steps) + " |",
           "|---|---|---|---|---|" + "---|" * len(steps)]
  for r in rows:
    acc = {p["step"]: p["eval_accuracy"] for p in r["curve"]}
    stopped = "" if r.get("finished", True) else " (stopped)"
    lines.append(f"| {r['k']} | {r['seed']} | {r['part']}{stopped} | {r['lr']} | {r['eps']} | "
                 + " | ".join(f"{acc[s]:.3f}" if s in acc else "-" for s in steps) + " |")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--data", default="../shared/data/sst2")
  parser.add_argument("--k", type=int, default=16)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--steps", type=int, default=100)
  parser.add_argument("--eval-every", type=int, default=25)
  parser.add_argument("--eval-size", type=int, default=500)
  parser.add_argument("--grid", default="full:1e-4:1e-3,full:1e-3:1e-3,bitfit:1e-3:1e-3")
  parser.add_argument("--extra", default="--dropout 0",
                      help="more picpq finetune options, one string")
  parser.add_argument("--workdir", default="runs/zo_sweep")
  parser.add_argument("--name", default="zo_sweep", help="results/<name>.json and .md")
  parser.add_argument("--collect", action="store_true",
                      help="run nothing: tabulate the runs already in --workdir (a run "
                      "stopped early shows the evaluations it logged)")
  args = parser.parse_args()
  command = "python -m experiments.finetune.zo_sweep " + shlex.join(sys.argv[1:])
  rows = []
  for part, lr, eps in settings(args.grid):
    workdir = Path(args.workdir) / f"k{args.k}_s{args.seed}_{part}_lr{lr}_eps{eps}"
    argv = ["finetune", "--method", "mezo", "--head", "labels", "--zo-part", part,
            "--lr", lr, "--mezo-eps", eps, "--k", str(args.k), "--seed", str(args.seed),
            "--steps", str(args.steps), "--eval-every", str(args.eval_every),
            "--eval-split", "train", "--eval-size", str(args.eval_size), "--data", args.data,
            *shlex.split(args.extra), "--workdir", str(workdir), "--no-progress"]
    done = (workdir / "results.json").is_file() and json.loads(
        (workdir / "results.json").read_text()).get("finished")
    t0 = time.time()
    if args.collect:
      if not (workdir / "metrics.jsonl").is_file():
        continue
      finished = sorted(Path(args.workdir).glob(f"k{args.k}_s{args.seed}_*/results.json"))
      start = json.loads(finished[0].read_text())["start_eval"] if finished else None
      if not done and start is None:
        continue
    elif not done:
      proc = subprocess.run([sys.executable, "-m", "picpq_jax.cli", *argv],
                            capture_output=True, text=True)
      if proc.returncode:
        print(proc.stderr[-3000:], flush=True)
        continue
      done = json.loads((workdir / "results.json").read_text()).get("finished")
    rows.append({"part": part, "lr": lr, "eps": eps, "k": args.k, "seed": args.seed,
                 "curve": curve(workdir, start if args.collect else None),
                 "finished": bool(done), "command": "picpq " + shlex.join(argv)})
    print(f"{part} lr {lr} eps {eps}: "
          + ", ".join(f"{p['step']}:{p['eval_accuracy']:.3f}" for p in rows[-1]["curve"])
          + f" ({time.time() - t0:.0f} s)", flush=True)
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{args.name}.json"
    saved = json.loads(path.read_text()) if path.is_file() else {"rows": [], "commands": []}
    key = lambda r: (r["part"], r["lr"], r["eps"], r["k"], r["seed"])  # noqa: E731
    mine = {key(r) for r in rows}
    all_rows = [r for r in saved["rows"] if key(r) not in mine] + rows
    commands = [c for c in saved.get("commands", []) if c != command] + [command]
    path.write_text(json.dumps({"commands": commands, "rows": all_rows}, indent=1))
    listed = "\n".join(f"    {c}" for c in commands)
    (RESULTS / f"{args.name}.md").write_text(
        f"# MeZO settings on held-out training sentences\n\nCommands (every run's own "
        f"`picpq finetune` command is in `{args.name}.json`):\n\n{listed}\n\n"
        f"Accuracy on {args.eval_size} sentences of train.tsv outside the k training "
        f"examples; step 0 is the label-prompt start. Without ``--collect`` the same "
        f"command runs what is missing; \"(stopped)\": a run stopped before its last "
        f"step, with the evaluations it logged.\n\n{table(all_rows)}\n")
  print(table(rows))


if __name__ == "__main__":
  main()
