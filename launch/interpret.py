r"""Look inside a trained network: filters, active units, the effective filter at a pixel.

  python launch/interpret.py --workdir=runs/poisson
  python launch/interpret.py --workdir=runs/poisson --method=e2e --slice=10 --pixel=160,140

--method and --depth pick the network (default: the run's first method, deepest network); the
run's other settings come from WORKDIR/config.json. Draws, for validation slice --slice, each
hidden layer's filters, the share of active ReLU units per layer, and the linear filter that
produced pixel --pixel (the network is piecewise linear: the Jacobian row at the pixel), into
--out_dir (default WORKDIR/figures/interpret/<method>_d<depth>; for other data than the run's,
--data_dir elsewhere, the same under WORKDIR/eval_<data_dir name>[_first<n>]/) with
interpret.json.
"""
import json
import sys
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # This checkout's lwjax, first.

from lwjax import cli
from lwjax import config

_SLICE = flags.DEFINE_integer("slice", None, "index of a validation slice, in file then slice "
                              "order (skipped empty slices not counted; default: the middle one)")
_PIXEL = flags.DEFINE_string("pixel", "", "row,col of the effective filter (default: the centre)")
_OUT_DIR = flags.DEFINE_string("out_dir", "", "output folder")
SHOWN = {"workdir": "data", "data_dir": "data", "max_val_volumes": "data", "cache_dir": "data",
         "slice": "data", "method": "methods", "depth": "network", "pixel": "output",
         "out_dir": "output", "eval_batch_size": "runtime", "conv_fusion": "runtime"}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  try:
    pixel = tuple(int(p) for p in _PIXEL.value.split(",")) if _PIXEL.value else None
  except ValueError:
    return cli.fail(ValueError(f"--pixel={_PIXEL.value!r}: expected row,col"))
  from lwjax import console, evaluate, interpret  # After the flags: --help stays fast.
  from lwjax.training import runtime
  runtime.configure_xla(fv.conv_fusion)
  try:
    result = interpret.run(
        fv.workdir, method=fv.method if fv["method"].present else None,
        depth=fv.depth if fv["depth"].present else None, slice_index=_SLICE.value, pixel=pixel,
        out_dir=_OUT_DIR.value or None,
        **evaluate.overrides_from_flags(fv, used=("method", "depth")))
  except (ValueError, FileNotFoundError) as e:
    return cli.fail(e)
  print(json.dumps({k: v for k, v in result.items() if k != "figures"}, indent=1))
  for path in result["figures"].values():
    print(f"wrote {path}")
  print(console.next_step("interpret", fv.workdir))
  return 0


if __name__ == "__main__":
  config.define_flags()
  cli.trained_network_flags("the training run whose network to look into")
  cli.run(main, __doc__, SHOWN)
