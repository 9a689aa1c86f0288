r"""How large a batch fits: memory of one training step, end to end vs each layer-wise stage.

  python launch/memory.py --flagfile=poisson.flags --budget_gb=12
  python launch/memory.py --flagfile=poisson.flags --budget_gb=12 --json_out=memory.json --measure
  python launch/memory.py --flagfile=poisson.flags --model=unrolled --method=e2e,layerwise \
      --e2e_depths= --unroll_iters=5 --coils=15

Compiles the trainer's step for the flags' network and image size (no data, no training; a CPU
will do) and prints, for e2e at --depth and every layer-wise stage, the bytes one step needs at
--batch_size and the largest batch within --budget_gb (paper figure 4); for --model=unrolled, e2e
through --unroll_iters iterations and one stage (every stage trains one iteration: the same step),
with --coils coils. Writes the bar chart
memory_<method>.png per layer-wise method to --figure_dir and, with --json_out, the report
as JSON. --measure runs the steps on an accelerator and prints the measured peak next to the
prediction. See lwjax/memory.py for what is counted. With --workdir=W of a run (W/config.json),
given on the command line or in a flagfile, the run's settings are analysed, and the flags given
replace them.
"""
import dataclasses
import json
import sys
from pathlib import Path

from absl import app
from absl import flags
from absl import logging

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # This checkout's lwjax, first.

from lwjax import cli
from lwjax import config

_BUDGET_GB = flags.DEFINE_float("budget_gb", 12.0, "memory budget of one device, GiB (2**30 bytes)")
_JSON_OUT = flags.DEFINE_string("json_out", "", "write the report as JSON to this file")
_FIGURE_DIR = flags.DEFINE_string("figure_dir", "", "bar charts go here; empty: WORKDIR/figures")
_COILS = flags.DEFINE_integer("coils", 15, "--model=unrolled: receive coils of the data-consistency "
                              "steps (fastMRI knee: 15)")
_MEASURE = flags.DEFINE_bool("measure", False, "also run the steps on the accelerator and compare "
                             "the prediction with its measured peak memory")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  cfg = config.from_flags()
  run = Path(cfg.workdir) / "config.json"
  # A run's workdir, named (the default "workdir" may hold an unrelated run): analyse that run,
  # with the flags given replacing its settings.
  try:
    if flags.FLAGS["workdir"].present and run.exists():
      cfg = config.from_flags(base=config.load(run))
      given = sorted(f.name for f in dataclasses.fields(cfg) if flags.FLAGS[f.name].present)
      logging.info("the settings of %s, with %s from the flags", run, ", ".join(given) or "none")
    config.validate(cfg, num_devices=1)  # Before JAX is imported: a bad flag is refused at once.
  except ValueError as e:
    return cli.fail(e)
  from lwjax import figures, memory  # Imported after the flags are checked.
  from lwjax.training import runtime
  runtime.configure_xla(cfg.conv_fusion)
  try:
    rep = memory.report(cfg, int(_BUDGET_GB.value * 2**30), coils=_COILS.value,
                        log=logging.info)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1
  if _MEASURE.value:
    try:
      rep["measured"] = memory.measure(cfg, rep, log=logging.info)
    except RuntimeError as e:
      print(f"--measure: {e}; reporting the compiled analysis only", file=sys.stderr)
  print(memory.format_table(rep))
  for m in rep.get("measured", []):
    measured = f"{m['measured'] / 2**30:.3g}" if m["measured"] else "n/a (below an earlier peak)"
    print(f"measured {m['network']} at batch {m['batch']}: {measured} GiB "
          f"(predicted {m['predicted'] / 2**30:.3g} GiB)")
  figure_dir = Path(_FIGURE_DIR.value or Path(cfg.workdir) / "figures")
  for method in config.LAYERWISE:
    if method in rep:
      path = figures.memory_bars({**rep, "layerwise": rep[method]},
                                 figure_dir / f"memory_{method}.png", method=method)
      print(f"wrote {path}")
  if _JSON_OUT.value:
    Path(_JSON_OUT.value).parent.mkdir(parents=True, exist_ok=True)
    Path(_JSON_OUT.value).write_text(json.dumps(rep, indent=1))
    print(f"wrote {_JSON_OUT.value}")
  return 0


if __name__ == "__main__":
  config.define_flags()
  cli.run(main, __doc__, {**cli.config_flags(), "budget_gb": "runtime", "coils": "data",
                          "measure": "runtime", "json_out": "output", "figure_dir": "output"})
