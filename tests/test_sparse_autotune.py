"""engine="auto" times the engines on the run's input, keeps the fastest, caches and logs it (issue 18).

The timing tests replace :data:`s3d.sparse.autotune.clock` with a fake clock that advances by a
chosen number of milliseconds for whichever candidate ran since the last reading, so the choice
must follow that table whatever the machine's real speed.
"""

from __future__ import annotations

import copy
import doctest
import logging

import pytest
import torch
from engine_probe import forward_and_engine
from tolerance import assert_yardstick, max_rel, norm_rel

import s3d
import s3d.sparse.autotune as autotune
import s3d.sparse.wrapper as wrapper_mod

SIZE = (32, 32, 32)
BLOCK = 16
LABELS = ["dense", "blocks@4", "blocks@8", "blocks@16"]  # tiny at 16^3 cells (see test_candidates_follow_the_plan)
RUNS = 2 * len(LABELS)  # per measurement with the `fake` fixture: (1 warm-up + 1 repeat) per candidate


class FakeClock:
    """Seconds; each reading first adds ``ms[label]`` of the candidate that ran since the last reading."""

    def __init__(self, ms: dict[str, float]) -> None:
        self.ms, self.now, self.calls, self.ran = ms, 0.0, 0, None

    def __call__(self) -> float:
        self.calls += 1
        if self.ran is not None:
            self.now += self.ms[self.ran] / 1000.0
            self.ran = None
        return self.now


@pytest.fixture(autouse=True)
def _fresh_cache():
    autotune.clear_cache()
    yield
    autotune.clear_cache()


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch):
    """Install a fake clock for a timing table; engine calls tell it which candidate ran."""
    calls: list[str] = []
    engines = dict(wrapper_mod.ENGINES)
    monkeypatch.setattr(autotune, "REPEATS", 1)  # 1 warm-up + 1 timed run per candidate: fast tests

    def install(ms: dict[str, float]) -> FakeClock:
        clock = FakeClock(ms)
        monkeypatch.setattr(autotune, "clock", clock)
        for name, fn in engines.items():
            def spy(*a, _fn=fn, _name=name, **kw):
                label = _name if _name == "dense" else f"blocks@{kw.get('min_block_edge')}"
                clock.ran = label
                calls.append(label)
                torch.rand(1)  # a candidate that draws random numbers: measuring must not shift the RNG
                return _fn(*a, **kw)

            monkeypatch.setitem(wrapper_mod.ENGINES, name, spy)
        return clock

    install.calls = calls
    return install


def _mae(**kw) -> s3d.SparseMAEWrapper:
    torch.manual_seed(0)
    return s3d.SparseMAEWrapper(s3d.build_resenc_unet("tiny", num_classes=1), block_size=BLOCK, mask_ratio=0.75, **kw)


def _x(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 1, *SIZE, generator=torch.Generator().manual_seed(seed))


def _keep(batch: int = 2, seed: int = 2) -> torch.Tensor:
    return s3d.sparse.sample_block_mask(batch, SIZE, BLOCK, 0.5, generator=torch.Generator().manual_seed(seed))


