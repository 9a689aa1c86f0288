"""The figures of a run: metrics against depth, example reconstructions, training curves, memory.

Every function draws on its own ``matplotlib.figure.Figure`` rendered by Agg (no pyplot: no global
state, no display), writes one PNG to ``path`` (creating its folder) and returns ``path`` as a str.
Figures have fixed sizes in inches, given per function, rendered at ``DPI`` dots per inch.
Inputs are plain Python / NumPy structures; malformed ones raise ValueError.
"""
import os
import re
import zlib
from collections.abc import Mapping

import matplotlib
import matplotlib.patches
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from lwjax import files
from lwjax import metrics

DPI = 100
PANEL = 2.5  # inches per image panel in example_grid
TILE = 1.25  # inches per tile in image_grid
TITLE = 0.25  # inches above each row of an image_grid with titles
LARGE = 4.0  # inches per panel of effective_filter, and per tile of its zoom
COLORBAR = 0.8  # inches beside each tile of an image_grid with colour bars
_METRIC_LABELS = {k: metrics.label(k) for k in ("psnr", "ssim")}  # The paper's figure 2 panels.
# The baselines of a summary or eval.json (the unrolled model adds CG-SENSE): key -> label.
BASELINES = {"zero_filled": "zero-filled", "cg_sense": "CG-SENSE"}
# One colour per method in every figure (training curves, metrics against depth, memory bars).
METHOD_COLORS = {"layerwise_convex": "tab:blue", "layerwise": "tab:orange", "e2e": "tab:green",
                 "unrolled_stagewise": "tab:purple", "unrolled_e2e": "tab:red"}
_SPARE_COLORS = ("tab:brown", "tab:pink", "tab:olive", "tab:cyan", "tab:gray")
# A phase of metrics.jsonl: "<method>_d<depth>" (e2e), "_s<stage>" (layer-wise), "_k<iters>".
_PHASE = re.compile(r"^(?P<method>.+)_[dsk](?P<index>\d+)$")


def method_color(method: str) -> str:
  """The colour of ``method`` (a method name, or a phase such as "e2e_d3") in every figure."""
  match = _PHASE.match(method)
  name = match["method"] if match and match["method"] in METHOD_COLORS else method
  if name in METHOD_COLORS:
    return METHOD_COLORS[name]
  return _SPARE_COLORS[zlib.crc32(name.encode()) % len(_SPARE_COLORS)]


def _save(fig, path):
  path = os.fspath(path)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  with files.atomic_write(path) as tmp:
    fig.savefig(tmp, dpi=DPI, format="png")
  return path


def _depth_curves(summary):
  """``{method: (depths, {metric: values})}`` for each entry of ``summary`` mapping depth to
  metrics."""
  curves = {}
  for name, entry in summary.items():
    if not isinstance(entry, Mapping) or not entry:
      continue
    try:
      depths = sorted(entry, key=int)
    except (TypeError, ValueError):
      continue  # not keyed by depth: "zero_filled", "config", ...
    if not all(isinstance(m, Mapping) and _METRIC_LABELS.keys() <= m.keys()
               for m in entry.values()):
      continue
    curves[name] = ([int(d) for d in depths],
                    {k: [float(entry[d][k]) for d in depths] for k in _METRIC_LABELS})
  if not curves:
    raise ValueError(f"summary has no method entry {{depth: {{'psnr', 'ssim', ...}}}}; "
                     f"keys: {list(summary)}")
  return curves


