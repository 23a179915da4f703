"""The volume stores: blosc2 ``.b2nd`` crops equal ``.npy`` crops bitwise; layout; loader wait statistics."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from s3d.data.pretrain_dataset import LoaderStats, RandomCropDataset, build_pretrain_loader
from s3d.data.store import B2ND_BLOCKS, B2ND_CHUNKS, b2nd_layout, open_volume, read_crop, save_volume

SHAPES = [(1, 97, 83, 101), (1, 40, 30, 50), (2, 33, 81, 17)]  # not multiples of the chunk/block grid


def _volumes(rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for shape in SHAPES:
        v = np.full(shape, -0.8, np.float32)  # a z-scored constant background ...
        inner = tuple(slice(n // 6, n - n // 6) for n in shape[1:])
        v[(slice(None), *inner)] = rng.standard_normal([shape[0], *(s.stop - s.start for s in inner)])
        out.append(v)  # ... around noise 'tissue'
    return out


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_b2nd_crops_equal_npy_crops_bitwise(tmp_path: Path, dtype: str) -> None:
    vols = _volumes(np.random.default_rng(0))
    for ch in (1, 2):
        sel = [v for v in vols if v.shape[0] == ch]
        npy = [str(save_volume(tmp_path / f"v{ch}_{i}.npy", v, dtype)) for i, v in enumerate(sel)]
        b2 = [str(save_volume(tmp_path / f"v{ch}_{i}.b2nd", v, dtype)) for i, v in enumerate(sel)]
        for patch in ((32, 32, 32), (64, 96, 48)):  # inside, and larger than some volumes (zero-padded)
            a, b = RandomCropDataset(npy, patch, seed=3), RandomCropDataset(b2, patch, seed=3)
            for i in range(25):
                assert a.locate(i) == b.locate(i)
                x, y = a[i], b[i]
                assert x.dtype == y.dtype == torch.float32 and torch.equal(x, y), (ch, patch, i)
        for p, v in zip(b2, sel, strict=True):  # the whole volume round-trips exactly (in the stored dtype)
            back = open_volume(p)[...]
            assert back.dtype == np.dtype(dtype) and np.array_equal(back, v.astype(dtype))


def test_b2nd_layout_is_the_crop_grid(tmp_path: Path) -> None:
    import blosc2

    v = _volumes(np.random.default_rng(1))[0]
    path = save_volume(tmp_path / "v.b2nd", v)
    arr = open_volume(path)
    assert isinstance(arr, blosc2.NDArray)
    assert B2ND_CHUNKS == (80, 80, 80) and all(160 % c == 0 for c in B2ND_CHUNKS)  # 2 chunks per 160^3 crop
    assert all(c % b == 0 for c, b in zip(B2ND_CHUNKS, B2ND_BLOCKS, strict=True))
    assert arr.chunks == (1, 80, 80, 80) and arr.blocks == (1, 16, 16, 16)
    assert b2nd_layout((1, 180, 220, 40)) == ((1, 80, 80, 40), (1, 16, 16, 16))
    cp = arr.schunk.cparams
    assert cp.codec == blosc2.Codec.LZ4 and cp.clevel == 5 and blosc2.Filter.SHUFFLE in cp.filters
    # lossless yet smaller: a third of the volume is constant background
    assert path.stat().st_size < 0.8 * v.nbytes
    # a crop reaching outside is zero-padded, like the .npy store (reference: numpy slicing of the array)
    crop = read_crop(arr, (-5, 70, 90), (20, 20, 20))
    ref = np.zeros((1, 20, 20, 20), np.float32)
    ref[:, 5:, :13, :11] = v[:, :15, 70:83, 90:101]
    assert np.array_equal(crop, ref)


def test_loader_workers_read_b2nd_like_the_main_process(tmp_path: Path) -> None:
    vols = [v for v in _volumes(np.random.default_rng(2)) if v.shape[0] == 1]
    files = [str(save_volume(tmp_path / f"v{i}.b2nd", v)) for i, v in enumerate(vols)]
    ds = RandomCropDataset(files, (24, 24, 24), seed=5)
    ref = torch.stack([ds[i] for i in range(8)])  # opens volumes here: the workers must not inherit them
    loader = build_pretrain_loader(files, (24, 24, 24), 4, 0, 2, seed=5, workers=2, pin_memory=False,
                                   prefetch_factor=2)
    assert torch.equal(torch.cat(list(loader)), ref)


def test_loader_stats_tell_a_waiting_consumer_from_a_waiting_loader() -> None:
    def slow_source(n: int):
        for i in range(n):
            time.sleep(0.05)
            yield i

    stats = LoaderStats(slow_source(6))
    assert list(stats) == list(range(6))
    assert stats.take()["loader_wait"] > 0.8  # all the time went into waiting for data
    stats = LoaderStats(range(6))
    for _ in stats:
        time.sleep(0.05)  # a slow "training step"
    took = stats.take()
    assert took["loader_wait"] < 0.2 and "loader_queue" not in took  # no worker queue to look at
    stats = LoaderStats(torch.utils.data.DataLoader(list(range(8)), batch_size=2, num_workers=2))
    for _ in stats:
        time.sleep(0.05)
    took = stats.take()
    assert 0 <= took["loader_queue"] <= 4  # 2 workers x prefetch 2
