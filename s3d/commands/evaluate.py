"""``s3d evaluate``: Dice and NSD of a prediction folder, or rank several folders (``--compare``)."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="Dice and NSD of predicted label maps; --compare ranks several methods",
        description="Evaluate NIfTI predictions against references (matched by case id): per-case CSV, "
                    "summary JSON and a printed table. With --compare DIR1 DIR2 ..., evaluate each "
                    "folder, rank the methods and bootstrap the rank stability (table + PNG blob plot).")
    p.add_argument("--pred", help="folder of predicted label maps (CASE.nii.gz)")
    p.add_argument("--compare", nargs="+", metavar="DIR", help="several prediction folders to rank")
    p.add_argument("--ref", required=True, help="folder of reference label maps (same file names)")
    p.add_argument("--labels", required=True, help="nnU-Net dataset.json with a 'labels' entry")
    p.add_argument("--tau", type=_tau_mm, default=2.0, help="NSD tolerance in mm, > 0 (default: 2)")
    p.add_argument("--out", help="output folder (default: --pred folder for one method, required with "
                                 "--compare)")
    p.add_argument("--workers", type=_at_least_one, default=1, help="processes evaluating cases in parallel")
    p.add_argument("--empty", default="nan", choices=["nan", "one", "zero", "ignore_empty_ref"],
                   help="score when masks are empty (default: nan, as nnU-Net; see docs/evaluation.md)")
    p.add_argument("--metric", default="dice", choices=["dice", "nsd"], help="metric to rank by (--compare)")
    p.add_argument("--bootstrap", type=_at_least_one, default=1000, help="bootstrap draws for --compare (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=run)


def _tau_mm(text: str) -> float:
    try:
        tau = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a tolerance in mm, found {text!r}") from None
    if not (math.isfinite(tau) and tau > 0):
        raise argparse.ArgumentTypeError(f"the NSD tolerance must be > 0 mm, found {text}")
    return tau


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, found {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, found {n}")
    return n


def run(args: argparse.Namespace) -> int:
    if bool(args.pred) == bool(args.compare):
        print("s3d evaluate: error: give either --pred DIR or --compare DIR1 DIR2 ...", file=sys.stderr)
        return 2
    if args.compare:
        if not args.out:
            print("s3d evaluate: error: --compare needs --out DIR for the rank table and plot", file=sys.stderr)
            return 2
        if len(args.compare) < 2:
            print("s3d evaluate: error: --compare needs at least two prediction folders", file=sys.stderr)
            return 2
        return _compare(args)
    from s3d.metrics import evaluate_folder, write_evaluation

    out = Path(args.out or args.pred)
    _check_folders(out, [args.pred], args.ref)
    labels = _labels(args.labels)
    res = evaluate_folder(args.pred, args.ref, labels, args.tau, workers=args.workers, empty=args.empty)
    _report(res, args.pred)
    print(res.table())
    write_evaluation(res, out)  # OSError naming the file: the CLI prints it as the last line, exit 1
    print(f"wrote per_case.csv and summary.json to {out}")
    return 1 if res.errors else 0


def _check_folders(out: Path, preds: list[str], ref: str, compare: bool = False, extra: tuple[str, ...] = ()) -> None:
    """Before anything is read: ``--out`` is a folder apart from ``--ref`` (and, with ``--compare``, from every
    prediction folder; one method's ``--out`` defaults to its ``--pred``); then an earlier evaluation there
    is removed (with the ``extra`` files of ``--compare``), and the input folders are checked."""
    from s3d._paths import check_apart, input_folder, output_folder

    output_folder(out, "--out folder")
    inputs = [(Path(ref), "--ref folder")]
    if compare:
        inputs += [(Path(p), "--compare folder") for p in preds]
    check_apart(out, "--out folder", inputs)
    _discard(out, extra)  # no earlier summary.json may look like this run's, whatever fails next
    for folder in preds:
        input_folder(folder, "--compare folder" if compare else "--pred folder")
    input_folder(ref, "--ref folder")


def _method_names(folders: list[str]) -> list[str]:
    """One sub-folder name of ``--out`` per compared folder: its own name, with its parents' names where two
    are alike (``a/pred``, ``b/pred`` -> ``a-pred``, ``b-pred``); always one plain name, never a path."""
    from s3d._paths import safe_name

    parts = [Path(d).resolve().parts for d in folders]
    depth = 1
    while True:
        names = ["-".join(p[-depth:]).lstrip("/-") or "method" for p in parts]
        if len(set(names)) == len(names) or depth > max(len(p) for p in parts):
            break
        depth += 1
    if len(set(names)) != len(names):
        names = [f"{n}-{i}" for i, n in enumerate(names)]
    return [safe_name(n.replace("\\", "-"), "method name", "--compare") for n in names]


def _labels(path: str):
    from s3d.metrics import load_labels

    try:
        return load_labels(path)
    except ValueError as e:
        raise ValueError(f"--labels: {e}") from e


def _discard(out: Path, extra: tuple[str, ...] = ()) -> None:
    from s3d.metrics import discard_evaluation
    from s3d.metrics.outputs import OUTPUTS

    earlier = [n for n in (*OUTPUTS, *extra) if (out / n).is_file()]
    if earlier:
        print(f"note: {out}: replacing the earlier {', '.join(earlier)} (removed now; this run writes new ones)",
              file=sys.stderr)
    left = discard_evaluation(out)
    for name in extra:
        try:
            (out / name).unlink(missing_ok=True)
        except OSError:
            left.append(out / name)
    for path in left:
        print(f"warning: {path} is from an earlier run and cannot be removed", file=sys.stderr)


def _report(res, where: str) -> None:
    """Per-case errors and notes (rounded voxels, ignored files) on stderr, one line each."""
    from s3d.metrics import ROUND_TOL

    ignored = res.summary.get("ignored_files", [])
    if ignored:
        some = ", ".join(ignored[:5]) + (f" and {len(ignored) - 5} more" if len(ignored) > 5 else "")
        print(f"note: {where}: ignored {len(ignored)} file(s) that are not NIfTI (.nii.gz/.nii): {some}",
              file=sys.stderr)
    for case, counts in res.rounded.items():
        parts = " and ".join(f"{n} voxels of the {kind}" for kind, n in counts.items())
        print(f"note: {where}: case {case}: rounded {parts} to the nearest integer label (each within "
              f"{ROUND_TOL:g})", file=sys.stderr)
    for case, msg in res.errors.items():
        print(f"error: {where}: case {case}: {msg}", file=sys.stderr)


def _compare(args: argparse.Namespace) -> int:
    from s3d._fs import write_json_atomic, write_text_atomic
    from s3d.metrics import bootstrap_ranks, evaluate_folder, plot_rank_stability, rank_methods, write_evaluation

    names = _method_names(args.compare)
    out = Path(args.out)
    _check_folders(out, args.compare, args.ref, compare=True, extra=("ranks.txt", "ranks.json", "rank_stability.png"))
    for name in names:
        _discard(out / name)
    labels = _labels(args.labels)
    dataset = Path(args.ref).resolve().name
    results = {}
    failed = False
    write_errors: list[str] = []
    for name, folder in zip(names, args.compare, strict=True):
        res = evaluate_folder(folder, args.ref, labels, args.tau, workers=args.workers, empty=args.empty)
        _report(res, folder)
        failed |= bool(res.errors)
        results[name] = res.case_means(args.metric)
        try:
            write_evaluation(res, out / name)
        except OSError as e:
            write_errors.append(str(e))
    cases = sorted(set.intersection(*(set(r) for r in results.values())))
    if not cases:
        raise ValueError("no case was evaluated for every method; nothing to rank")
    table = {dataset: {m: [results[m][c] for c in cases] for m in names}}
    ranks = rank_methods(table)
    boot = bootstrap_ranks(table, n=args.bootstrap, seed=args.seed)
    text = ranks.to_text()
    print(f"{args.metric} (foreground mean), {len(cases)} cases evaluated by every method")
    print(text)
    interval = boot.interval(dataset)
    ranks_json = {
        "metric": args.metric, "tau_mm": args.tau, "cases": cases, "methods": names,
        "mean": dict(zip(names, ranks.means[0].tolist(), strict=True)),
        "rank": dict(zip(names, ranks.ranks[0].tolist(), strict=True)),
        "bootstrap": {"n": args.bootstrap, "seed": args.seed,
                      "rank1_frequency": boot.frequency(1.0, dataset),
                      "median_rank": dict(zip(names, interval[:, 0].tolist(), strict=True)),
                      "rank_95": {m: interval[i, 1:].tolist() for i, m in enumerate(names)}},
    }
    for path, write in ((out / "ranks.txt", lambda p: write_text_atomic(p, text + "\n")),
                        (out / "ranks.json", lambda p: write_json_atomic(p, ranks_json))):
        try:
            write(path)
        except OSError as e:
            write_errors.append(f"cannot write {path}: {e.strerror or e}")
            break
    if write_errors:
        more = f" (and {len(write_errors) - 1} more)" if len(write_errors) > 1 else ""
        raise OSError(write_errors[0] + more)
    try:
        plot_rank_stability(boot, out / "rank_stability.png", title=f"{args.metric}: {dataset}")
        print(f"wrote ranks.txt, ranks.json and rank_stability.png to {out}")
    except ImportError as e:
        print(f"s3d evaluate: no plot: {e}", file=sys.stderr)
        print(f"wrote ranks.txt and ranks.json to {out}")
    return 1 if failed else 0