def test_doctests(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(autotune, "REPEATS", 1)
    assert doctest.testmod(autotune).failed == 0


def test_candidates_follow_the_plan() -> None:
    """One "blocks" candidate per distinct block_plan; edges that put nothing in blocks are dense."""
    enc = s3d.build_resenc_unet("tiny").encoder
    for cell in [(16, 16, 16), (8, 8, 8), (2, 2, 2)]:
        labels = [c.label for c in autotune.engine_candidates(enc, cell)]
        plans = {}
        for edge in autotune.CROSSOVER_EDGES:
            plan = tuple(s3d.sparse.block_plan(enc, cell, edge))
            if plan[0]:
                plans.setdefault(plan, f"blocks@{edge}")
        assert labels == ["dense", *plans.values()]
    assert [c.label for c in autotune.engine_candidates(enc, (16, 16, 16))] == LABELS
    assert [c.label for c in autotune.engine_candidates(enc, (2, 2, 2))] == ["dense"]  # 2 < every edge


@pytest.mark.parametrize(("table", "want"), [
    ({"dense": 5.0, "blocks@4": 9.0, "blocks@8": 1.0, "blocks@16": 7.0}, ("blocks", 8)),
    ({"dense": 1.0, "blocks@4": 10.0, "blocks@8": 10.0, "blocks@16": 10.0}, ("dense", None)),
    ({"dense": 3.0, "blocks@4": 2.0, "blocks@8": 2.5, "blocks@16": 2.5}, ("blocks", 4)),
])
def test_choice_follows_the_timings_and_is_what_runs(fake, table, want) -> None:
    clock = fake(table)
    mae = _mae()
    x = _x()
    with torch.no_grad():
        mae(x, mask=_keep())
    (choice,) = mae.engine_choices.values()
    assert (choice.engine, choice.min_block_edge) == want
    assert choice.timings_ms == pytest.approx(table, rel=1e-9)  # medians of exact fake times
    assert not choice.key.grad and choice.key.shape == (2, 1, *SIZE) and choice.key.masking == "masked 0.50"
    # warm-up round + timed round over every candidate, then the real forward with the winner only
    assert fake.calls == LABELS * 2 + [choice.label]
    assert clock.calls == 2 * RUNS  # two readings per run
    # the next forward runs the winner (no measuring): judged by what executed, not by the name
    with torch.no_grad():
        _, ran = forward_and_engine(mae, x, mask=_keep(seed=9))
    assert ran == want[0] and clock.calls == 2 * RUNS


def test_choice_is_cached_per_shape_and_shared_by_wrappers(fake) -> None:
    clock = fake({"dense": 2.0, "blocks@4": 1.0, "blocks@8": 3.0, "blocks@16": 4.0})
    mae = _mae()
    with torch.no_grad():
        mae(_x(), mask=_keep())
        assert clock.calls == 2 * RUNS
        mae(_x(seed=5), mask=_keep(seed=6))  # same shape, same masked fraction bucket: cached
        assert clock.calls == 2 * RUNS
        _mae()(_x(), mask=_keep())  # another wrapper of the same network: the process cache
        assert clock.calls == 2 * RUNS
        mae(_x(batch=1), mask=_keep(batch=1))  # another batch: measured again
        assert clock.calls == 4 * RUNS
        mae(_x(batch=1), generator=torch.Generator().manual_seed(3))  # a sampled mask: keyed by the ratio
        assert clock.calls == 6 * RUNS
    keys = list(autotune.cached_choices())
    assert [(k.shape[0], k.grad, k.masking) for k in keys] == [
        (2, False, "masked 0.50"), (1, False, "masked 0.50"), (1, False, "ratio 0.75")]
    assert all(c.label == "blocks@4" for c in autotune.cached_choices().values())


def test_choice_is_logged_with_every_timing(fake, caplog) -> None:
    fake({"dense": 12.5, "blocks@4": 3.4, "blocks@8": 4.0, "blocks@16": 8.0})
    with caplog.at_level(logging.INFO, logger="s3d.sparse.autotune"):
        with torch.no_grad():
            _mae()(_x(), mask=_keep())
            _mae()(_x(), mask=_keep())  # cached: not logged again
    (rec,) = [r for r in caplog.records if r.name == "s3d.sparse.autotune"]
    msg = rec.getMessage()
    assert "'auto' -> blocks@4" in msg
    for part in ("dense 12.5 ms", "blocks@4 3.4 ms", "blocks@8 4.0 ms", "blocks@16 8.0 ms", "(2, 1, 32, 32, 32)",
                 "masked 0.50", "encoder fwd:"):
        assert part in msg, (part, msg)


def test_measuring_off_uses_the_table(fake, monkeypatch) -> None:
    clock = fake({label: 1.0 for label in LABELS})
    monkeypatch.setenv("S3D_ENGINE_AUTOTUNE", "0")
    mae = _mae()
    with torch.no_grad():
        _, ran = forward_and_engine(mae, _x(), mask=_keep())
    (choice,) = mae.engine_choices.values()
    assert clock.calls == 0 and choice.source == "table" and ran == "blocks" == wrapper_mod.AUTO_ENGINE["cpu"]


def test_auto_gives_the_dense_numbers_whichever_it_picks(fake, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reconstruction, loss and gradients of "auto" with each candidate made fastest in turn.

    Each against a float64 dense run (network in float64; the loss is float32 in both, as s3d computes
    it), with the float32 dense engine as the yardstick (tests/tolerance.py): reconstruction by max error
    / max |value|, loss relative, gradients norm-wise over all parameters.
    """
    monkeypatch.setattr(autotune, "WARMUP", 0)  # one timed run per candidate is enough for a fake clock
    base = _mae()
    x, keep = _x(), _keep()

    def grads(m, o):
        m.zero_grad(set_to_none=True)
        o.loss.backward()
        return torch.cat([p.grad.reshape(-1).double() for p in m.parameters() if p.grad is not None])

    ref = copy.deepcopy(base).double()
    ref.engine = "dense"
    out_r = ref(x.double(), mask=keep)
    g_r = grads(ref, out_r)
    dense = copy.deepcopy(base)
    dense.engine = "dense"
    out_d = dense(x, mask=keep)
    g_d = grads(dense, out_d)
    rec_r, loss_r = out_r.reconstruction.detach(), float(out_r.loss.detach())
    yard_rec, yard_loss = max_rel(out_d.reconstruction, rec_r), abs(float(out_d.loss.detach()) - loss_r) / loss_r
    for label in LABELS:
        autotune.clear_cache()
        fake({lab: (1.0 if lab == label else 5.0) for lab in LABELS})
        mae = copy.deepcopy(base)
        # the candidates draw random numbers (see `fake`): after measuring, the global RNG must be where
        # the real forward alone leaves it (one draw)
        torch.manual_seed(7)
        out = mae(x, mask=keep)
        state = torch.get_rng_state()
        torch.manual_seed(7)
        torch.rand(1)
        assert torch.equal(state, torch.get_rng_state()), label
        (choice,) = mae.engine_choices.values()
        assert choice.label == label and choice.key.grad  # forward + backward: its own key
        g = grads(mae, out)
        assert g.shape == g_d.shape == g_r.shape
        if label == "dense":  # "auto" that picked dense runs the dense engine: the very same numbers
            assert torch.equal(out.reconstruction, out_d.reconstruction) and torch.equal(out.loss, out_d.loss)
            assert torch.equal(g, g_d)
            continue
        assert_yardstick(max_rel(out.reconstruction, rec_r), yard_rec, f"{label} reconstruction")
        assert_yardstick(abs(float(out.loss.detach()) - loss_r) / loss_r, yard_loss, f"{label} loss")
        assert_yardstick(norm_rel(g, g_r), norm_rel(g_d, g_r), f"{label} gradients")


def test_choice_round_trips_through_a_dict(fake) -> None:
    fake({label: 1.0 for label in LABELS})
    mae = _mae()
    with torch.no_grad():
        mae(_x(), mask=_keep())
    (choice,) = mae.engine_choices.values()
    again = autotune.EngineChoice.from_dict(choice.to_dict(), source="checkpoint")
    assert again.key == choice.key and again.label == choice.label and again.timings_ms == choice.timings_ms
    fresh = _mae()
    fresh.restore_engine_choices([choice.to_dict()])
    assert fresh.engine_choices[choice.key].source == "checkpoint"
