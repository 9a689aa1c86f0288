"""Slice preparation, the slice cache, splits, the synthetic dataset and the batch iterators."""
import dataclasses
import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lwjax import data
from lwjax.data import fastmri, synthetic
from lwjax.mri import sense

SIZE, COILS, SLICES = 48, 4, 3
CFG = data.PrepConfig(image_size=SIZE, mask="poisson", accel=4.0, calib=16, maps="lowres")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
  return data.make_synthetic_dataset(tmp_path_factory.mktemp("synth"), train_subjects=2,
                                     val_subjects=1, slices=SLICES, coils=COILS, size=SIZE)


@pytest.fixture
def count_prepare(monkeypatch):
  calls = []
  prepare = data.prepare_slice

  def counted(*args, **kwargs):
    calls.append(1)
    return prepare(*args, **kwargs)

  monkeypatch.setattr(data.cache, "prepare_slice", counted)
  return calls


def _assert_same(a: data.Split, b: data.Split):
  for f in dataclasses.fields(data.Split):
    va, vb = getattr(a, f.name), getattr(b, f.name)
    if isinstance(va, np.ndarray):
      np.testing.assert_array_equal(va, vb, err_msg=f.name)
    else:
      assert va == vb, f.name


# Preparation.


@pytest.mark.parametrize("cfg", [
    CFG,
    dataclasses.replace(CFG, maps="espirit"),
    dataclasses.replace(CFG, mask="cartesian", accel=3.0, center_fraction=0.25),
])
def test_prepare_slice(cfg):
  vol = synthetic.make_volume(np.random.default_rng(3), size=SIZE, coils=COILS, slices=1,
                              noise_std=0.001)
  grid = fastmri.to_grid(vol["kspace"][0], SIZE)
  mask = data.mask_for(cfg)
  ex = data.prepare_slice(grid, mask, cfg)

  for k in "xy":
    assert ex[k].shape == (SIZE, SIZE, 2) and ex[k].dtype == np.float32
  assert ex["maps"].shape == (COILS, SIZE, SIZE) and ex["maps"].dtype == np.complex64
  magnitude = lambda a: np.hypot(a[..., 0], a[..., 1])
  np.testing.assert_allclose(magnitude(ex["x"]).max(), 1.0, rtol=1e-6)
  truth = np.abs(vol["image"][0]) / ex["scale"]
  rel = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  assert rel(magnitude(ex["y"]), truth) < 0.05  # maps may differ in phase, not in magnitude
  assert rel(ex["x"], ex["y"]) > 0.1  # undersampling aliases the input


def test_calib_size_is_the_sampled_centre():
  mask = np.zeros((32, 32), bool)
  mask[:, 13:19] = True  # 6 centre lines (16 +- 3), all rows of them
  assert data.calib_size(mask, 8) == (8, 6)
  mask[:, 10:22] = True
  assert data.calib_size(mask, 8) == (8, 8)
  poisson = np.zeros((32, 32), bool)
  poisson[12:21, 11:21] = True  # rows 12..20, columns 11..20 around the centre (16, 16)
  assert data.calib_size(poisson, 12) == (9, 10)
  assert data.calib_size(poisson, 8) == (8, 8)
  with pytest.raises(ValueError, match="mask: expected a fully sampled k-space centre"):
    data.calib_size(np.zeros((32, 32), bool), 8)


@pytest.mark.parametrize("changes, match", [
    (dict(accel=1.0), "accel"),
    (dict(accel=0.5), "accel"),
    (dict(calib=64), "calib"),
    (dict(mask="cartesian", center_fraction=1.5), "center_fraction"),
    (dict(mask="radial"), "radial"),
])
def test_mask_errors_name_the_argument(changes, match):
  with pytest.raises(ValueError, match=match) as error:
    data.mask_for(dataclasses.replace(CFG, **changes))
  assert str(error.value).startswith("--mask=")  # The flags of the run come first.


# Splits and the cache.


def test_splits_are_by_file(dataset, tmp_path):
  messages = []
  train = data.load_split(dataset, "train", CFG, cache_dir=tmp_path, log=messages.append)
  val = data.load_split(dataset, "val", CFG, cache_dir=tmp_path)
  assert messages[-1] == f"train: prepared {2 * SLICES}/{2 * SLICES} slices (0 from cache)"

  assert train.x.shape == train.y.shape == (2 * SLICES, SIZE, SIZE, 2) and train.maps is None
  assert train.x.dtype == train.y.dtype == train.scale.dtype == np.float32
  assert train.mask.shape == (SIZE, SIZE) and train.mask.dtype == bool
  assert train.ids == [(f"synth_train_00{v}.h5", s) for v in range(2) for s in range(SLICES)]
  np.testing.assert_array_equal(train.volume_index, np.repeat([0, 1], SLICES))
  assert not {f for f, _ in train.ids} & {f for f, _ in val.ids}
  assert len(val.ids) == SLICES
  one = data.load_split(dataset, "train", CFG, cache_dir=tmp_path, max_volumes=1)
  np.testing.assert_array_equal(one.x, train.x[:SLICES])


