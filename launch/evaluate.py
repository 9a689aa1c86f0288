r"""Evaluate a finished training run: per-slice metrics, report and figures.

  python launch/evaluate.py --workdir=runs/poisson
  python launch/evaluate.py --workdir=runs/poisson --data_dir=/data/fastmri/knee

Reads the run's WORKDIR/config.json (--data_dir, --max_val_volumes (0: all files),
--eval_batch_size and --cache_dir, when given, override it) and its saved networks, and writes
WORKDIR/eval.json, WORKDIR/report.md and the figures in WORKDIR/figures/ (metrics against depth,
example slices, training curves). Data other than the run's own validation data (--data_dir
elsewhere, or another --max_val_volumes) goes to WORKDIR/eval_<data_dir name>[_first<n>]/
instead (_first<n> when --max_val_volumes=n leaves files out), so the run's own evaluation is
kept; --out_dir chooses the folder.
"""
import sys
from pathlib import Path

from absl import app
from absl import flags
from absl import logging

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # This checkout's lwjax, first.

from lwjax import cli
from lwjax import config

_OUT_DIR = flags.DEFINE_string("out_dir", "", "output folder (default: WORKDIR for the run's own "
                               "validation data, WORKDIR/eval_<data_dir name> for other data)")
# The flags this launcher reads (evaluate.OVERRIDABLE, --workdir, --conv_fusion), by topic.
SHOWN = {"workdir": "data", "data_dir": "data", "max_val_volumes": "data", "cache_dir": "data",
         "eval_batch_size": "runtime", "conv_fusion": "runtime", "out_dir": "output"}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from lwjax import console, evaluate  # Imported after flag parsing: --help stays fast.
  from lwjax.training import runtime
  runtime.configure_xla(flags.FLAGS.conv_fusion)
  try:
    result = evaluate.run(flags.FLAGS.workdir, log=logging.info, out_dir=_OUT_DIR.value or None,
                          **evaluate.overrides_from_flags(flags.FLAGS))
  except (ValueError, FileNotFoundError) as e:
    return cli.fail(e)
  print("per slice (the paper's means over slices):")
  print("\n".join(evaluate.mean_lines(result["mean"])))
  print(f"per volume (fastMRI's convention, means over {len(result['volumes'])} files):")
  print("\n".join(evaluate.mean_lines(result["volume_mean"])))
  print(console.next_step("evaluate", flags.FLAGS.workdir))
  return 0


if __name__ == "__main__":
  config.define_flags()
  flags.FLAGS["workdir"].help = "the training run to evaluate (its config.json and networks)"
  flags.FLAGS["data_dir"].help = "evaluate this fastMRI root's val/ split; empty: the run's data"
  cli.run(main, __doc__, SHOWN)
