"""How the gates of a convex stage 1 couple its groups: the spectrum of A = E_w[D_p D_q].

``K_pq = X^T diag(D_p D_q) X / M``; were the gates independent of the patches' directions,
K would be ``A (x) S``, so A's conditioning adds to S's what the separable metric ``I (x) S`` of
pfista cannot undo. Each pixel is weighted by its patch energy (its row of X). Prints A's
spectrum for P = 4, 16, 64 gates of 5x5 and 7x7 filters on the run's training inputs x (stage
1's h), for today's seeded Gaussian filters and with ``--white`` for the same filters whitened
by the patch covariance (``u -> S^-1/2 u``).

  python bench/gate_coupling.py --flagfile=demo.flags --data_dir=runs/demo/data [--white]
"""
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from absl import app
from absl import flags

# The repository's lwjax (this working tree), installed or not.
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))
from lwjax import config  # noqa: E402
from lwjax import experiment  # noqa: E402
from lwjax.stages import gated  # noqa: E402
from lwjax.stages import precond  # noqa: E402

config.define_flags()
flags.DEFINE_bool("white", False, "whiten the gate filters by the patch covariance")
FLAGS = flags.FLAGS


def coupling(x, kernel_size: int, num: int, white: bool, seed: int) -> np.ndarray:
  """A (num, num) float64: the patch-energy-weighted co-activation on x of stage 1's gates
  (``--gate_seed``)."""
  u = gated.gate_filters(seed, kernel_size, 2, x.shape[-1], num)
  if white:
    s, _ = precond.patch_covariance(lambda: iter([(x, None, None)]), (kernel_size,) * 2,
                                    rows_per_example=x.shape[1] * x.shape[2], seed=0)
    q, lam = precond.factorise(s, 1e-6)
    u = gated.whiten(u, q, lam)
  d = np.asarray(gated.gates(x, u), np.float64).reshape(-1, num)
  ones = jnp.ones((kernel_size, kernel_size, x.shape[-1], 1), jnp.float32)
  energy = np.asarray(gated.conv(jnp.square(x), ones), np.float64).reshape(-1)
  return (d * energy[:, None]).T @ d / energy.sum()


def main(argv):
  del argv
  cfg = config.from_flags()
  train, = experiment.load_data(cfg, splits=("train",))
  x = jnp.asarray(train.x, jnp.float32)
  print(f"x {x.shape}, gate filters {'whitened' if FLAGS.white else 'seeded Gaussian'}")
  print("k   P   diag   off-diag  eig max (P/4 + 1/4)  2nd     min      cond")
  for k in (5, 7):
    for p in (4, 16, 64):
      a = coupling(x, k, p, FLAGS.white, cfg.gate_seed)
      ev = np.linalg.eigvalsh(a)
      off = a[~np.eye(p, dtype=bool)]
      print(f"{k}  {p:2d}   {np.mean(np.diag(a)):.3f}  {np.mean(off):.3f}     {ev[-1]:6.2f} "
            f"({p / 4 + 0.25:5.2f})        {ev[-2]:.3f}   {ev[0]:.2e} {ev[-1] / ev[0]:.1e}")


if __name__ == "__main__":
  app.run(main)
