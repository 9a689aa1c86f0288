"""Per-phase wall time and, for certified convex stages, the duality gap against passes.

Reads a run's ``metrics.jsonl`` (every record carries its ``time``). A phase runs from the
previous phase's last record to its own last record (its evaluation included), so the
preparation passes of a convex stage (beta_max, covariance, eigh, L_H) and its compiles count.

  python bench/phase_times.py WORKDIR [--log=TRAIN_LOG] [--json_out=FILE]

With ``--log`` (the trainer's console output) the first phase starts at the log's first
"network 1 of" line, after data preparation; without it, at its own first record.
"""
import datetime
import re
import sys
from pathlib import Path

import numpy as np

# The repository's lwjax (this working tree), installed or not.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from lwjax import files  # noqa: E402


def log_start(log: str, year: int) -> float:
  """Unix time of the absl line that announces the first network (``I1204 17:28:29.53 ...``)."""
  for line in log.splitlines():
    m = re.match(r"I(\d\d)(\d\d) (\d\d:\d\d:\d\d\.\d+) .*\] network 1 of", line)
    if m:
      stamp = datetime.datetime.strptime(f"{year}-{m[1]}-{m[2]} {m[3]}", "%Y-%m-%d %H:%M:%S.%f")
      return stamp.timestamp()
  raise ValueError("no 'network 1 of' line in the log")


def phase_times(records: list[dict], start=None) -> list[dict]:
  """One row per phase in the order it ran: seconds, epochs, median epoch seconds, checks."""
  rows: dict[str, dict] = {}
  start = start if start is not None else (records[0]["time"] if records else 0.0)
  last = start
  for r in records:
    # Evaluations are logged per network as "<method>_d<depth>": charge them to the phase before.
    phase = r.get("phase", "")
    row = rows.get(phase)
    if r.get("event") == "eval" and row is None and rows:
      row = rows[next(reversed(rows))]
    if row is None:
      row = rows[phase] = {"phase": phase, "begin": last, "epoch_s": [], "checks": []}
    if "epoch_s" in r:
      row["epoch_s"].append(r["epoch_s"])
    if r.get("event") == "check":
      row["checks"].append((int(r["epoch"]), r["rel_gap"]))
    if r.get("event") == "stage_done":
      row["rel_gap"], row["passes"] = r.get("rel_gap"), r.get("passes")
    row["end"] = last = r["time"]
  out = []
  for row in rows.values():
    epoch_s = row.pop("epoch_s")
    out.append({**row, "seconds": row["end"] - row["begin"], "epochs": len(epoch_s),
                "median_epoch_s": float(np.median(epoch_s)) if epoch_s else None})
  return out


def main(argv: list[str]) -> None:
  workdir = Path(argv[1])
  json_out = next((a.split("=", 1)[1] for a in argv[2:] if a.startswith("--json_out=")), None)
  records = [r for r in files.read_json_lines(workdir / "metrics.jsonl") if "time" in r]
  log = next((a.split("=", 1)[1] for a in argv[2:] if a.startswith("--log=")), None)
  start = None
  if log:
    year = datetime.datetime.fromtimestamp(records[0]["time"]).year
    start = log_start(Path(log).read_text(errors="replace"), year)
  rows = phase_times(records, start)
  print(f"{'phase':24s} {'seconds':>8s} {'epochs':>6s} {'s/epoch':>8s}  gap (passes)")
  for row in rows:
    print(f"{row['phase']:24s} {row['seconds']:8.1f} {row['epochs']:6d} "
          f"{row['median_epoch_s'] or 0:8.3f}  " + " ".join(f"{g:.1e}({e})" for e, g in row["checks"]))
  groups: dict[str, float] = {}
  for row in rows:
    method = row["phase"].rsplit("_", 1)[0]
    groups[method] = groups.get(method, 0.0) + row["seconds"]
  print("total seconds per method: " + ", ".join(f"{k} {v:.1f}" for k, v in groups.items()))
  if json_out:
    files.write_json(json_out, {"phases": rows, "per_method_s": groups}, sort_keys=False)


if __name__ == "__main__":
  main(sys.argv)
