"""What the federated experiment scripts share: provenance of a run and writing results."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Callable, Sequence

import jax

ROOT = Path(__file__).resolve().parents[2]
SHARED_ZIP = ROOT.parent / "shared" / "data" / "cifar10" / "train.zip"
RESULTS = Path(__file__).resolve().parent / "results"


def provenance(module: str, argv: Sequence[str]) -> dict:
  """The command that reproduces a script's run, the commit, jax version, CPUs and date."""
  command = " ".join(["XLA_FLAGS=--xla_force_host_platform_device_count=8",
                      f".venv/bin/python -m {module}", *argv])
  commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                          text=True, cwd=ROOT).stdout.strip()
  return {"command": command, "commit": commit, "jax": jax.__version__,
          "cpus": os.cpu_count(), "date": time.strftime("%Y-%m-%d")}


def write_results(out: Path, stem: str, record: dict, markdown: Callable[[dict], str],
                  plot: Callable[[dict, Path], None]) -> None:
  """``out/<stem>.json``, ``.md`` (``markdown(record)``) and ``.png`` (``plot``)."""
  out.mkdir(parents=True, exist_ok=True)
  (out / f"{stem}.json").write_text(json.dumps(record, indent=2))
  (out / f"{stem}.md").write_text(markdown(record))
  plot(record, out / f"{stem}.png")
  print(f"wrote {out / f'{stem}.md'} in {record['wall_time_s'] / 60:.1f} min")
