"""Volume patches for 3D networks: consecutive slices of one file, at one scale."""
import numpy as np

from lwjax.data.splits import Split


def volume_patches(split: Split, depth: int) -> np.ndarray:
  """(M, depth) int: each volume patch's slices (indices into ``split``), see ``to_volumes``.
  Raises ValueError naming ``--volume_depth`` when no file has ``depth`` slices."""
  if depth < 1:
    raise ValueError(f"--volume_depth={depth}: expected >= 1")
  groups, longest = [], 0
  for v in np.unique(split.volume_index):
    rows = np.flatnonzero(split.volume_index == v)
    index = np.array([split.ids[r][1] for r in rows])
    order = np.argsort(index, kind="stable")
    rows, index = rows[order], index[order]
    # Runs of consecutive slices: a skipped slice (Split.skipped) breaks a run.
    for run in np.split(rows, np.flatnonzero(np.diff(index) != 1) + 1):
      longest = max(longest, len(run))
      groups += [run[i:i + depth] for i in range(0, len(run) - depth + 1, depth)]
  if not groups:
    raise ValueError(f"--volume_depth={depth}: expected at most the longest run of consecutive "
                     f"slices of a file ({longest}; skipped slices break runs), or no volume "
                     "patch fits")
  return np.stack(groups)


def to_volumes(split: Split, depth: int) -> dict[str, np.ndarray]:
  """Volume patches for 3D networks: ``depth`` consecutive slices of one file, slices as axis 1.

  Each run of consecutive slices of a file (a skipped slice ends a run) is cut into
  non-overlapping patches of ``depth``; the run's last ``len(run) % depth`` slices are dropped
  and no patch mixes two files or spans a skipped slice. The slices of a patch are brought to
  one scale, the patch's: each was divided by its own ``max |x|`` (``Split.scale``), so they are
  multiplied by ``scale_slice / scale_patch`` with ``scale_patch`` the largest of them (then
  ``max |x| = 1`` over the patch and the slices keep their relative intensities). The
  slice-wise metrics do not change under this per-slice rescaling.

  Returns:
    dict(x=(M, depth, h, w, 2) float32, y=(M, depth, h, w, 2) float32, scale=(M,) float32 the
    patches' scales, volume_index=(M,) int the patches' files, slices=(M, depth) int the patches'
    slices as indices into ``split``), and ``maps`` and ``kspace`` (M, depth, C, h, w) complex64
    when the split has them (``kspace`` rescaled like ``x``).
  """
  slices = volume_patches(split, depth)  # (M, depth)
  patch_scale = split.scale[slices].max(axis=1)
  factor = (split.scale[slices] / patch_scale[:, None]).astype(np.float32)  # (M, depth)
  out = {"x": split.x[slices] * factor[..., None, None, None],
         "y": split.y[slices] * factor[..., None, None, None],
         "scale": patch_scale.astype(np.float32),
         "volume_index": split.volume_index[slices[:, 0]], "slices": slices}
  if split.maps is not None:
    out["maps"] = split.maps[slices]
  if split.kspace is not None:
    out["kspace"] = split.kspace[slices] * factor[..., None, None, None]
  return out


def example_arrays(cfg, split: Split,
                   keys: tuple[str, ...] = ("x", "y")) -> tuple[dict, np.ndarray]:
  """The examples the networks of ``cfg`` train and are evaluated on, and their slices.

  Slices, or for 3D networks volume patches of ``--volume_depth`` consecutive slices of one file
  (``to_volumes``: slices that fill no patch are dropped). Returns ``({key: array}, slices)``,
  ``slices`` the examples' slices as indices into ``split``, in the order of the examples
  flattened to slices."""
  if cfg.ndim == 3:
    volumes = to_volumes(split, cfg.volume_depth)
    return {k: volumes[k] for k in keys}, volumes["slices"].reshape(-1)
  return {k: getattr(split, k) for k in keys}, np.arange(len(split.x))
