r"""Reconstruct new files with a trained network, in fastMRI's submission layout.

  python launch/reconstruct.py --workdir=runs/demo --data_dir=knee/multicoil_test --out_dir=out
  python launch/reconstruct.py --workdir=runs/poisson --method=e2e --depth=5 --data_dir=D \
      --out_dir=O

Writes, for every .h5 file in --data_dir (a folder of fastMRI multi-coil files), OUT_DIR/<same
name> with the key "reconstruction": (slices, h, w) float32 magnitudes at the header's
reconstruction size (reconSpace, 320x320 for fastMRI). Fully sampled files are undersampled with
the run's mask, as in training; undersampled ones (fastMRI test/challenge files, a "mask" key)
use their own mask, with a warning when it differs from the run's. Every file is checked before
any is reconstructed, with the same errors as training. 2D CNN runs.
"""
import sys
from pathlib import Path

from absl import app
from absl import flags
from absl import logging

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # This checkout's lwjax, first.

from lwjax import cli
from lwjax import config

_OUT_DIR = flags.DEFINE_string("out_dir", "", "folder of the reconstructions, one .h5 per file")
SHOWN = {"workdir": "data", "data_dir": "data", "method": "methods", "depth": "network",
         "eval_batch_size": "runtime", "conv_fusion": "runtime", "out_dir": "output"}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  for name in ("data_dir", "out_dir"):
    if not fv[name].value:
      return cli.fail(ValueError(f"--{name} is required"))
  from lwjax import data, inference  # After the flags: --help stays fast.
  from lwjax.data import fastmri
  from lwjax.training import runtime
  runtime.configure_xla(fv.conv_fusion)
  try:
    recon = inference.load(fv.workdir, fv.method if fv["method"].present else None,
                           fv.depth if fv["depth"].present else None,
                           batch_size=fv.eval_batch_size if fv["eval_batch_size"].present
                           else None)
    files = inference.h5_files(fv.data_dir)
    for path in files:  # Every file is checked before any is written.
      fastmri.open_volume(path, undersampled=True)
    run_mask = data.checked_mask(data.prep_config(recon.cfg))
    logging.info("%s depth %d of %s on %d file(s) of %s", recon.method, recon.depth, fv.workdir,
                 len(files), fv.data_dir)
    for i, path in enumerate(files, 1):
      out = inference.reconstruct_file(recon, path, _OUT_DIR.value, run_mask)
      logging.info("file %d of %d: wrote %s", i, len(files), out)
  except (ValueError, FileNotFoundError) as e:
    return cli.fail(e)
  print(f"wrote {len(files)} file(s) to {_OUT_DIR.value} (key 'reconstruction': magnitude "
        "images per slice, fastMRI's submission layout)")
  return 0


if __name__ == "__main__":
  config.define_flags()
  cli.trained_network_flags("the training run whose network reconstructs")
  flags.FLAGS["data_dir"].help = "a folder of fastMRI multi-coil .h5 files to reconstruct"
  cli.run(main, __doc__, SHOWN)
