"""Each figure is written as a non-blank PNG of its documented size; malformed inputs fail clearly."""
import numpy as np
import pytest
from matplotlib.image import imread

from lwjax import figures


def _check_png(path, width_in, height_in):
  img = imread(path)
  assert img.shape[:2] == (round(height_in * figures.DPI), round(width_in * figures.DPI))
  rgb = img[..., :3]
  assert rgb.std() > 0.01 and rgb.min() < 0.5  # something dark was drawn on the white canvas


def _summary():
  return {
      "zero_filled": {"psnr": 27.1, "ssim": 0.71, "nmse": 0.05},
      "e2e": {str(d): {"psnr": 30 + d, "ssim": 0.8 + d / 100, "nmse": 0.02} for d in (2, 3, 5, 4)},
      "layerwise_convex": {str(d): {"psnr": 30 + 0.9 * d, "ssim": 0.8 + d / 110, "nmse": 0.02,
                                    "rel_gap": 1e-3} for d in (2, 3, 4, 5)},
      "config": {"lr": 1e-4, "depth": 5, "mask": "poisson"},
      "stages": [{"stage": 1, "rel_gap": 1e-3}],
      "seed": 0,
  }


def _slices(n, shape, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[-1:1:shape[0] * 1j, -1:1:shape[1] * 1j]
  blob = np.exp(-3 * (xx**2 + yy**2))
  return [blob * (1 + i) + 0.05 * rng.random(shape) for i in range(n)]


def test_metrics_vs_depth(tmp_path):
  path = figures.metrics_vs_depth(_summary(), tmp_path / "sub" / "depth.png")
  assert path == str(tmp_path / "sub" / "depth.png")
  _check_png(path, 10, 4)


def test_metrics_vs_depth_ignores_non_depth_keys_and_needs_a_method(tmp_path):
  summary = _summary()
  curves = figures._depth_curves(summary)
  assert list(curves) == ["e2e", "layerwise_convex"]
  assert curves["e2e"][0] == [2, 3, 4, 5]
  np.testing.assert_allclose(curves["e2e"][1]["psnr"], [32, 33, 34, 35])
  with pytest.raises(ValueError, match="no method"):
    figures.metrics_vs_depth({"zero_filled": summary["zero_filled"], "config": {}}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="zero_filled"):
    figures.metrics_vs_depth({**summary, "zero_filled": {"psnr": 1.0}}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="cg_sense"):  # the unrolled model's baseline
    figures.metrics_vs_depth({**summary, "cg_sense": {"psnr": 1.0}}, tmp_path / "x.png")
  figures.metrics_vs_depth({**summary, "cg_sense": summary["zero_filled"]}, tmp_path / "x.png",
                           xlabel="unrolled iterations")


def test_example_grid(tmp_path):
  target = _slices(2, (40, 32))
  columns = {"zero-filled": [t * 0.8 for t in target], "target": target,
             "e2e": [t + 0.02 for t in target]}
  path = figures.example_grid(columns, tmp_path / "grid.png", title="4x Poisson")
  _check_png(path, figures.PANEL * 3, figures.PANEL * 2 * 2)


def test_example_grid_rejects_malformed(tmp_path):
  target = _slices(2, (16, 16))
  with pytest.raises(ValueError, match="target"):
    figures.example_grid({"e2e": target}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="shapes"):
    figures.example_grid({"target": target, "e2e": [t[:8] for t in target]}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="shapes"):
    figures.example_grid({"target": target, "e2e": target[:1]}, tmp_path / "x.png")
  with pytest.raises(ValueError, match=r"\(H, W\)"):
    figures.example_grid({"target": [t[None] for t in target]}, tmp_path / "x.png")


def test_training_curves(tmp_path):
  records = [{"phase": phase, "epoch": s // 10, "step": s, "loss": scale * np.exp(-s / 20) + 0.01}
             for phase, scale in (("e2e_d5", 1.0), ("layerwise_convex_s1", 2.0),
                                  ("layerwise_convex_s2", 0.5))
             for s in range(0, 60, 5)]
  records.append({"phase": "eval", "epoch": 1, "step": 10, "psnr": 30.0})
  _check_png(figures.training_curves(records, tmp_path / "loss.png"), 8, 4.5)
  with pytest.raises(ValueError, match="no record"):
    figures.training_curves(records[-1:], tmp_path / "x.png")
  with pytest.raises(ValueError, match="phase"):
    figures.training_curves([{"step": 1, "loss": 1.0}], tmp_path / "x.png")


def test_memory_bars(tmp_path):
  report = {"budget_bytes": 12 * 2**30, "e2e": {"max_batch": 10, "bytes_per_example": 2**30},
            "layerwise": [{"stage": i, "max_batch": 17 + i, "bytes_per_example": 6 * 2**27}
                          for i in (1, 2, 3, 4)]}
  _check_png(figures.memory_bars(report, tmp_path / "mem.png"), 10, 4)
  with pytest.raises(ValueError, match="malformed"):
    figures.memory_bars({**report, "e2e": {"bytes_per_example": 1}}, tmp_path / "x.png")
  with pytest.raises(ValueError, match="malformed"):
    figures.memory_bars({"e2e": report["e2e"], "layerwise": []}, tmp_path / "x.png")


@pytest.mark.parametrize("n,ncols,symmetric,titles", [(20, 8, True, None), (3, 8, False, True)])
def test_image_grid(tmp_path, n, ncols, symmetric, titles):
  rng = np.random.default_rng(0)
  filters = rng.standard_normal((n, 7, 7))
  filters[0] = 0.0  # a pruned filter
  titles = [f"f{i}" for i in range(n)] if titles else None
  path = figures.image_grid(filters, tmp_path / "filters.png", ncols=ncols, cmap="RdBu_r",
                            symmetric=symmetric, titles=titles)
  cols = min(ncols, n)
  row = figures.TILE + (figures.TITLE if titles else 0)
  _check_png(path, figures.TILE * cols, row * -(-n // cols))


def test_image_grid_titles_lie_inside_the_figure():
  # interpret.py's longest titles, on one row and on two: none may be clipped by the edges.
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  titles = ["|input|", "|output|", "|filter| of (160, 140)", "layer 4: 100% active"]
  for ncols in (4, 2):
    fig = figures._grid_figure([np.ones((7, 7))] * 4, ncols=ncols, cmap="gray", symmetric=False,
                               titles=titles)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # Lays out as saving does (the image axes take their aspect when drawn).
    renderer = canvas.get_renderer()
    box = fig.bbox
    for ax in fig.axes:
      extent = ax.title.get_window_extent(renderer)
      assert box.x0 <= extent.x0 and extent.x1 <= box.x1 and extent.y1 <= box.y1, ax.title
      assert extent.y0 >= ax.get_window_extent(renderer).y1  # above its own image


def test_image_grid_rejects_malformed(tmp_path):
  with pytest.raises(ValueError, match="2-D"):
    figures.image_grid([], tmp_path / "x.png")
  with pytest.raises(ValueError, match="2-D"):
    figures.image_grid([np.zeros((3, 3)), np.zeros((3, 3, 2))], tmp_path / "x.png")
  with pytest.raises(ValueError, match="titles"):
    figures.image_grid([np.zeros((3, 3))] * 2, tmp_path / "x.png", titles=["a"])


def test_one_colour_per_method_in_every_figure(tmp_path, monkeypatch):
  from matplotlib.colors import to_rgb
  drawn = {}
  save = figures._save
  monkeypatch.setattr(figures, "_save",
                      lambda fig, path: save(drawn.setdefault(path.name, fig), path))
  methods = ("layerwise_convex", "layerwise", "e2e", "unrolled_e2e", "unrolled_stagewise")
  assert len({figures.method_color(m) for m in methods}) == len(methods)
  assert figures.method_color("e2e_d3") == figures.method_color("e2e")
  assert figures.method_color("some_new_method") == figures.method_color("some_new_method")

  figures.metrics_vs_depth(_summary(), tmp_path / "depth.png")
  for line in drawn["depth.png"].axes[0].get_lines():
    if line.get_label() in methods:
      assert to_rgb(line.get_color()) == to_rgb(figures.method_color(line.get_label()))
  records = [{"phase": p, "step": s, "loss": 1.0 / (s + 1)}
             for p in ("layerwise_convex_s1", "layerwise_convex_s2", "e2e_d2", "e2e_d3")
             for s in range(3)]
  figures.training_curves(records, tmp_path / "loss.png")
  lines = {line.get_label(): line for line in drawn["loss.png"].axes[0].get_lines()}
  for phase, line in lines.items():
    method = phase.rsplit("_", 1)[0]
    base = to_rgb(figures.method_color(method))
    # The method's colour, lightened towards white for its shallower phases.
    light = (np.asarray(to_rgb(line.get_color())) - base) / (1 - np.asarray(base) + 1e-9)
    assert np.allclose(light, light.max(), atol=1e-6) or np.allclose(light, 0), phase
  assert to_rgb(lines["e2e_d3"].get_color()) == to_rgb(figures.method_color("e2e"))
  report = {"budget_bytes": 2**30, "e2e": {"max_batch": 2, "bytes_per_example": 2**20},
            "layerwise": [{"stage": 1, "max_batch": 3, "bytes_per_example": 2**19}]}
  figures.memory_bars(report, tmp_path / "mem.png", method="layerwise_convex")
  bars = drawn["mem.png"].axes[0].patches
  assert [to_rgb(b.get_facecolor()[:3]) for b in bars] == [
      to_rgb(figures.method_color("e2e")), to_rgb(figures.method_color("layerwise_convex"))]
