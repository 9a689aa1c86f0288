r"""Write a synthetic multi-coil dataset in the fastMRI layout (train/ and val/ of .h5 files).

  python launch/make_data.py --out_dir=data/synth
  python launch/make_data.py --out_dir=/tmp/tiny --image_size=32 --synth_coils=4 --synth_slices=3

The same dataset a training run without --data_dir generates in WORKDIR/data, from the same
flags (a training flagfile works here too). A finished dataset made with the same flags is reused;
otherwise its synth_*.h5 files are rewritten.
"""
import sys
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # This checkout's lwjax, first.

from lwjax import cli
from lwjax import config

_OUT_DIR = flags.DEFINE_string("out_dir", None, "the dataset's folder (train/ and val/)",
                               required=True)
SHOWN = {"out_dir": "output",
         **cli.config_flags(["image_size", "synth_train_subjects", "synth_val_subjects",
                             "synth_slices", "synth_coils", "synth_noise", "synth_seed"])}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    cfg = cli.checked_config()
  except ValueError as e:
    return cli.fail(e)
  from lwjax import data  # After the flags: --help stays fast.
  from lwjax.data import fastmri
  out = data.synthetic_dataset(cfg, _OUT_DIR.value)
  for split in fastmri.SPLITS:
    for path in fastmri.list_volumes(out, split):
      print(f"{path}: kspace {fastmri.open_volume(path).kspace_shape}")
  return 0


if __name__ == "__main__":
  config.define_flags()
  flags.FLAGS["image_size"].help = ("image grid side; k-space is 2*size x (size + size//8), as "
                                    "fastMRI knee")
  cli.run(main, __doc__, SHOWN)
