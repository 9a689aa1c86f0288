"""Sampling masks: acceleration, centre, reproducibility, density and the error cases."""
import numpy as np
import pytest

from lwjax import masks
from lwjax.fft import center_slices

SHAPES = [(64, 64), (80, 96), (128, 128)]


def _radius(shape):
  """Normalised distance from the k-space centre, 1 at the edge midpoints."""
  h, w = shape
  ky, kx = np.meshgrid((np.arange(h) - h // 2) / (h / 2), (np.arange(w) - w // 2) / (w / 2),
                       indexing="ij")
  return np.hypot(ky, kx)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("accel", [2.5, 4, 6])
def test_poisson_acceleration_and_centre(shape, accel):
  for seed in range(8):
    mask = masks.make_mask("poisson", shape, accel, seed=seed, calib=8)
    assert mask.shape == shape and mask.dtype == bool
    assert abs(masks.acceleration(mask) / accel - 1) <= 0.05
    assert mask[center_slices(shape, (8, 8))].all()


@pytest.mark.parametrize("kind", ["cartesian", "equispaced"])
@pytest.mark.parametrize("shape", SHAPES + [(32, 368)])
@pytest.mark.parametrize("accel", [2, 4, 8])
def test_cartesian_acceleration_and_centre(kind, shape, accel):
  center = round(shape[1] * 0.04)
  for seed in range(8):
    mask = masks.make_mask(kind, shape, accel, seed=seed)
    assert mask.shape == shape and mask.dtype == bool
    assert abs(masks.acceleration(mask) / accel - 1) <= 0.05
    assert (mask == mask[0]).all()  # whole phase-encode columns
    assert mask[0, center_slices((shape[1],), (center,))[0]].all()


def test_paper_masks():
  """The paper's 4x masks on the 320 x 320 grid."""
  for kind in masks.KINDS:
    mask = masks.make_mask(kind, (320, 320), 4)
    assert abs(masks.acceleration(mask) / 4 - 1) <= 0.05
  assert masks.make_mask("poisson", (320, 320), 4)[152:168, 152:168].all()
  assert masks.make_mask("cartesian", (320, 320), 4)[:, 154:167].all()  # 13 = round(320 * 0.04)


@pytest.mark.parametrize("kind", masks.KINDS)
def test_reproducible_and_seeded(kind):
  a, b = (masks.make_mask(kind, (64, 80), 4, seed=3, calib=8) for _ in range(2))
  np.testing.assert_array_equal(a, b)
  assert (a != masks.make_mask(kind, (64, 80), 4, seed=4, calib=8)).any()


def test_poisson_variable_density_and_disc():
  shape = (128, 128)
  mask = masks.poisson_disc(shape, 4, calib=(8, 8), seed=1)
  rho = _radius(shape)
  inner = mask[(rho < 0.3) & (rho > 0.15)].mean()  # outside the 8 x 8 calibration block
  outer = mask[(rho > 0.7) & (rho < 1)].mean()
  assert inner > 1.5 * outer
  assert not mask[rho >= 1].any()  # corners cropped, as SigPy's default
  # The disc: away from the centre the radius exceeds one pixel, so no two samples touch, unlike
  # uniform random sampling at the same density.
  far = mask & (rho > 0.5)
  assert not (far[1:] & far[:-1]).any() and not (far[:, 1:] & far[:, :-1]).any()
  assert masks.acceleration(masks.poisson_disc(shape, 2, calib=(8, 8), crop_corner=False)) < 2.1


def test_equispaced_spacing():
  mask = masks.cartesian((16, 320), 4, equispaced=True, seed=5)[0]
  outside = np.flatnonzero(mask)
  outside = outside[(outside < 154) | (outside >= 167)]
  gaps = np.diff(outside)
  gaps = gaps[gaps < 10]  # drop the jump over the centre block
  assert gaps.max() - gaps.min() <= 1


def test_random_columns_differ_from_lattice():
  random = masks.cartesian((16, 320), 4, seed=5)[0]
  gaps = np.diff(np.flatnonzero(random))
  assert gaps.max() - gaps.min() > 3


@pytest.mark.parametrize("call, match", [
    (lambda: masks.make_mask("poisson", (64, 64), 1.0), "accel"),
    (lambda: masks.make_mask("cartesian", (64, 64), 0.5), "accel"),
    (lambda: masks.make_mask("equispaced", (64, 64), -2), "accel"),
    (lambda: masks.make_mask("poisson", (64, 64), 4, calib=80), "calib"),
    (lambda: masks.make_mask("poisson", (64, 64), 4, calib=0), "calib"),
    (lambda: masks.make_mask("cartesian", (64, 64), 4, center_fraction=1.5), "center_fraction"),
    (lambda: masks.make_mask("cartesian", (64, 64), 4, center_fraction=0), "center_fraction"),
    (lambda: masks.make_mask("radial", (64, 64), 4), "kind"),
    # Unreachable: the centre alone samples more than 1 / accel.
    (lambda: masks.make_mask("poisson", (64, 64), 4, calib=32), "out of reach"),
    (lambda: masks.make_mask("cartesian", (64, 64), 4, center_fraction=0.5), "out of reach"),
    (lambda: masks.make_mask("poisson", (64, 64), 1.1), "out of reach"),
    (lambda: masks.make_mask("poisson", (64, 64), 50, calib=8), "MAX_RADIUS"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
