"""docs/bad-input.md lists every case of the bad-input corpus (tests/test_bad_input_*.py), and there are >= 30."""

from __future__ import annotations

import importlib
import sys
from collections import Counter
from pathlib import Path

from badinput import CASES, OUTCOMES, Case

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "bad-input.md"


def _corpus() -> list[Case]:
    """Every registered case: the corpus files import the one harness (``badinput``, on ``pythonpath``)."""
    for path in sorted(HERE.glob("test_bad_input_*.py")):
        if path.stem != "test_bad_input_doc":
            importlib.import_module(path.stem)
    assert "tests.badinput" not in sys.modules, "a corpus file imports the harness as tests.badinput: use badinput"
    keys = Counter((c.command, c.test) for c in CASES)
    assert all(n == 1 for n in keys.values()), [k for k, n in keys.items() if n > 1]
    return list(CASES)


def _rows() -> list[list[str]]:
    lines = [line for line in DOC.read_text(encoding="utf-8").splitlines() if line.startswith("| ")]
    return [[x.strip() for x in line.strip().strip("|").split("|")] for line in lines]


def test_every_corpus_case_is_documented() -> None:
    cases = _corpus()
    assert len(cases) >= 30, f"the corpus has {len(cases)} cases; issue 14 asks for at least 30"
    rows = _rows()
    # a test name may recur in another command's file (test_one_voxel_thick): a row is (command, test)
    for c in cases:
        mine = [r for r in rows if r[0] == f"`{c.command}`" and f"`{c.test}`" in r[-1]]
        assert len(mine) == 1, f"docs/bad-input.md has {len(mine)} rows for {c.command} {c.test}"
        assert len(mine[0]) == 5 and mine[0][2] in OUTCOMES and mine[0][2] == c.outcome, mine[0]
    documented = [r for r in rows if len(r) == 5 and r[-1].startswith("`test_")]
    assert len(documented) == len(cases), "docs/bad-input.md has rows for cases the corpus does not have"


def test_summary_counts_match_the_corpus() -> None:
    cases = _corpus()
    header = next(r for r in _rows() if r[:2] == ["command", "error"])
    assert header == ["command", *OUTCOMES, "cases"], header
    summary = {r[0]: [int(x) for x in r[1:]] for r in _rows() if len(r) == 5 and all(x.isdigit() for x in r[1:])}
    n = Counter((c.command, c.outcome) for c in cases)
    expected = {f"`{cmd}`": [n[cmd, o] for o in OUTCOMES] + [sum(n[cmd, o] for o in OUTCOMES)]
                for cmd in sorted({c.command for c in cases})}
    per_outcome = Counter(c.outcome for c in cases)
    expected["all"] = [per_outcome[o] for o in OUTCOMES] + [len(cases)]
    assert summary == expected
