"""The compressed ResNet-20 in onnxruntime on this CPU, against the exported float baseline.

Command (from the repo root; the compress run first, about 25 min on 2 busy cores):

    .venv/bin/picpq compress --from experiments/baselines/checkpoints/resnet20 \\
        --workdir runs/deploy/compress-r20 --criterion l1 --no-evolution --target 0.7 \\
        --ft-epochs 1 --qat-epochs 1
    .venv/bin/python -m experiments.deploy.onnx_cpu

exports the baseline (a `picpq train` run, float32) and the compress run (its packed
``model.npz``: compacted, 2-8-bit DoReFa) to ONNX and StableHLO with
``picpq export``'s code, then on the 5,000 held-out images of the baseline's
validation split measures: file sizes, accuracy, top-1 agreement and largest logit
difference of each exported model against its JAX model, and latency at batch 1
and 64 (medians of interleaved runs in one process, onnxruntime with ``--threads``
intra-op threads, and the StableHLO artifacts under XLA:CPU for comparison).
Writes ``experiments/deploy/results/onnx_cpu.{json,md}``. ``--quick`` runs a
smoke version on 500 of the embedded images (written to ``--workdir``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import jax
import numpy as np

from picpq_jax import data as pdata
from picpq_jax.deploy.command import ExportConfig, run_export
from picpq_jax.deploy.evaluate import evaluate, load_predictor, load_source
from picpq_jax.deploy.stablehlo import stablehlo_function

ROOT = Path(__file__).resolve().parents[2]
BASELINE = ROOT / "experiments" / "baselines" / "checkpoints" / "resnet20"
SHARED_ZIP = ROOT.parent / "shared" / "data" / "cifar10" / "train.zip"
RESULTS = Path(__file__).resolve().parent / "results"


def cpu_name() -> str:
  """``lscpu``'s model name, with the AVX-512 flags that matter to int8 and bf16 kernels."""
  try:
    text = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
  except (OSError, subprocess.CalledProcessError):
    return platform.processor()
  fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
  flags = fields.get("Flags", "").split()
  wanted = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8") if f in flags]
  return f"{fields.get('Model name', '?').strip()} ({fields.get('CPU(s)', '?').strip()} CPUs; " \
         f"{' '.join(wanted)})"


def held_out(data: str, val_size: int, seed: int) -> pdata.ImageDataset:
  """The validation split the baseline was trained without."""
  _, val = pdata.train_val_split(pdata.load_dataset(data, split="train"), val_size, seed)
  return val


def latencies(predictors: dict[str, object], images: np.ndarray, batches: tuple[int, ...],
              rounds: int) -> dict[str, dict[int, list[float]]]:
  """Seconds per call of each predictor at each batch size, ``rounds`` samples each,
  taken round-robin (every round times every predictor once per batch size) so that
  load from other processes falls on all of them alike."""
  samples = {name: {b: [] for b in batches} for name in predictors}
  for b in batches:
    for predict in predictors.values():  # warm-up (and compile the jitted ones)
      for _ in range(3):
        predict(images[:b])
  for r in range(rounds):
    for b in batches:
      x = images[(r * b) % (len(images) - b):][:b]
      for name, predict in predictors.items():
        start = time.perf_counter()
        predict(x)
        samples[name][b].append(time.perf_counter() - start)
  return samples


def op_profile(path: str, images: np.ndarray, threads: int, runs: int = 10
               ) -> tuple[dict[str, float], dict[str, int]]:
  """Milliseconds per run spent in each ONNX op type (onnxruntime's profiler), sorted,
  and the op counts of the graph onnxruntime runs after its optimizations."""
  import onnx  # pylint: disable=import-outside-toplevel
  import onnxruntime as ort  # pylint: disable=import-outside-toplevel
  options = ort.SessionOptions()
  options.intra_op_num_threads = threads
  options.enable_profiling = True
  options.profile_file_prefix = os.path.join(os.path.dirname(path), "profile")
  optimized = os.path.join(os.path.dirname(path), "optimized.onnx")
  options.optimized_model_filepath = optimized
  session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
  counts: dict[str, int] = {}
  for node in onnx.load(optimized).graph.node:
    counts[node.op_type] = counts.get(node.op_type, 0) + 1
  for _ in range(runs):
    session.run(None, {"images": images})
  with open(session.end_profiling(), encoding="utf-8") as f:
    events = json.load(f)
  totals: dict[str, float] = {}
  for e in events:
    if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
      op = e["args"]["op_name"]
      totals[op] = totals.get(op, 0.0) + e["dur"] / 1e3 / runs
  return dict(sorted(totals.items(), key=lambda kv: -kv[1])), counts


