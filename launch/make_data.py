r"""Write a synthetic multi-coil dataset in the fastMRI layout (train/ and val/ of .h5 files).

  python launch/make_data.py --out_dir=data/synth
  python launch/make_data.py --out_dir=/tmp/tiny --size=32 --coils=4 --slices=3

A finished dataset made with the same flags is reused; otherwise its synth_*.h5 files are rewritten.
"""
import sys
from pathlib import Path

from absl import app
from absl import flags

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # This checkout's lwjax, first.

from lwjax import cli
from lwjax import data, fastmri

_OUT_DIR = flags.DEFINE_string("out_dir", None, "Dataset directory.", required=True)
_SIZE = flags.DEFINE_integer(
    "size", 320, "Image grid side; k-space is 2*size x (size + size//8), as fastMRI knee.")
_COILS = flags.DEFINE_integer("coils", 15, "Receive coils.")
_TRAIN = flags.DEFINE_integer("train_subjects", 30, "Training subjects (files).")
_VAL = flags.DEFINE_integer("val_subjects", 6, "Validation subjects (files).")
_SLICES = flags.DEFINE_integer("slices", 16, "Slices per subject.")
_SEED = flags.DEFINE_integer("seed", 0, "Dataset seed (each subject derives its own).")
_NOISE = flags.DEFINE_float("noise_std", 0.01, "k-space noise std, relative to the image maximum.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  out = data.make_synthetic_dataset(
      _OUT_DIR.value, train_subjects=_TRAIN.value, val_subjects=_VAL.value, slices=_SLICES.value,
      coils=_COILS.value, size=_SIZE.value, seed=_SEED.value, noise_std=_NOISE.value)
  for split in fastmri.SPLITS:
    for path in fastmri.list_volumes(out, split):
      print(f"{path}: kspace {fastmri.open_volume(path).kspace_shape}")


if __name__ == "__main__":
  cli.run(main, __doc__, {"out_dir": "output", "size": "data", "coils": "data",
                          "train_subjects": "data", "val_subjects": "data", "slices": "data",
                          "seed": "data", "noise_std": "data"})
