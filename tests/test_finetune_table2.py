"""Every row of the paper's Table 2 is a schedule preset, each with its row label; short runs name the cause."""

from __future__ import annotations

import re

import pytest

from s3d.finetune import SCHEDULES, get_schedule

# Table 2 as our text copy of the paper prints it (its transfer and trained-weight icons are lost; the
# "-" of an absent warm-up survived): warm-up 1, warm-up 2, max lr, D1..D5 and the average DSC.
TABLE2 = [
    ("-", "-", 1e-2, (45.56, 72.26, 88.80, 60.44, 82.61), 69.93),
    ("-", "-", 1e-2, (49.37, 69.13, 88.78, 60.74, 81.33), 69.87),
    ("-", "-", 1e-2, (50.37, 70.64, 88.61, 61.51, 81.91), 70.61),
    ("-", "-", 1e-3, (49.98, 71.04, 88.68, 61.45, 82.12), 70.65),
    ("-", "x", 1e-2, (49.84, 72.56, 88.45, 62.16, 81.75), 70.95),
    ("-", "x", 1e-3, (51.54, 72.74, 88.85, 62.44, 82.33), 71.58),
    ("-", "x", 1e-4, (50.66, 72.98, 88.68, 62.73, 82.09), 71.43),
    ("-", "-", 1e-2, (50.81, 68.55, 88.52, 60.73, 80.77), 69.87),
    ("-", "-", 1e-3, (50.11, 73.90, 88.58, 61.82, 81.48), 71.18),
    ("-", "x", 1e-2, (51.39, 72.06, 88.65, 61.70, 81.78), 71.12),
    ("-", "x", 1e-3, (51.04, 72.72, 88.91, 62.84, 81.19), 71.34),
    ("x", "x", 1e-2, (48.81, 72.92, 88.84, 62.46, 82.04), 71.02),
    ("x", "x", 1e-3, (51.42, 72.84, 89.09, 63.30, 82.15), 71.76),
    ("x", "x", 1e-4, (50.13, 72.26, 88.72, 61.70, 81.93), 70.95),
]


def _rows() -> dict[int, object]:
    rows = {}
    for s in SCHEDULES.values():
        m = re.match(r"row (\d+): ", s.table2_row)
        if m:
            assert int(m.group(1)) not in rows, f"two presets claim row {m.group(1)}"
            rows[int(m.group(1))] = s
        else:
            assert s.table2_row.startswith("not in Table 2: ") and s.table2_dsc is None, s.name
    return rows


def test_transcription_is_consistent() -> None:
    for i, (_w1, _w2, _lr, ds, avg) in enumerate(TABLE2, 1):
        # the average of D1-D5: each printed to 2 decimals (+-0.005), the average too (+-0.005)
        assert sum(ds) / 5 == pytest.approx(avg, abs=0.0101), i


def test_fourteen_rows_each_a_distinct_preset_with_its_label() -> None:
    rows = _rows()
    assert sorted(rows) == list(range(1, 15))
    settings = set()
    for i, (w1, w2, lr, _ds, avg) in enumerate(TABLE2, 1):
        s = rows[i]
        assert s.decoder_warmup == (w1 != "-") and s.full_warmup == (w2 != "-"), s.name
        assert s.peak_lr == lr and s.table2_dsc == avg, s.name
        assert f"{avg:.2f} DSC" in s.table2_row and f"lr {lr:.0e}".replace("e-0", "e-") in s.table2_row
        settings.add((s.transfer, s.decoder_warmup, s.full_warmup, s.frozen_encoder, s.peak_lr))
        assert len([p for p in s.plan(1000) if p.lr == "ramp"]) == s.n_warmups
    assert len(settings) == 14                                    # no two rows train the same way
    assert rows[max(rows, key=lambda r: TABLE2[r - 1][4])].name == "best"
    assert rows[1].transfer == "none" and rows[8].transfer == "encoder"   # "transfer encoder, no warm-up"
    assert [r for r, s in rows.items() if s.frozen_encoder] == [2]
    # a frozen encoder trains the decoder only, in every phase
    assert {p.trains for p in rows[2].plan(100)} == {"decoder"}


def test_list_schedules_prints_each_row(capsys) -> None:
    from s3d.cli import main

    assert main(["finetune", "--list-schedules"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == len(SCHEDULES)
    for line, (name, s) in zip(lines, SCHEDULES.items(), strict=True):
        assert line.split()[0] == name and line.endswith(s.table2_row)
    assert sum(bool(re.search(r"\brow \d+: ", line)) for line in lines) == 14


@pytest.mark.parametrize(("steps", "warmup", "expect"), [
    (8, None, "--steps 8 with schedule 'best': two warm-ups of 5 % of --steps (0 step(s) each) leave no "
              "training stage; use --steps >= 11 or --warmup-steps <= 3"),
    (30, 20, "--steps 30 with schedule 'best': two warm-ups of --warmup-steps 20 (40 step(s)) leave no "
             "training stage; use --steps >= 41 or --warmup-steps <= 14"),
    (2, 1, "use --steps >= 3"),
])
def test_too_few_steps_name_the_cause(steps: int, warmup: int | None, expect: str) -> None:
    with pytest.raises(ValueError) as e:
        get_schedule("best").plan(steps, warmup)
    assert expect in str(e.value) and "\n" not in str(e.value)
    # the smallest lengths it suggests work: 5 % warm-ups round to 1 step from 11 steps on (round(0.55))
    get_schedule("best").plan(get_schedule("best").min_steps(warmup), warmup)
    assert get_schedule("best").min_steps() == 11 and round(10 * 0.05) == 0


def test_too_few_steps_fail_at_config_time(tmp_path) -> None:
    from s3d.finetune import FinetuneConfig

    with pytest.raises(ValueError, match="--warmup-steps <= 14"):
        FinetuneConfig(str(tmp_path / "no_dataset_needed"), str(tmp_path / "out"), steps=30, warmup_steps=20)