def test_cache_is_reused(dataset, tmp_path, count_prepare):
  first = data.load_split(dataset, "train", CFG, cache_dir=tmp_path, with_maps=True)
  assert len(count_prepare) == 2 * SLICES
  assert first.maps.shape == (2 * SLICES, COILS, SIZE, SIZE) and first.maps.dtype == np.complex64
  messages = []
  again = data.load_split(dataset, "train", CFG, cache_dir=tmp_path, with_maps=True,
                          log=messages.append)
  assert len(count_prepare) == 2 * SLICES
  assert messages[-1].endswith(f"({2 * SLICES} from cache)")
  _assert_same(first, again)
  no_maps = data.load_split(dataset, "train", CFG, cache_dir=tmp_path)  # maps-less read is a hit
  assert len(count_prepare) == 2 * SLICES and no_maps.maps is None
  np.testing.assert_array_equal(no_maps.y, first.y)


def test_split_on_disk_is_the_split_in_memory_and_leaves_no_file(dataset, tmp_path, monkeypatch):
  cache = tmp_path / "cache"
  memory = data.load_split(dataset, "train", CFG, cache_dir=cache, with_maps=True,
                           with_kspace=True)
  entries = sorted(cache.iterdir())
  disk = data.load_split(dataset, "train", CFG, cache_dir=cache, with_maps=True,
                         with_kspace=True, storage="disk")
  for key in ("x", "y", "maps", "kspace"):
    assert isinstance(getattr(disk, key), np.memmap)  # Backed by a file, not host memory.
  _assert_same(memory, disk)
  assert sorted(cache.iterdir()) == entries  # The scratch files are gone already.
  with pytest.raises(ValueError, match="storage: expected 'memory' or 'disk'"):
    data.load_split(dataset, "train", CFG, cache_dir=cache, storage="ssd")
  if hasattr(os, "posix_fallocate"):  # A full disk is refused up front, naming the folder.
    def full(*args):
      raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", full)
    with pytest.raises(OSError, match=f"--host_data=disk: {cache}: expected room for"):
      data.load_split(dataset, "train", CFG, cache_dir=cache, storage="disk")
    assert sorted(cache.iterdir()) == entries


def test_cache_without_maps_is_recomputed_for_maps(dataset, tmp_path, count_prepare):
  data.load_split(dataset, "val", CFG, cache_dir=tmp_path)
  with_maps = data.load_split(dataset, "val", CFG, cache_dir=tmp_path, with_maps=True)
  assert len(count_prepare) == 2 * SLICES and with_maps.maps.shape[0] == SLICES


def _savez(path, **arrays):
  with open(path, "wb") as f:
    np.savez(f, **arrays)


def _entry(**changes):
  ok = dict(x=np.zeros((SIZE, SIZE, 2), np.float32), y=np.zeros((SIZE, SIZE, 2), np.float32),
            scale=np.float32(1))
  return lambda p: _savez(p, **{k: v for k, v in {**ok, **changes}.items() if v is not None})