def jax_predictor(path: str):
  """The JAX model of a run or packed export: what the exports are checked against."""
  source = load_source(path)
  call = jax.jit(stablehlo_function(source.model, source.variables, source.mean, source.std))
  return lambda images: np.asarray(call(np.asarray(images, np.uint8)))


def measure(args) -> dict:
  models = {"float": str(args.baseline), "compressed": str(args.compressed)}
  meta = json.loads((Path(args.baseline) / "config.json").read_text())
  val = held_out(args.data, args.val_size or meta["val_size"], meta["seed"])
  record = {"cpu": cpu_name(), "onnxruntime_threads": args.threads, "images": len(val),
            "data": str(args.data), "rounds": args.rounds, "models": {}}
  import onnxruntime  # pylint: disable=import-outside-toplevel
  record["versions"] = {"jax": jax.__version__, "onnxruntime": onnxruntime.__version__,
                        "onnx": __import__("onnx").__version__}
  onnx_predict, hlo_predict = {}, {}
  for name, source in models.items():
    out = os.path.join(args.workdir, name)
    sizes = run_export(ExportConfig(source=source, out=out), print_fn=lambda s: None)
    onnx_path, hlo_path = (os.path.join(out, f) for f in ("model.onnx", "model.stablehlo"))
    reference = evaluate(jax_predictor(source), val, args.eval_batch)
    onnx_predict[name] = load_predictor(onnx_path, args.threads)
    hlo_predict[name] = load_predictor(hlo_path)
    entry = {"source": source, "jax_accuracy": reference["accuracy"]}
    for kind, predict, path in (("onnx", onnx_predict[name], onnx_path),
                                ("stablehlo", hlo_predict[name], hlo_path)):
      got = evaluate(predict, val, args.eval_batch)
      entry[kind] = {
          "file": path, "bytes": sizes[path], "accuracy": got["accuracy"], "loss": got["loss"],
          "top1_agreement_with_jax": float(np.mean(
              got["logits"].argmax(-1) == reference["logits"].argmax(-1))),
          "max_logit_diff_vs_jax": float(np.abs(got["logits"] - reference["logits"]).max()),
      }
    packed = Path(source) / "model.npz"
    if packed.exists():
      entry["packed_npz_bytes"] = packed.stat().st_size
    record["models"][name] = entry
  images = np.asarray(val.images[:max(args.batches) * 4])
  predictors = {f"onnx {n}": p for n, p in onnx_predict.items()}
  predictors.update({f"stablehlo {n}": p for n, p in hlo_predict.items()})
  record["load_average_before"] = os.getloadavg()
  samples = latencies(predictors, images, tuple(args.batches), args.rounds)
  record["load_average_after"] = os.getloadavg()
  record["op_ms_batch64"], record["optimized_graph_ops"] = {}, {}
  for name in models:
    record["op_ms_batch64"][name], record["optimized_graph_ops"][name] = op_profile(
        os.path.join(args.workdir, name, "model.onnx"), images[:64], args.threads)
  record["latency_s"] = {name: {str(b): {"median": float(np.median(s)), "min": float(np.min(s)),
                                         "samples": s} for b, s in per.items()}
                         for name, per in samples.items()}
  return record


