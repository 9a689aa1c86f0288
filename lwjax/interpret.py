"""Looking inside a trained network: its filters, active units and the linear filter behind a pixel.

The network is piecewise linear in its input (ReLU layers, no normalisation), so around x the
row ``J_p`` of its Jacobian at pixel p is the filter that produced p:
``out_p - x_p = sum(J_p * x) + b_p`` (b_p the effective bias), computed by one vector-Jacobian
product on the pixel's receptive field (``effective_filter``). Images are (H, W, 2) or 3D patches
(D, H, W, 2); kernels HWIO (DHWIO); a pixel is (row, col) or (plane, row, col); a 3D network's
figures show the pixel's plane.
"""
import functools
from pathlib import Path
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lwjax import data as data_lib
from lwjax import evaluate
from lwjax import figures
from lwjax import files
from lwjax import inference
from lwjax import metrics as metrics_lib
from lwjax import models
from lwjax import nets
from lwjax.models import cnn
from lwjax.stages import certificate



def layer_filters(params) -> list[np.ndarray]:
  """Kernels of every layer in order: hidden ``(*k, C_in, C_out)`` ones, then the head's."""
  names = [f"convs_{i}" for i in range(nets.depth_of(params) - 1)] + ["head"]
  return [np.asarray(params[name]["kernel"]) for name in names]


def receptive_radius(params) -> tuple[int, ...]:
  """Pixels from p on which the output at p depends, per spatial axis (half the receptive field;
  anisotropic 3D kernels such as 3x7x7 give a smaller radius along the slices)."""
  return tuple(hi for _, hi in _receptive_extent(params))