CORRUPTIONS = {
    "truncated": lambda p: p.write_bytes(p.read_bytes()[:len(p.read_bytes()) // 2]),
    "not_zip": lambda p: p.write_bytes(b"garbage"),
    "missing_y": _entry(y=None),
    "wrong_dtype": _entry(y=np.zeros((SIZE, SIZE, 2), np.float64)),
    "wrong_shape": _entry(x=np.zeros((SIZE, 8, 2), np.float32)),
    "nan": _entry(x=np.full((SIZE, SIZE, 2), np.nan, np.float32)),
    "zero_scale": _entry(scale=np.float32(0)),
}


@pytest.fixture(scope="module")
def fresh_train(dataset, tmp_path_factory):
  return data.load_split(dataset, "train", CFG, cache_dir=tmp_path_factory.mktemp("fresh"))


@pytest.mark.parametrize("corrupt", CORRUPTIONS.values(), ids=CORRUPTIONS.keys())
def test_bad_cache_entries_are_recomputed(dataset, fresh_train, tmp_path, count_prepare, corrupt):
  data.load_split(dataset, "train", CFG, cache_dir=tmp_path)
  corrupt(sorted(tmp_path.glob("*.npz"))[1])
  del count_prepare[:]
  _assert_same(data.load_split(dataset, "train", CFG, cache_dir=tmp_path), fresh_train)
  assert len(count_prepare) == 1
  _assert_same(data.load_split(dataset, "train", CFG, cache_dir=tmp_path), fresh_train)
  assert len(count_prepare) == 1  # the recomputed entry was rewritten


def test_leftover_temporary_file_is_ignored(dataset, fresh_train, tmp_path, count_prepare):
  data.load_split(dataset, "train", CFG, cache_dir=tmp_path)
  entry = sorted(tmp_path.glob("*.npz"))[2]
  entry.unlink()  # a writer crashed before os.replace, leaving a well-formed but wrong entry
  _savez(tmp_path / f".{entry.name}.0123abcd.tmp", x=fresh_train.x[0] + 1,
         y=fresh_train.y[0] + 1, scale=np.float32(2))
  del count_prepare[:]
  _assert_same(data.load_split(dataset, "train", CFG, cache_dir=tmp_path), fresh_train)
  assert len(count_prepare) == 1


def test_cache_keys(dataset):
  path = fastmri.list_volumes(dataset, "train")[0]
  key = data.cache_key(path, 0, CFG)
  assert key == data.cache_key(Path(os.path.relpath(path)), 0, CFG)
  others = [data.cache_key(path, 1, CFG),
            data.cache_key(fastmri.list_volumes(dataset, "train")[1], 0, CFG),
            data.cache_key(path, 0, dataclasses.replace(CFG, mask="cartesian")),
            data.cache_key(path, 0, dataclasses.replace(CFG, mask_seed=1)),
            data.cache_key(path, 0, dataclasses.replace(CFG, maps="espirit"))]
  assert len({key, *others}) == 1 + len(others)
  os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1))  # the file changed
  assert data.cache_key(path, 0, CFG) != key


def test_cache_key_follows_the_mask_bits_not_the_mask_flags(dataset):
  # A changed mask algorithm must not reuse entries prepared with the old mask; flags that give
  # the same mask (320 / 4.0 and 320 / 4.01 columns both round to 80) prepare the same slices.
  path = fastmri.list_volumes(dataset, "train")[0]
  cfg = dataclasses.replace(CFG, mask="cartesian", image_size=320, center_fraction=0.04)
  key = data.cache_key(path, 0, cfg)
  same = dataclasses.replace(cfg, accel=4.01)
  assert np.array_equal(data.mask_for(same), data.mask_for(cfg))
  assert data.cache_key(path, 0, same) == key
  other = data.mask_for(cfg).copy()
  other[0, 0] = ~other[0, 0]  # one k-space sample more or less
  assert data.cache_key(path, 0, cfg, mask=other) != key
  assert data.cache_key(path, 0, dataclasses.replace(cfg, calib=12)) != key  # maps' region


def test_a_file_rewritten_with_its_old_size_and_mtime_is_prepared_again(tmp_path):
  # cp -p / rsync -a / tar can give new content the old size and mtime; the norm attr differs.
  kspace = np.random.default_rng(0).standard_normal((1, COILS, 2 * SIZE, SIZE)).astype(np.complex64)
  path = tmp_path / "train" / "a.h5"
  path.parent.mkdir()
  fastmri.write_volume(path, kspace, np.ones((1, SIZE, SIZE)))
  first = data.load_split(tmp_path, "train", CFG, cache_dir=tmp_path / "cache")
  st = os.stat(path)
  fastmri.write_volume(path, 2 * kspace, np.ones((1, SIZE, SIZE)))
  os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
  assert os.stat(path).st_size == st.st_size
  again = data.load_split(tmp_path, "train", CFG, cache_dir=tmp_path / "cache")
  np.testing.assert_allclose(again.scale, 2 * first.scale, rtol=1e-5)


