"""Sampling masks: the Poisson disc against sigpy's figures, acceleration, centre, reproducibility
and the error cases."""
import numpy as np
import pytest

from lwjax.mri import masks
from lwjax.mri.fft import center_slices

SHAPES = [(64, 64), (80, 96), (128, 128)]

# sigpy.mri.poisson at 320 x 320, 4x, 16 x 16 calibration, averaged over 20 seeds (DESIGN.md
# section 4): the sampled fraction in rings of normalised radius 0-0.1, ..., 0.9-1.0, and outside 1.
SIGPY_RINGS = [.83, .65, .50, .43, .41, .37, .30, .26, .23, .20]
SIGPY_CORNERS = .018
SIDE_LOBE_MAX = 0.022


def _radius(shape):
  """Normalised distance from the k-space centre, 1 at the edge midpoints."""
  h, w = shape
  ky, kx = np.meshgrid((np.arange(h) - h // 2) / (h / 2), (np.arange(w) - w // 2) / (w / 2),
                       indexing="ij")
  return np.hypot(ky, kx)


def _rings(density):
  """Mean of ``density`` (H, W) in rings of normalised radius 0-0.1, ..., 0.9-1.0, and outside 1."""
  rho = _radius(density.shape)
  rings = [density[(rho >= i / 10) & (rho < (i + 1) / 10)].mean() for i in range(10)]
  return np.array(rings), density[rho >= 1].mean()


def _side_lobe(mask, exclude=10):
  """Largest |PSF| outside +-``exclude`` pixels of its peak, relative to the peak."""
  psf = np.abs(np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(mask.astype(np.float64)))))
  h, w = mask.shape
  peak = psf[h // 2, w // 2]
  psf[h // 2 - exclude:h // 2 + exclude + 1, w // 2 - exclude:w // 2 + exclude + 1] = 0
  return psf.max() / peak


@pytest.fixture(scope="module")
def paper_masks():
  return np.stack([masks.make_mask("poisson", (320, 320), 4, seed=s, calib=16) for s in range(5)])


def test_poisson_profile_matches_sigpy(paper_masks):
  rings, corners = _rings(paper_masks.mean(0))
  np.testing.assert_allclose(rings, SIGPY_RINGS, atol=0.05)
  assert abs(corners - SIGPY_CORNERS) < 0.05
  # Fully sampled only in the 16 x 16 block: the density falls from its edge on.
  for mask in paper_masks:
    assert mask[center_slices((320, 320), (16, 16))].all()
    frame = np.zeros((320, 320), bool)
    frame[center_slices((320, 320), (24, 24))] = True
    frame[center_slices((320, 320), (16, 16))] = False
    assert mask[frame].mean() < 0.9


def test_poisson_side_lobe(paper_masks):
  assert np.mean([_side_lobe(m) for m in paper_masks]) <= SIDE_LOBE_MAX


def test_side_lobe_measure():
  """The measure itself: a fully sampled grid has no side lobe, a random half of it does."""
  assert _side_lobe(np.ones((64, 64), bool)) < 1e-12
  random = np.random.default_rng(0).random((64, 64)) < 0.25
  assert _side_lobe(random) > 0.03


def test_poisson_paper_acceleration(paper_masks):
  accels = [masks.acceleration(m) for m in paper_masks]
  assert max(abs(a / 4 - 1) for a in accels) <= 0.02
  assert len({m.tobytes() for m in paper_masks}) == len(paper_masks)  # seeded


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("accel", [2.5, 4, 6])
def test_poisson_acceleration_and_centre(shape, accel):
  for seed in range(6):
    mask = masks.make_mask("poisson", shape, accel, seed=seed, calib=8)
    assert mask.shape == shape and mask.dtype == bool
    assert abs(masks.acceleration(mask) / accel - 1) <= 0.02
    assert mask[center_slices(shape, (8, 8))].all()


def test_poisson_demo_and_non_square_grids():
  for seed in range(12):  # The demo's grid and calibration.
    mask = masks.make_mask("poisson", (64, 64), 4, seed=seed, calib=16)
    assert abs(masks.acceleration(mask) / 4 - 1) <= 0.02
    assert mask[center_slices((64, 64), (16, 16))].all()
  for seed in range(2):
    mask = masks.make_mask("poisson", (320, 368), 4, seed=seed, calib=16)
    assert abs(masks.acceleration(mask) / 4 - 1) <= 0.02
    assert mask[center_slices((320, 368), (16, 16))].all()
    assert not mask[masks.calib_distance((320, 368), (16, 16)) >= 1].any()


def test_calib_distance():
  k = masks.calib_distance((10, 12), (4, 2))
  assert (k[center_slices((10, 12), (4, 2))] == 0).all() and (k > 0).sum() == 120 - 8
  # 1 at the farthest edge of each axis, growing by one pixel per pixel.
  np.testing.assert_allclose(k[:, 6], [3 / 3, 2 / 3, 1 / 3, 0, 0, 0, 0, 1 / 3, 2 / 3, 1.0])
  np.testing.assert_allclose(k[5], [1, .8, .6, .4, .2, 0, 0, .2, .4, .6, .8, 1.0])
  assert k[0, 0] == pytest.approx(np.sqrt(2))


def test_poisson_variable_density_and_disc():
  shape = (128, 128)
  mask = masks.poisson_disc(shape, 4, calib=(8, 8), seed=1)
  rho = _radius(shape)
  inner = mask[(rho < 0.3) & (rho > 0.15)].mean()  # outside the 8 x 8 calibration block
  outer = mask[(rho > 0.7) & (rho < 1)].mean()
  assert inner > 1.5 * outer
  assert not mask[masks.calib_distance(shape, (8, 8)) >= 1].any()  # corners cropped, as sigpy
  uncropped = masks.poisson_disc(shape, 2, calib=(8, 8), crop_corner=False)
  assert abs(masks.acceleration(uncropped) / 2 - 1) <= 0.02


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
  """The paper's 1D 4x masks on the 320 x 320 grid."""
  for kind in ("cartesian", "equispaced"):
    mask = masks.make_mask(kind, (320, 320), 4)
    assert abs(masks.acceleration(mask) / 4 - 1) <= 0.05
  assert masks.make_mask("cartesian", (320, 320), 4)[:, 154:167].all()  # 13 = round(320 * 0.04)


@pytest.mark.parametrize("kind", masks.KINDS)
def test_reproducible_and_seeded(kind):
  a, b = (masks.make_mask(kind, (64, 80), 4, seed=3, calib=8) for _ in range(2))
  np.testing.assert_array_equal(a, b)
  assert (a != masks.make_mask(kind, (64, 80), 4, seed=4, calib=8)).any()


def test_equispaced_spacing():
  mask = masks.cartesian((16, 320), 4, equispaced=True, seed=5)[0]
  outside = np.flatnonzero(mask)
  outside = outside[(outside < 154) | (outside >= 167)]
  gaps = np.diff(outside)
  gaps = gaps[gaps < 10]  # drop the jump over the centre block
  assert gaps.max() - gaps.min() <= 1


@pytest.mark.parametrize("width", [320, 368, 372])
@pytest.mark.parametrize("accel", [4, 8])
def test_equispaced_never_wraps_next_to_a_line(width, accel):
  num_low = round(width * 0.04)
  lo = width // 2 - num_low // 2
  for seed in range(40):
    columns = np.flatnonzero(masks.cartesian((1, width), accel, equispaced=True, seed=seed)[0])
    lattice = columns[(columns < lo) | (columns >= lo + num_low)]
    assert np.diff(lattice).min() >= 2, (seed, lattice)


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
    # Unreachable: the centre alone samples more than 1 / accel, or the densest disc too little.
    (lambda: masks.make_mask("poisson", (64, 64), 4, calib=32), "out of reach"),
    (lambda: masks.make_mask("cartesian", (64, 64), 4, center_fraction=0.5), "out of reach"),
    (lambda: masks.make_mask("poisson", (64, 64), 1.1), "out of reach"),
])
def test_errors(call, match):
  with pytest.raises(ValueError, match=match):
    call()