def _receptive_extent(params) -> list[tuple[int, int]]:
  """Per spatial axis, how far before and after p the inputs that reach the output at p lie: a
  SAME conv of size k pads ``(k - 1) // 2`` before and ``k // 2`` after (equal for odd k)."""
  kernels = layer_filters(params)
  return [(sum((k.shape[axis] - 1) // 2 for k in kernels), sum(k.shape[axis] // 2 for k in kernels))
          for axis in range(kernels[0].ndim - 2)]


def receptive_field(params, pixel: Sequence[int]) -> tuple[slice, ...]:
  """The slices of the input, one per spatial axis, on which the output at ``pixel`` depends."""
  extent = _receptive_extent(params)
  if len(pixel) != len(extent):
    raise ValueError(f"pixel {tuple(pixel)}: expected {len(extent)} coordinates")
  return tuple(slice(max(p - lo, 0), p + hi + 1) for p, (lo, hi) in zip(pixel, extent))


@functools.partial(jax.jit, static_argnames="net")
def forward_with_pre_activations(net: nets.DeepNet, params, x):
  """The network on ``x`` (N, *spatial, 2) and the input of each hidden ReLU, (N, *spatial, C)."""
  net = net.clone(depth=nets.depth_of(params))
  out, state = net.apply({"params": params}, x, mutable=["intermediates"],
                         capture_intermediates=lambda m, _: (isinstance(m, nn.Conv)
                                                             and m.name.startswith("convs_")))
  pre = state["intermediates"]
  return out, [pre[f"convs_{i}"]["__call__"][0] for i in range(len(pre))]


def _share_active(pre) -> np.ndarray:
  """(..., C) ReLU inputs -> (...) share of the C units that are active (> 0)."""
  return np.asarray(jnp.mean(pre > 0, axis=-1))


def active_maps(net: nets.DeepNet, params, x) -> list[np.ndarray]:
  """Per hidden layer, the share of units active (> 0) at each pixel: (N, *spatial) in [0, 1]."""
  return [_share_active(z) for z in forward_with_pre_activations(net, params, x)[1]]


def active_fraction(net: nets.DeepNet, params, x) -> list[float]:
  """Per hidden layer, the share of ReLU units (over pixels and channels) active on ``x``."""
  return [float(m.mean()) for m in active_maps(net, params, x)]


@functools.partial(jax.jit, static_argnames="net")
def _jacobian_row(net, params, x, pixel, channel):
  """Row ``pixel`` ((ndim,) int) of the Jacobian of ``forward(x) - x`` (x: (*spatial, 2)) along
  output ``channel``, or along the output's phase at the pixel for ``channel < 0``."""
  out, vjp = jax.vjp(lambda z: nets.forward(net, params, z[None])[0] - z, x)
  at = tuple(pixel)
  full = out[at] + x[at]
  phase = full / jnp.maximum(jnp.linalg.norm(full), jnp.finfo(jnp.float32).tiny)
  u = jnp.where(channel < 0, phase, jnp.eye(2, dtype=jnp.float32)[jnp.maximum(channel, 0)])
  return vjp(jnp.zeros_like(out).at[at].set(u))[0]


def effective_filter(net: nets.DeepNet, params, x, pixel: Sequence[int],
                     out_channel: Optional[int] = None) -> np.ndarray:
  """The Jacobian row at ``pixel`` of the network's output minus the skip, w.r.t. the input.

  Args:
    net: the architecture (``cnn.network_template``); the depth comes from ``params``.
    params: a ``DeepNet`` parameter tree.
    x: (*spatial, 2) one input image (or volume patch of a 3D network).
    pixel: (row, col), or (plane, row, col) for a 3D network.
    out_channel: 0 (real) or 1 (imaginary) output; None: the output's own direction (phase) at
      the pixel, ``u = out_p / |out_p|``, i.e. the filter behind the pixel's magnitude.

  Returns:
    (*spatial, 2) ``J`` with ``u . (out_p - x_p) = sum(J * x) + b`` (u the one-hot ``out_channel``
    or the phase; b the effective bias), zero outside the receptive field.
  """
  x = jnp.asarray(x, jnp.float32)
  # The output at p depends on the input in its receptive field only, and zero padding past the
  # image edge is the same for the crop as for the image: the crop's row is exact.
  window = receptive_field(params, pixel)
  channel = -1 if out_channel is None else out_channel
  local = jnp.asarray([p - w.start for p, w in zip(pixel, window)], jnp.int32)
  row = _jacobian_row(net, params, x[window], local, channel)
  return np.asarray(jnp.zeros_like(x).at[window].set(row))


def unit_norms(kernel) -> np.ndarray:
  """(C_out,) l2 norm of each output unit's filter in a (*k, C_in, C_out) kernel."""
  kernel = np.asarray(kernel, np.float64)
  return np.sqrt(np.sum(np.square(kernel), axis=tuple(range(kernel.ndim - 1))))


def filter_tiles(kernel, max_filters: int = 64) -> tuple[list[np.ndarray], list[str], bool]:
  """(k, k) images of a hidden layer's kernel (*k, C_in, C_out), strongest units first.

  A first layer (C_in = 2) shows each unit's signed filters on the real and imaginary input; a
  deeper one each unit's l2 norm over its input channels (where in its window it looks). A 3D
  kernel (d, k, k, C_in, C_out) shows its centre plane ``d // 2`` (units ranked by their whole
  filter). Returns (tiles, titles, signed).
  """
  kernel = np.asarray(kernel)
  units = np.argsort(-unit_norms(kernel), kind="stable")[:max_filters]
  plane = kernel[kernel.shape[0] // 2] if kernel.ndim == 5 else kernel
  if plane.shape[2] == 2:
    return ([plane[:, :, part, o] for o in units for part in (0, 1)],
            [f"{o} {name}" for o in units for name in ("re", "im")], True)
  tiles = [np.sqrt(np.sum(np.square(plane[..., o]), axis=-1)) for o in units]
  return tiles, [str(o) for o in units], False


def _near_zero(kernel) -> int:
  norms = unit_norms(kernel)
  # Below certificate.NEAR_ZERO of the layer's largest a unit counts as pruned (a convex stage's
  # group lasso drives whole filters to zero; Adam only close to it).
  return int(np.sum(norms < certificate.NEAR_ZERO * norms.max()))


def draw(net: nets.DeepNet, params, x, pixel: Sequence[int], out_dir, *,
         max_filters: int = 64) -> dict:
  """Draws what the network does to one image ``x`` (*spatial, 2); returns a JSON-ready dict of
  the numbers and the figures' paths.

  Writes to ``out_dir``: ``filters_layer<i>.png`` per hidden layer, ``active_units.png`` (share of
  active units per pixel, per layer), ``effective_filter.png`` (|input|, |output|, |J|) and
  ``effective_filter_zoom.png`` (J on the real and imaginary input, receptive field only).
  """
  out_dir = Path(out_dir)
  x = jnp.asarray(x, jnp.float32)
  pixel = tuple(int(p) for p in pixel)
  plane = pixel[:-2]  # () for 2D; (plane,) for a 3D patch
  kernels = layer_filters(params)[:-1]
  paths = {}
  for i, kernel in enumerate(kernels, 1):
    tiles, titles, signed = filter_tiles(kernel, max_filters)
    paths[f"filters_layer{i}"] = figures.image_grid(
        tiles, out_dir / f"filters_layer{i}.png", ncols=16 if signed else 8, titles=titles,
        cmap="RdBu_r" if signed else "viridis", symmetric=signed)

  out, pre = forward_with_pre_activations(net, params, x[None])
  maps = [_share_active(z[0]) for z in pre]
  paths["active_units"] = figures.image_grid(
      [m[plane] for m in maps], out_dir / "active_units.png", ncols=len(maps), cmap="viridis",
      titles=[f"layer {i}: {m.mean():.0%} active" for i, m in enumerate(maps, 1)])

  jac = effective_filter(net, params, x, pixel)
  window = receptive_field(params, pixel)
  r, c = pixel[-2:]
  paths["effective_filter"] = figures.effective_filter(
      [metrics_lib.magnitude(x[plane]), metrics_lib.magnitude(out[0][plane]),
       np.hypot(jac[plane][..., 0], jac[plane][..., 1])],
      out_dir / "effective_filter.png", pixel=pixel[-2:], window=window[-2:],
      titles=["|input|", "|output|", f"|filter| of pixel {pixel} (box: receptive field)"])
  planes = [()] if not plane else [(d,) for d in range(window[0].start, window[0].stop)
                                   if d < x.shape[0]]
  zoom = [jac[d][window[-2:]][..., part] for d in planes for part in (0, 1)]
  paths["effective_filter_zoom"] = figures.image_grid(
      zoom, out_dir / "effective_filter_zoom.png", ncols=2, cmap="RdBu_r", symmetric=True,
      tile=figures.LARGE, colorbar=True,
      titles=[f"{f'plane {d[0]}: ' if d else ''}filter on {part} x"
              for d in planes for part in ("Re", "Im")])

  out_p, x_p = np.asarray(out[0][pixel]), np.asarray(x[pixel])
  phase = out_p / max(float(np.linalg.norm(out_p)), 1e-30)
  residual = float(phase @ (out_p - x_p))
  response = float(np.sum(jac * np.asarray(x)))
  return {
      "pixel": list(pixel), "receptive_radius": list(receptive_radius(params)),
      "active_fraction": [float(m.mean()) for m in maps],
      "filters": [{"layer": i, "shape": list(k.shape), "near_zero_units": _near_zero(k)}
                  for i, k in enumerate(kernels, 1)],
      # The pixel's change along the output's phase, split into filter response and bias.
      "effective_filter": {"residual": residual, "response": response,
                           "bias": residual - response},
      "figures": paths,
  }


def run(workdir, *, method: Optional[str] = None, depth: Optional[int] = None,
        slice_index: Optional[int] = None, pixel: Optional[Sequence[int]] = None,
        out_dir=None, **overrides) -> dict:
  """``draw`` for a network of the run in ``workdir`` on one of its validation slices.

  Args:
    method, depth: the network (default: the run's first method at its largest trained depth).
    slice_index: index into the validation split's kept slices, in file then slice order
      (skipped empty slices are not counted; default: its middle slice). A 3D network sees
      the volume patch (``data_lib.example_arrays``) that holds the slice, and the figures show it.
    pixel: (row, col) (default: the image centre).
    out_dir: default ``WORKDIR/figures/interpret/<method>_d<depth>``; for other data than the
      run's, under the evaluation's folder (``evaluate.output_dir``), never over the run's own.
    overrides: ``evaluate.OVERRIDABLE`` settings.

  Writes ``interpret.json`` (``draw``'s numbers, the slice, the network) next to the figures.
  """
  cfg = evaluate.load_config(workdir, **overrides)
  if not models.family(cfg).image_to_image:
    raise ValueError(f"{workdir}: interpretation covers CNN runs; this run has "
                     f"--model={cfg.model} (launch/evaluate.py evaluates it)")
  method, depth = inference.choose_network(cfg, method, depth)
  params = evaluate.load_network(cfg, method, depth)
  val = evaluate.validation_split(cfg)
  arrays, slices = data_lib.example_arrays(cfg, val, keys=("x",))
  n, size = len(val.x), val.x.shape[1:3]
  slice_index = int(slices[len(slices) // 2]) if slice_index is None else slice_index
  pixel = tuple(pixel) if pixel is not None else (size[0] // 2, size[1] // 2)
  if not 0 <= slice_index < n:
    raise ValueError(f"--slice={slice_index}: the validation split has {n} slices")
  if len(pixel) != 2 or not all(0 <= p < s for p, s in zip(pixel, size)):
    raise ValueError(f"--pixel={pixel}: expected row,col inside the {size[0]}x{size[1]} image")
  where = np.flatnonzero(slices == slice_index)
  if not where.size:
    raise ValueError(f"--slice={slice_index} ({val.ids[slice_index][0]}, slice "
                     f"{val.ids[slice_index][1]}) is in no volume patch of "
                     f"--volume_depth={cfg.volume_depth}: slices that fill no patch (at a file's "
                     "end or before a skipped slice) are dropped")
  if cfg.ndim == 3:  # The patch that holds the slice, and the slice's plane in it.
    example, plane = divmod(int(where[0]), cfg.volume_depth)
    pixel = (plane,) + pixel
  else:
    example = slice_index
  base, own = evaluate.output_dir(cfg, val)  # Other data: beside the run's figures, not over.
  out_dir = Path(out_dir or base / "figures" / "interpret" / f"{method}_d{depth}")
  result = {"method": method, "depth": depth, "slice": list(val.ids[slice_index]),
            "data_dir": cfg.data_dir, "own_data": own,  # as in eval.json
            **draw(cnn.network_template(cfg), params, arrays["x"][example], pixel, out_dir)}
  files.write_json(out_dir / "interpret.json", result, sort_keys=False)
  return result