def test_files_with_fewer_coils_are_padded_with_zero_coils(tmp_path):
  # fastMRI brain splits mix coil counts; data consistency stacks maps and k-space, so the
  # smaller files get zero coils, which add nothing to any SENSE sum: A^H y is still x.
  rng = np.random.default_rng(1)
  kspace = (rng.standard_normal((1, COILS, 2 * SIZE, SIZE))
            + 1j * rng.standard_normal((1, COILS, 2 * SIZE, SIZE))).astype(np.complex64)
  (tmp_path / "train").mkdir()
  fastmri.write_volume(tmp_path / "train" / "a_fewer.h5", kspace[:, :2], np.ones((1, SIZE, SIZE)))
  fastmri.write_volume(tmp_path / "train" / "b_more.h5", kspace, np.ones((1, SIZE, SIZE)))
  messages = []
  split = data.load_split(tmp_path, "train", CFG, cache_dir=tmp_path / "cache", with_maps=True,
                          with_kspace=True, log=messages.append)
  assert split.maps.shape[:2] == split.kspace.shape[:2] == (2, COILS)
  assert not split.maps[0, 2:].any() and not split.kspace[0, 2:].any()
  assert split.maps[0, :2].any()
  assert any("padded with zero coils" in m for m in messages)
  for i in range(2):
    x = sense.zero_filled(split.kspace[i], split.maps[i], split.mask)
    np.testing.assert_allclose(np.stack([x.real, x.imag], -1), split.x[i], atol=1e-5)


@pytest.mark.parametrize("workers", [1, 2])  # 2: raised in a worker process, re-raised here
def test_bad_files_name_file_and_slice(tmp_path, workers):
  (tmp_path / "train").mkdir()
  kspace = np.ones((2, COILS, 2 * SIZE, SIZE), np.complex64)
  kspace[1, 0, 3, 3] = np.nan
  fastmri.write_volume(tmp_path / "train" / "bad.h5", kspace, np.ones((2, SIZE, SIZE)))
  with pytest.raises(fastmri.DataError, match=r"bad.h5: key 'kspace', slice 1: expected finite"):
    data.load_split(tmp_path, "train", CFG, cache_dir=tmp_path / "cache", workers=workers)
  with pytest.raises(fastmri.DataError, match=r"split 'val'"):
    data.load_split(tmp_path, "val", CFG, cache_dir=tmp_path / "cache")


def test_an_error_stops_the_workers_without_preparing_the_rest(tmp_path):
  # The first slice is bad; the 15 after it are fine. The error must not wait for them all.
  # (128 x 128, 16 coils: ~0.3 s of single-threaded ESPIRiT per good slice, so 2 workers need
  # over 2 s for the 15, much longer than a busy machine takes to pass the first error on.)
  (tmp_path / "train").mkdir()
  rng = np.random.default_rng(0)
  vol = synthetic.make_volume(rng, size=128, coils=16, slices=16)
  vol["kspace"][0, 0, 0, 0] = np.nan
  fastmri.write_volume(tmp_path / "train" / "a.h5", vol["kspace"], vol["rss"])
  cfg = dataclasses.replace(CFG, image_size=128, maps="espirit")
  with pytest.raises(fastmri.DataError, match=r"a.h5: key 'kspace', slice 0: expected finite"):
    data.load_split(tmp_path, "train", cfg, cache_dir=tmp_path / "cache", workers=2)
  assert len(list((tmp_path / "cache").glob("*.npz"))) < 15


def _noise(rng, coils, shape, std=1e-4):
  return (std * (rng.standard_normal((coils, *shape)) + 1j * rng.standard_normal((coils, *shape)))
          ).astype(np.complex64)


