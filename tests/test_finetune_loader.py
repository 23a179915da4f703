"""The fine-tuning data stream (per-step seeds, background prefetch) and batched validation tiles."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from tolerance import assert_yardstick

from s3d.finetune.loader import BatchStream, PatchPrefetcher, foreground_flags, sample_step
from s3d.finetune.patches import CachedCase
from s3d.finetune.validation import predict_tiled


def _cases(n: int = 3, shape=(40, 36, 44)) -> list[CachedCase]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        seg = np.zeros(shape, np.int16)
        seg[10:14, 8:12, 20:25] = 1
        locs = np.concatenate([np.ones((80, 1)), np.argwhere(seg == 1)], 1).astype(np.int32)
        out.append(CachedCase(f"c{i}", rng.normal(size=(2, *shape)).astype(np.float32), seg, locs))
    return out


def test_foreground_flags_split_the_global_batch() -> None:
    # nnU-Net: the last round(B * 0.33) samples of the (global) batch are forced onto foreground
    assert foreground_flags(6, 0.33) == [False] * 4 + [True] * 2
    assert foreground_flags(6, 0.33, 0, 2) + foreground_flags(6, 0.33, 1, 2) == foreground_flags(6, 0.33)
    assert foreground_flags(6, 0.33, 2, 3) == [True, True] and foreground_flags(2, 0.33, 0, 2) == [False]


def test_batch_is_a_function_of_seed_rank_step() -> None:
    cases = _cases()
    a = sample_step(cases, 3, (16, 16, 16), seed=1, rank=0, step=7)
    b = sample_step(cases, 3, (16, 16, 16), seed=1, rank=0, step=7)
    assert all(torch.equal(u, v) for u, v in zip(a, b, strict=True))
    for other in (dict(seed=2, rank=0, step=7), dict(seed=1, rank=1, step=7), dict(seed=1, rank=0, step=8)):
        assert not torch.equal(sample_step(cases, 3, (16, 16, 16), **other)[0], a[0]), other
    # the augmented batch too, however many batches were drawn before it
    stream = BatchStream(cases, (16, 16, 16), torch.device("cpu"), seed=1, global_batch=3)
    x5 = stream.batch(5)
    for t in range(5):
        stream.batch(t)
    assert torch.equal(stream.batch(5)[0], x5[0]) and torch.equal(stream.batch(5)[1], x5[1])


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_prefetcher_hands_out_the_same_batches_from_background_threads(threads: int) -> None:
    cases = _cases()
    made_in: list[str] = []

    def make(t: int):
        made_in.append(threading.current_thread().name)
        return sample_step(cases, 2, (16, 16, 16), seed=0, rank=0, step=t)

    with PatchPrefetcher(make, 3, 12, torch.device("cpu"), threads=threads) as batches:
        for t in range(3, 12):
            x, y = batches.get(t)
            ref = sample_step(cases, 2, (16, 16, 16), seed=0, rank=0, step=t)
            assert torch.equal(x, ref[0]) and torch.equal(y, ref[1]), t
    assert len(made_in) == 9                                      # each step made once, none past the end
    main_thread = threading.current_thread().name
    assert all((name != main_thread) == bool(threads) for name in made_in)


def test_prefetcher_passes_errors_on() -> None:
    def make(t: int):
        if t == 2:
            raise ValueError("bad case")
        return torch.zeros(1), torch.zeros(1)

    with PatchPrefetcher(make, 0, 5, torch.device("cpu"), threads=2) as batches:
        batches.get(0)
        batches.get(1)
        with pytest.raises(ValueError, match="bad case"):
            batches.get(2)


def test_batched_tiles_equal_one_tile_at_a_time() -> None:
    from s3d.nn import build_resenc_unet

    torch.manual_seed(0)
    net = build_resenc_unet("tiny", in_channels=2, num_classes=3, deep_supervision=True).eval()
    data = np.random.default_rng(1).normal(size=(2, 50, 40, 70)).astype(np.float32)   # 2 x 2 x 3 tiles, padded
    cpu = torch.device("cpu")
    ref = predict_tiled(net, data, (32, 32, 32), cpu, tile_batch=1, return_logits=True)
    assert ref.shape == (3, 50, 40, 70)
    # batched and one-tile convolutions round differently: both against the one-tile prediction of the
    # float64 network (the truth), the float32 one-tile prediction is the yardstick
    net64 = copy.deepcopy(net).double()
    truth = predict_tiled(lambda t: net64(t.double()), data, (32, 32, 32), cpu, tile_batch=1, return_logits=True)
    yard = float(np.abs(ref - truth).max())
    for tb in (4, 12, 100):
        got = predict_tiled(net, data, (32, 32, 32), cpu, tile_batch=tb, return_logits=True)
        err = float(np.abs(got - truth).max())
        assert_yardstick(err / np.abs(truth).max(), yard / np.abs(truth).max(), f"tile_batch {tb}")
        labels = predict_tiled(net, data, (32, 32, 32), cpu, tile_batch=tb)
        ref_labels = ref.argmax(0)
        top2 = np.sort(ref, 0)[-2:]
        clear = top2[1] - top2[0] > 2 * (err + yard)                  # not a near-tie at these errors
        assert clear.mean() > 0.99
        assert np.array_equal(labels[clear], ref_labels[clear])
    # an independent reference for one tile: the network on that tile alone
    with torch.no_grad():
        tile = net(_padded_tile(data, (32, 0, 32)))[0][0].numpy()   # full-resolution output, (3, 32, 32, 32)
    # the same batch-of-1 computation on the same input: identical on any CPU
    np.testing.assert_array_equal(ref[:, 32:50, 0:32, 32:64], tile[:, :18])
    with pytest.raises(ValueError, match="tile_batch"):
        predict_tiled(net, data, (32, 32, 32), cpu, tile_batch=0)


def _padded_tile(data: np.ndarray, start: tuple[int, int, int]) -> torch.Tensor:
    """The 32^3 tile at ``start`` of ``data`` zero-padded past its end, (1, C, 32, 32, 32)."""
    out = np.zeros((data.shape[0], 32, 32, 32), np.float32)
    d, h, w = start
    part = data[:, d:d + 32, h:h + 32, w:w + 32]
    out[:, :part.shape[1], :part.shape[2], :part.shape[3]] = part
    return torch.from_numpy(out)[None]