def metrics_vs_depth(summary, path, *, xlabel="depth (conv layers)"):
  """PSNR and SSIM against depth, one line per method, the baselines dashed (paper figure 2).

  Args:
    summary: ``{"zero_filled": {"psnr", "ssim", ...}, method: {"<depth>": {"psnr", "ssim", ...}}}``;
      entries that do not map depths to metrics are ignored; the baselines "zero_filled" and
      "cg_sense" (the unrolled model's) are optional.
    path: PNG file to write, 10 x 4 inches.
    xlabel: what the depths count (the unrolled model's are iterations).
  """
  curves = _depth_curves(summary)
  baselines = {name: summary[name] for name in BASELINES if name in summary}
  for name, entry in baselines.items():
    if not (isinstance(entry, Mapping) and _METRIC_LABELS.keys() <= entry.keys()):
      raise ValueError(f"summary[{name!r}] needs 'psnr' and 'ssim', got {entry!r}")
  fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
  for ax, (metric, label) in zip(fig.subplots(1, 2), _METRIC_LABELS.items()):
    for name, (depths, values) in curves.items():
      ax.plot(depths, values[metric], marker="o", label=name, color=method_color(name))
    for (name, entry), style in zip(baselines.items(), ("--", ":")):
      ax.axhline(float(entry[metric]), color="k", linestyle=style, label=BASELINES[name])
    ax.set(xlabel=xlabel, ylabel=label)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  ax.legend()
  return _save(fig, path)


def example_grid(columns, path, *, error_scale=5.0, title=None, row_labels=None):
  """Reconstructions and their error maps, two rows per slice (paper figure 3).

  Args:
    columns: ordered mapping name -> list of magnitude images ``(H, W)``, one per slice; must hold
      "target". Row pair s shows the images of slice s, then ``|image - target| * error_scale``,
      all on the grey scale ``[0, max(target_s)]``.
    path: PNG file to write, ``PANEL * len(columns)`` x ``PANEL * 2 * n_slices`` inches.
    error_scale: magnification of the error maps.
    title: optional figure title.
    row_labels: one label per slice (default "slice 0", "slice 1", ...).
  """
  if "target" not in columns:
    raise ValueError(f"columns must include 'target', got {list(columns)}")
  columns = {name: [np.asarray(im, dtype=float) for im in ims] for name, ims in columns.items()}
  targets = columns["target"]
  if not targets or any(t.ndim != 2 for t in targets):
    raise ValueError(f"'target' must be a non-empty list of (H, W) images, got shapes "
                     f"{[t.shape for t in targets]}")
  for name, ims in columns.items():
    if [im.shape for im in ims] != [t.shape for t in targets]:
      raise ValueError(f"column {name!r} has shapes {[im.shape for im in ims]}, 'target' has "
                       f"{[t.shape for t in targets]}")

  fig = Figure(figsize=(PANEL * len(columns), PANEL * 2 * len(targets)), dpi=DPI,
               layout="constrained")
  if title:
    fig.suptitle(title)
  axes = fig.subplots(2 * len(targets), len(columns), squeeze=False)
  for s, target in enumerate(targets):
    grey = dict(cmap="gray", vmin=0.0, vmax=target.max())
    for j, (name, ims) in enumerate(columns.items()):
      image_ax, error_ax = axes[2 * s, j], axes[2 * s + 1, j]
      image_ax.imshow(ims[s], **grey)
      if name == "target":
        error_ax.text(0.5, 0.5, f"|image - target|\nx {error_scale:g}", ha="center",
                      va="center", transform=error_ax.transAxes)
        error_ax.axis("off")
      else:
        error_ax.imshow(np.abs(ims[s] - target) * error_scale, **grey)
      if s == 0:
        image_ax.set_title(name)
    axes[2 * s, 0].set_ylabel(row_labels[s] if row_labels else f"slice {s}")
  for ax in axes.flat:
    ax.set_xticks([])
    ax.set_yticks([])
  return _save(fig, path)