@pytest.mark.parametrize("workers", [1, 2])
def test_empty_slices_are_skipped_and_logged(tmp_path, count_prepare, workers):
  # A 15-coil file (ESPIRiT finds no coil in pure noise with fastMRI's coil counts; with 4 coils
  # it does not tell noise from signal) whose first slice is all zero, second noise only and a
  # middle one noise only: those three are skipped; the rest are kept, in order, once.
  coils, slices = 15, 6
  rng = np.random.default_rng(3)
  vol = synthetic.make_volume(rng, size=SIZE, coils=coils, slices=slices)
  kspace = vol["kspace"]
  kspace[0] = 0
  for i in (1, 3):
    kspace[i] = _noise(rng, coils, kspace.shape[2:])
  (tmp_path / "train").mkdir()
  fastmri.write_volume(tmp_path / "train" / "edge.h5", kspace, vol["rss"])
  fastmri.write_volume(tmp_path / "train" / "z_empty.h5", np.zeros_like(kspace[:2]),
                       vol["rss"][:2])  # A file with no slice left.
  cfg = dataclasses.replace(CFG, maps="espirit")
  messages = []
  split = data.load_split(tmp_path, "train", cfg, cache_dir=tmp_path / "cache", with_maps=True,
                          workers=workers, log=messages.append)
  assert split.ids == [("edge.h5", i) for i in (2, 4, 5)]
  assert [(f, i) for f, i, _ in split.skipped] == [("edge.h5", i) for i in (0, 1, 3)] + [
      ("z_empty.h5", 0), ("z_empty.h5", 1)]
  assert split.skipped[0][2] == "all-zero k-space"
  assert split.skipped[1][2].startswith("espirit coil maps are zero on the whole grid (a "
                                        "noise-only slice? If slices with signal are skipped")
  assert any("skipped 5 of 8 slices" in m and "data.json" in m for m in messages)
  assert any("1 file(s) have no slice left and are not used (e.g. z_empty.h5)" in m
             for m in messages)
  assert len(split.x) == len(split.y) == len(split.scale) == len(split.maps) == 3
  assert np.isfinite(split.x).all() and (split.scale > 0).all()
  # The kept slices are those prepared on their own, compacted in place.
  for row, index in enumerate((2, 4, 5)):
    one = data.prepare_slice(fastmri.to_grid(kspace[index], SIZE), split.mask, cfg)
    np.testing.assert_allclose(split.x[row], one["x"], atol=1e-6)
  # Patches of consecutive slices do not span the skipped slice 3: only (4, 5) is one.
  np.testing.assert_array_equal(data.volume_patches(split, 2), [[1, 2]])
  # The decision is cached: a second load prepares nothing.
  calls = len(count_prepare)
  again = data.load_split(tmp_path, "train", cfg, cache_dir=tmp_path / "cache", with_maps=True)
  assert len(count_prepare) == calls
  _assert_same(split, again)
  # The threshold is applied on loading, to the coverage the entries record: nothing is
  # prepared again, and a threshold above every slice's coverage leaves none.
  keep_all = data.load_split(tmp_path, "train", dataclasses.replace(cfg, min_map_coverage=0.0),
                             cache_dir=tmp_path / "cache", with_maps=True)
  _assert_same(split, keep_all)
  with pytest.raises(fastmri.DataError, match=r"every slice .* was skipped .*slice 0: all-zero"):
    data.load_split(tmp_path, "train", dataclasses.replace(cfg, min_map_coverage=0.999999),
                    cache_dir=tmp_path / "cache", with_maps=True)
  some = data.load_split(tmp_path, "train", dataclasses.replace(cfg, min_map_coverage=0.65),
                         cache_dir=tmp_path / "cache", with_maps=True)
  assert len(count_prepare) == calls
  coverage = lambda row: np.mean(np.any(split.maps[row] != 0, axis=0))
  expected = [i for row, i in enumerate((2, 4, 5)) if coverage(row) >= 0.65]
  assert 0 < len(expected) < 3 and [i for _, i in some.ids] == expected
  assert all("less than --min_map_coverage=0.65 (65.00%)" in why for _, i, why in some.skipped
             if i in (2, 4, 5))
  # Low-resolution maps cover noise too (another cache key): only all-zero k-space stays out.
  keep = data.load_split(tmp_path, "train", dataclasses.replace(cfg, maps="lowres"),
                         cache_dir=tmp_path / "cache")
  assert keep.ids == [("edge.h5", i) for i in (1, 2, 3, 4, 5)]


def test_a_split_of_empty_slices_is_refused(tmp_path):
  (tmp_path / "train").mkdir()
  fastmri.write_volume(tmp_path / "train" / "zero.h5", np.zeros((2, COILS, 2 * SIZE, SIZE),
                                                                np.complex64),
                       np.zeros((2, SIZE, SIZE)))
  with pytest.raises(fastmri.DataError, match=r"train: every slice of 1 file\(s\) was skipped .*"
                                               r"zero.h5, key 'kspace', slice 0: all-zero"):
    data.load_split(tmp_path, "train", CFG, cache_dir=tmp_path / "cache")