def markdown(record: dict, command: str) -> str:
  """The README table and the details."""
  f, c = record["models"]["float"], record["models"]["compressed"]
  lat = record["latency_s"]
  ms = lambda name, b: 1e3 * lat[name][str(b)]["median"]
  lines = [
      "# Compressed ResNet-20 in onnxruntime vs the exported float baseline", "",
      f"Command: `{command}`", "",
      f"CPU: {record['cpu']}; onnxruntime {record['versions']['onnxruntime']} with "
      f"{record['onnxruntime_threads']} intra-op thread(s); {record['images']} held-out "
      f"CIFAR-10 images; latency = median of {record['rounds']} interleaved calls in one "
      f"process (load average {record['load_average_before'][0]:.1f} before, "
      f"{record['load_average_after'][0]:.1f} after: the 2 cores were shared).", "",
      "| onnxruntime | bytes | accuracy | top-1 agreement with its JAX model | batch 1 (ms) "
      "| batch 64 (ms) |", "|---|---|---|---|---|---|"]
  for name, e in (("float", f), ("compressed", c)):
    lines.append(f"| {name} | {e['onnx']['bytes']:,} | {e['onnx']['accuracy']:.4f} | "
                 f"{100 * e['onnx']['top1_agreement_with_jax']:.2f}% | "
                 f"{ms(f'onnx {name}', 1):.2f} | {ms(f'onnx {name}', 64):.1f} |")
  lines.append(f"| compressed / float | {c['onnx']['bytes'] / f['onnx']['bytes']:.3f} | | | "
               f"{ms('onnx compressed', 1) / ms('onnx float', 1):.2f} | "
               f"{ms('onnx compressed', 64) / ms('onnx float', 64):.2f} |")
  lines += ["", "The same models as `jax.export` StableHLO artifacts, run by XLA:CPU:", "",
            "| StableHLO | bytes | accuracy | top-1 agreement with its JAX model | batch 1 (ms) "
            "| batch 64 (ms) |", "|---|---|---|---|---|---|"]
  for name, e in (("float", f), ("compressed", c)):
    lines.append(f"| {name} | {e['stablehlo']['bytes']:,} | {e['stablehlo']['accuracy']:.4f} | "
                 f"{100 * e['stablehlo']['top1_agreement_with_jax']:.2f}% | "
                 f"{ms(f'stablehlo {name}', 1):.2f} | {ms(f'stablehlo {name}', 64):.1f} |")
  lines += ["", f"JAX accuracy: float {f['jax_accuracy']:.4f}, compressed "
            f"{c['jax_accuracy']:.4f}; largest logit difference, ONNX vs JAX: float "
            f"{f['onnx']['max_logit_diff_vs_jax']:.2e}, compressed "
            f"{c['onnx']['max_logit_diff_vs_jax']:.2e}."]
  for name in ("float", "compressed"):
    ops = record["op_ms_batch64"][name]
    top = ", ".join(f"{op} {t:.1f}" for op, t in list(ops.items())[:6])
    counts = record["optimized_graph_ops"][name]
    kept = ", ".join(f"{counts.get(op, 0)} {op}" for op in
                     ("Conv", "FusedConv", "ReorderInput", "BatchNormalization",
                      "DequantizeLinear", "QuantizeLinear"))
    lines.append(f"onnxruntime profile at batch 64, {name}: {sum(ops.values()):.1f} ms in ops "
                 f"({top}, ...); its optimized graph: {kept}.")
  if "packed_npz_bytes" in c:
    lines.append(f"The compress run's packed `model.npz` (weights bit-packed): "
                 f"{c['packed_npz_bytes']:,} bytes.")
  return "\n".join(lines) + "\n"


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--baseline", default=str(BASELINE))
  parser.add_argument("--compressed", default="runs/deploy/compress-r20")
  parser.add_argument("--data", default=str(SHARED_ZIP))
  parser.add_argument("--val-size", type=int, default=0, help="0: the baseline's val_size")
  parser.add_argument("--workdir", default="runs/deploy/exports")
  parser.add_argument("--threads", type=int, default=1)
  parser.add_argument("--rounds", type=int, default=50)
  parser.add_argument("--batches", type=int, nargs="+", default=[1, 64])
  parser.add_argument("--eval-batch", type=int, default=250)
  parser.add_argument("--name", default="onnx_cpu")
  parser.add_argument("--quick", action="store_true", help="embedded data, 3 rounds")
  args = parser.parse_args(argv)
  if args.quick:
    args.data, args.val_size, args.rounds, args.name = "embedded", 500, 3, args.name + "-quick"
  command = "python -m experiments.deploy.onnx_cpu" + (" --quick" if args.quick else "")
  record = measure(args)
  record["command"] = command
  results = Path(args.workdir) if args.quick else RESULTS  # a smoke run is not a result
  results.mkdir(parents=True, exist_ok=True)
  (results / f"{args.name}.json").write_text(json.dumps(record, indent=2))
  text = markdown(record, command)
  (results / f"{args.name}.md").write_text(text)
  print(text)


if __name__ == "__main__":
  main()