def training_curves(records, path):
  """Training loss (log scale) against step, one line per phase.

  Args:
    records: dicts as in a run's metrics.jsonl, ``{"phase", "step", "loss", ...}``; records
      without "loss" (evaluations) are skipped.
    path: PNG file to write, 8 x 4.5 inches.
  """
  phases = {}
  for record in records:
    if "loss" not in record:
      continue
    if "phase" not in record or "step" not in record:
      raise ValueError(f"a record with 'loss' needs 'phase' and 'step': {record!r}")
    phases.setdefault(record["phase"], []).append((record["step"], float(record["loss"])))
  if not phases:
    raise ValueError("no record has a 'loss'")
  fig = Figure(figsize=(8, 4.5), dpi=DPI, layout="constrained")
  ax = fig.subplots()
  # The method's colour for all its phases; its depths or stages, darker as they go deeper.
  shades = {}
  for phase in phases:
    match = _PHASE.match(phase)
    shades.setdefault(match["method"] if match else phase, []).append(phase)
  for method, members in shades.items():
    base = np.asarray(matplotlib.colors.to_rgb(method_color(method)))
    for i, phase in enumerate(members):
      light = 0.55 * (len(members) - 1 - i) / max(len(members) - 1, 1)  # 0: the deepest
      steps, losses = zip(*sorted(phases[phase]))
      ax.plot(steps, losses, label=phase, color=tuple(base + (1 - base) * light))
  ax.set(yscale="log", xlabel="step", ylabel="training loss")
  ax.grid(alpha=0.3, which="both")
  ax.legend(fontsize="small", ncol=2)
  return _save(fig, path)


def memory_bars(report, path, *, method="layerwise"):
  """Largest batch within a memory budget and memory per example: end to end vs each layer-wise
  stage (paper figure 4).

  Args:
    report: ``{"budget_bytes", "e2e": {"max_batch", "bytes_per_example"},
      "layerwise": [{"stage", "max_batch", "bytes_per_example"}, ...]}``.
    path: PNG file to write, 10 x 4 inches.
    method: the layer-wise method whose stages these are (its colour).
  """
  try:
    entries = [("end-to-end", report["e2e"])] + [(f"stage {s['stage']}", s)
                                                 for s in report["layerwise"]]
    labels = [label for label, _ in entries]
    batches = [int(e["max_batch"]) for _, e in entries]
    mib = [e["bytes_per_example"] / 2**20 for _, e in entries]
    budget_gib = report["budget_bytes"] / 2**30
  except (KeyError, TypeError) as e:
    raise ValueError(f"malformed memory report ({e!r}): {report!r}") from e
  colors = [method_color("e2e")] + [method_color(method)] * (len(entries) - 1)
  fig = Figure(figsize=(10, 4), dpi=DPI, layout="constrained")
  fig.suptitle(f"memory budget {budget_gib:.2f} GiB")
  batch_ax, mem_ax = fig.subplots(1, 2)
  bars = batch_ax.bar(labels, batches, color=colors)
  e2e = batches[0]
  batch_ax.bar_label(bars, [f"{b} ({b / e2e - 1:+.0%})" if e2e and i else str(b)
                            for i, b in enumerate(batches)])
  batch_ax.set(ylabel="max batch size")
  batch_ax.yaxis.set_major_locator(MaxNLocator(integer=True))
  mem_ax.bar_label(mem_ax.bar(labels, mib, color=colors), fmt="%.1f")
  mem_ax.set(ylabel="memory per example (MiB)")
  for ax in (batch_ax, mem_ax):
    ax.tick_params(axis="x", labelrotation=30)
    ax.margins(y=0.15)
  return _save(fig, path)


def image_grid(images, path, *, ncols=8, cmap="gray", symmetric=False, titles=None, tile=TILE,
               colorbar=False):
  """A grid of 2-D arrays (conv filters, effective filters, activation maps), each on its own scale.

  Args:
    images: sequence of ``(H, W)`` arrays (or one ``(n, H, W)`` array).
    path: PNG file to write, ``(tile + c) * min(ncols, n)`` x ``(tile + t) * ceil(n / ncols)``
      inches, ``t = TITLE`` with titles, else 0, ``c = COLORBAR`` with colour bars, else 0.
    ncols: tiles per row.
    cmap: matplotlib colour map.
    symmetric: centre each colour scale at 0, ``[-max|x|, max|x|]`` (for filters).
    titles: optional label per image.
    tile: inches per tile.
    colorbar: a colour bar beside each tile (for tiles large enough to read one).
  """
  return _save(_grid_figure(images, ncols=ncols, cmap=cmap, symmetric=symmetric, titles=titles,
                            tile=tile, colorbar=colorbar), path)