def test_a_file_in_two_splits_is_refused(tmp_path, dataset):
  # A symlink and a copy of a training file in val: the same subject in both splits.
  load = lambda root, split: data.load_split(root, split, CFG, cache_dir=tmp_path / "cache")
  train = load(dataset, "train")
  data.check_disjoint({"train": train, "val": load(dataset, "val")})
  for how, make in (("is the same file as", lambda src, dst: dst.symlink_to(src)),
                    ("holds the same k-space as",
                     lambda src, dst: dst.write_bytes(src.read_bytes()))):
    root = tmp_path / how.replace(" ", "_")
    (root / "val").mkdir(parents=True)
    make(dataset / "train" / "synth_train_001.h5", root / "val" / "copy.h5")
    with pytest.raises(fastmri.DataError, match=rf"copy.h5 \(val\) {how} .*synth_train_001.h5 "
                                                 r"\(train\): a subject in two splits"):
      data.check_disjoint({"train": train, "val": load(root, "val")})
  # A copy prepared elsewhere (scales off in the last bits) is the same data.
  copy = load(root, "val")
  data.check_disjoint({"train": train, "val": dataclasses.replace(copy, scale=copy.scale * 1.5)})
  with pytest.raises(fastmri.DataError, match="holds the same k-space as"):
    data.check_disjoint({"train": train,
                         "val": dataclasses.replace(copy, scale=copy.scale * (1 + 1e-5))})


# The synthetic dataset.


def test_make_synthetic_dataset_is_idempotent(tmp_path, monkeypatch):
  made = []
  make_volume = synthetic.make_volume
  monkeypatch.setattr(synthetic, "make_volume",
                      lambda *a, **k: made.append(1) or make_volume(*a, **k))
  kw = dict(train_subjects=2, val_subjects=1, slices=2, coils=2, size=16, seed=5)
  out = data.make_synthetic_dataset(tmp_path / "a", **kw)
  names = lambda: [f.relative_to(out).as_posix() for f in sorted(out.rglob("*.h5"))]
  assert names() == ["train/synth_train_000.h5", "train/synth_train_001.h5", "val/synth_val_000.h5"]
  assert len(made) == 3
  data.make_synthetic_dataset(tmp_path / "a", **kw)
  assert len(made) == 3  # reused

  read = lambda root, name: fastmri.read_slice(next(root.rglob(name)), 1)
  other = data.make_synthetic_dataset(tmp_path / "b", **kw)
  for name in ("synth_train_000.h5", "synth_val_000.h5"):
    np.testing.assert_array_equal(read(out, name), read(other, name))  # deterministic
  assert not np.allclose(read(out, "synth_train_000.h5"), read(out, "synth_train_001.h5"))

  (out / "manifest.json").unlink()  # a partial dataset
  del made[:]
  data.make_synthetic_dataset(tmp_path / "a", **kw)
  assert len(made) == 3
  data.make_synthetic_dataset(tmp_path / "a", **{**kw, "train_subjects": 1, "seed": 6})
  assert names() == ["train/synth_train_000.h5", "val/synth_val_000.h5"]  # stale file removed
  assert json.loads((out / "manifest.json").read_text())["seed"] == 6
  assert not np.allclose(read(out, "synth_train_000.h5"), read(other, "synth_train_000.h5"))


def test_make_data_script(tmp_path):
  result = subprocess.run(
      [sys.executable, str(REPO / "launch" / "make_data.py"), f"--out_dir={tmp_path}",
       "--image_size=16", "--synth_coils=2", "--synth_train_subjects=1", "--synth_val_subjects=1",
       "--synth_slices=2"],
      capture_output=True, text=True, check=True, timeout=120)
  assert "synth_train_000.h5" in result.stdout
  for split in ("train", "val"):
    (path,) = fastmri.list_volumes(tmp_path, split)
    info = fastmri.open_volume(path)
    assert info.kspace_shape == (2, 2, 32, 18)
    assert fastmri.read_slice(path, 1).shape == (2, 32, 18)


# Iterators.


def _arrays(n=10):
  return dict(x=np.arange(n * 3, dtype=np.float32).reshape(n, 3), i=np.arange(n))


def test_train_batches():
  # An epoch as the training loop draws it: batch_order's indices, gather's batches.
  arrays = _arrays()
  epoch = lambda e, bs=4: [data.gather(arrays, idx) for idx in
                           data.batch_order(10, bs, seed=1, epoch=e, num_devices=2)]
  first = epoch(0)
  assert len(first) == data.steps_per_epoch(10, 4) == 2
  for b in first:
    assert b["x"].shape == (4, 3) and b["i"].shape == (4,)
    np.testing.assert_array_equal(b["x"], arrays["x"][b["i"]])
  seen = np.concatenate([b["i"] for b in first])
  assert len(set(seen)) == len(seen) == 8
  assert all(np.array_equal(a["i"], b["i"]) for a, b in zip(first, epoch(0)))
  assert not np.array_equal(seen, np.concatenate([b["i"] for b in epoch(1)]))
  assert sorted(np.concatenate([b["i"] for b in epoch(2, bs=10)])) == list(range(10))

  with pytest.raises(ValueError, match="batch_size 6 is not divisible by num_devices 4"):
    data.batch_order(10, 6, seed=0, epoch=0, num_devices=4)
  with pytest.raises(ValueError, match=r"--batch_size=12: expected 1..10, the number of training"):
    data.batch_order(10, 12, seed=0, epoch=0)
  with pytest.raises(ValueError, match="one leading size"):
    data.eval_batches({"x": np.zeros(3), "y": np.zeros(4)}, 2)


def test_eval_batches():
  arrays = _arrays()
  batches = list(data.eval_batches(arrays, 4))
  assert [b["valid"].sum() for b in batches] == [4, 4, 2]
  np.testing.assert_array_equal(batches[-1]["valid"], [True, True, False, False])
  assert all(b["x"].shape == (4, 3) and b["x"].dtype == np.float32 for b in batches)
  got = np.concatenate([b["i"][b["valid"]] for b in batches])
  np.testing.assert_array_equal(got, np.arange(10))
  np.testing.assert_array_equal(batches[-1]["x"][2:], 0)
  assert len(list(data.eval_batches(arrays, 5))) == 2
  with pytest.raises(ValueError, match="batch_size 0"):
    data.eval_batches(arrays, 0)


def test_parallel_preparation_matches_serial(dataset, tmp_path):
  serial = data.load_split(dataset, "train", CFG, cache_dir=tmp_path / "serial", workers=1)
  messages = []
  parallel = data.load_split(dataset, "train", CFG, cache_dir=tmp_path / "parallel", workers=2,
                             log=messages.append)
  _assert_same(parallel, serial)
  assert parallel.ids == serial.ids
  assert any("2 workers" in m for m in messages)
  # The workers wrote the cache: a second read prepares nothing.
  messages.clear()
  _assert_same(data.load_split(dataset, "train", CFG, cache_dir=tmp_path / "parallel",
                               workers=2, log=messages.append), serial)
  n = len(serial.x)
  assert messages == [f"train: prepared {n}/{n} slices ({n} from cache)"]



def test_settings_that_cannot_make_espirit_maps_are_named(tmp_path):
  # A 4x 1D mask at 64 with the default centre fraction fully samples a 16x5 centre: no data file is
  # to blame, the flags are.
  cfg = dataclasses.replace(CFG, image_size=64, mask="cartesian", maps="espirit")
  with pytest.raises(ValueError, match=r"--maps=espirit needs .* 12x12.*--mask=cartesian.*"
                                       r"--image_size=64 samples 16x5"):
    data.checked_mask(cfg)
  with pytest.raises(ValueError, match="--maps=espirit needs"):
    data.load_split(tmp_path, "train", cfg, cache_dir=tmp_path / "cache")
  data.checked_mask(dataclasses.replace(cfg, maps="lowres"))
  data.checked_mask(dataclasses.replace(cfg, center_fraction=0.25))  # 16 lines


def test_full_pass_epochs_weigh_every_example_once():
  n, b = 10, 4
  order = data.batch_order(n, b, seed=3, epoch=1, full_pass=True)
  assert len(order) == data.steps_per_epoch(n, b, full_pass=True) == 3
  flat = np.concatenate(order)
  assert sorted(flat[flat >= 0]) == list(range(n)) and (flat < 0).sum() == 2
  # The mean over the epoch's batches of each batch's weighted mean is the mean over all n.
  values = np.random.default_rng(0).normal(size=n)
  batches = [data.gather({"v": values}, idx, full_pass_of=n) for idx in order]
  assert [list(bt["weight"] > 0) for bt in batches][-1] == [True, True, False, False]
  means = [np.mean(bt["weight"] * bt["v"]) for bt in batches]
  assert np.mean(means) == pytest.approx(values.mean(), rel=1e-6)
  assert "weight" not in data.gather({"v": values}, order[0])


def test_grid_columns_are_where_the_acquired_energy_lands():
  # fastMRI knee geometry: 368 columns of which 18 .. 349 were acquired, cropped to 320 in image
  # space. Independent check of the mapping: the energy of padded k-space on the grid.
  rng = np.random.default_rng(0)
  kspace = rng.standard_normal((1, 64, 368)) + 1j * rng.standard_normal((1, 64, 368))
  kspace[..., :18] = kspace[..., 350:] = 0
  energy = np.sum(np.abs(fastmri.to_grid(kspace, (64, 320))) ** 2, axis=(0, 1))
  lo, hi = data.grid_columns((18, 350), 368, 320)
  assert (lo, hi) == (16, 304)  # 32 of 320 grid columns lie outside, as 48 of 368 did
  inside = energy[lo:hi].mean()
  assert energy[lo:hi].min() > 0.5 * inside
  # (The boundary columns lo - 1 and hi hold parts of both; beyond them, the sinc's tails.)
  assert energy[:lo - 1].max() < 0.1 * inside and energy[hi + 1:].max() < 0.1 * inside