def _grid_figure(images, *, ncols, cmap, symmetric, titles, tile=TILE, colorbar=False) -> Figure:
  """``image_grid``'s figure."""
  images = [np.asarray(im, dtype=float) for im in images]
  if not images or any(im.ndim != 2 for im in images):
    raise ValueError(f"expected a non-empty sequence of 2-D arrays, got shapes "
                     f"{[im.shape for im in images]}")
  if titles is not None and len(titles) != len(images):
    raise ValueError(f"{len(titles)} titles for {len(images)} images")
  if ncols < 1:
    raise ValueError(f"ncols must be >= 1, got {ncols}")
  cols = min(ncols, len(images))
  rows = -(-len(images) // cols)
  if colorbar:
    fig = Figure(figsize=((tile + COLORBAR) * cols, (tile + (titles is not None) * TITLE) * rows),
                 dpi=DPI, layout="constrained")
  elif titles is None:
    fig = Figure(figsize=(tile * cols, tile * rows), dpi=DPI)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.99, wspace=0.05, hspace=0.05)
  else:  # A band of TITLE inches above every row (a fraction of the tile clipped the titles).
    height = (tile + TITLE) * rows
    fig = Figure(figsize=(tile * cols, height), dpi=DPI)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - TITLE / height,
                        wspace=0.05, hspace=TITLE / tile)
  axes_list = list(fig.subplots(rows, cols, squeeze=False).flat)
  for i, (ax, im) in enumerate(zip(axes_list, images)):
    # An all-zero image (a pruned filter) still needs a non-empty colour range.
    lim = (np.abs(im).max() or 1.0) if symmetric else None
    shown = ax.imshow(im, cmap=cmap, vmin=None if lim is None else -lim, vmax=lim)
    if titles is not None:
      ax.set_title(titles[i], fontsize="x-small" if tile < 2 else "medium", pad=3)
    if colorbar:
      fig.colorbar(shown, ax=ax, shrink=0.8)
  for ax in axes_list:
    ax.axis("off")
  return fig


def effective_filter(images, path, *, titles, pixel, window):
  """The effective filter of one output pixel beside the input and output images.

  Args:
    images: three (H, W) arrays: |input|, |output|, |filter| (the Jacobian row's magnitude).
    path: PNG file to write, ``3 * LARGE`` x ``LARGE + TITLE`` inches.
    titles: one title per image.
    pixel: (row, col) of the output pixel, marked with a cross on every panel.
    window: (row slice, col slice) of the receptive field, outlined on every panel.
  """
  images = [np.asarray(im, dtype=float) for im in images]
  if len(images) != 3 or any(im.ndim != 2 for im in images) or len(titles) != 3:
    raise ValueError(f"expected 3 (H, W) images and 3 titles, got shapes "
                     f"{[im.shape for im in images]} and {len(titles)} titles")
  fig = Figure(figsize=(3 * LARGE, LARGE + TITLE), dpi=DPI, layout="constrained")
  rows, cols = window
  for ax, im, title, cmap in zip(fig.subplots(1, 3), images, titles, ("gray", "gray", "magma")):
    shown = ax.imshow(im, cmap=cmap)
    ax.add_patch(matplotlib.patches.Rectangle(
        (cols.start - 0.5, rows.start - 0.5), cols.stop - cols.start, rows.stop - rows.start,
        fill=False, edgecolor="tab:cyan", linewidth=1))
    ax.plot(pixel[1], pixel[0], marker="+", color="tab:red", markersize=12, mew=1.5)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.colorbar(shown, ax=ax, shrink=0.8)
  return _save(fig, path)