def test_acceleration_over_the_acquired_columns(dataset, tmp_path):
  split = data.load_split(dataset, "train", CFG, cache_dir=tmp_path)
  assert split.acquired == [(0, SIZE)] * len(split.paths)  # synthetic: every column acquired
  accel = data.acquired_acceleration(split)
  assert accel[0] == accel[1] == pytest.approx(split.mask.size / split.mask.sum())
  split.acquired[0] = (4, SIZE - 4)
  inner = split.mask[:, 4:SIZE - 4]
  assert data.acquired_acceleration(split) == pytest.approx((inner.size / inner.sum(), accel[1]))
  split.acquired = [None] * len(split.paths)
  assert data.acquired_acceleration(split) is None


def test_masks_sampling_zero_padded_columns_are_reported(tmp_path):
  # fastMRI-style files: 40 columns of which 4 .. 35 were acquired, the rest zero. A 1D mask
  # spends some of its lines there; the log and the split say what the acceleration really is.
  rng = np.random.default_rng(1)
  vol = synthetic.make_volume(rng, size=SIZE, coils=COILS, slices=2)
  kspace = fastmri.to_grid(vol["kspace"].reshape(-1, *vol["kspace"].shape[2:]),
                           (2 * SIZE, 40)).reshape(2, COILS, 2 * SIZE, 40)
  kspace[..., :4] = kspace[..., 36:] = 0
  (tmp_path / "train").mkdir()
  fastmri.write_volume(tmp_path / "train" / "a.h5", kspace, vol["rss"], acquired=(4, 36))
  cfg = dataclasses.replace(CFG, mask="cartesian", center_fraction=0.08)
  logged = []
  split = data.load_split(tmp_path, "train", cfg, cache_dir=tmp_path / "cache",
                          log=logged.append)
  # Column k of 40 lands at 24 + (k - 20) * 48 / 40 on the grid: 4 -> 4.8, 35 -> 42.
  assert split.acquired == [(5, 43)]
  columns = split.mask[0]
  outside = (columns[:5].sum() + columns[43:].sum()) / columns.sum()
  assert outside > 0.01  # mask seed 0 puts lines there
  assert data.samples_outside_acquired(split) == pytest.approx(outside)
  accel = 38 / columns[5:43].sum()
  assert data.acquired_acceleration(split) == pytest.approx((accel, accel))
  line, = [s for s in logged if "did not acquire" in s]
  assert f"up to {outside:.1%} of the mask's samples" in line
  assert f"4.00 over the grid, {accel:.2f} over the acquired columns" in line


def test_a_grid_smaller_than_the_files_reconstruction_grid_is_logged(tmp_path):
  # --image_size below the header's reconSpace crops the field of view; that must be said.
  rng = np.random.default_rng(2)
  vol = synthetic.make_volume(rng, size=SIZE, coils=COILS, slices=1)
  (tmp_path / "train").mkdir()
  # A non-square reconstruction grid, larger than the run's grid in one direction only.
  fastmri.write_volume(tmp_path / "train" / "a.h5", vol["kspace"], vol["rss"][:, :, :SIZE - 8])
  logged = []
  small = dataclasses.replace(CFG, image_size=SIZE - 4, calib=12)
  for cfg in (CFG, small):
    data.load_split(tmp_path, "train", cfg, cache_dir=tmp_path / "cache", log=logged.append)
  crops = [s for s in logged if "a larger reconstruction grid" in s]
  assert len(crops) == 1 and f"a.h5: {SIZE}x{SIZE - 8} in its header" in crops[0]
  assert f"cropped to the central {SIZE - 4}x{SIZE - 4} pixels" in crops[0]


def test_coarse_lowres_maps_are_warned_about():
  warning = lambda cfg: data.calibration_warning(cfg, data.mask_for(cfg))
  assert warning(CFG) is None  # the Poisson disc's 16 x 16
  coarse = dataclasses.replace(CFG, mask="cartesian", center_fraction=0.04)  # 16 x 2 at 48
  assert "--maps=lowres from a 16x2 calibration block" in warning(coarse)
  assert warning(dataclasses.replace(coarse, maps="espirit")) is None
