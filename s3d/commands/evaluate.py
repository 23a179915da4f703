"""``s3d evaluate``: Dice and NSD of a prediction folder, or rank several folders (``--compare``)."""

from __future__ import annotations

import argparse
import sys


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
    p.add_argument("--tau", type=float, default=2.0, help="NSD tolerance in mm (default: 2)")
    p.add_argument("--out", help="output folder (default: --pred folder for one method, required with "
                                 "--compare)")
    p.add_argument("--workers", type=int, default=1, help="processes evaluating cases in parallel")
    p.add_argument("--empty", default="nan", choices=["nan", "one", "zero", "ignore_empty_ref"],
                   help="score when masks are empty (default: nan, as nnU-Net; see docs/evaluation.md)")
    p.add_argument("--metric", default="dice", choices=["dice", "nsd"], help="metric to rank by (--compare)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap draws for --compare (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if bool(args.pred) == bool(args.compare):
        print("s3d evaluate: give either --pred DIR or --compare DIR1 DIR2 ...", file=sys.stderr)
        return 2
    if args.workers < 1:
        print(f"s3d evaluate: --workers must be >= 1, found {args.workers}", file=sys.stderr)
        return 2
    from s3d.metrics import evaluate_folder, load_labels

    try:
        labels = load_labels(args.labels)
    except ValueError as e:
        print(f"s3d evaluate: --labels: {e}", file=sys.stderr)
        return 2
    if args.pred:
        try:
            res = evaluate_folder(args.pred, args.ref, labels, args.tau, out_dir=args.out or args.pred,
                                  workers=args.workers, empty=args.empty)
        except (FileNotFoundError, ValueError) as e:
            print(f"s3d evaluate: {e}", file=sys.stderr)
            return 2
        _report_errors(res.errors, args.pred)
        print(res.table())
        print(f"wrote per_case.csv and summary.json to {args.out or args.pred}")
        return 1 if res.errors else 0
    return _compare(args, labels)


def _report_errors(errors: dict[str, str], where: str) -> None:
    for case, msg in errors.items():
        print(f"error: {where}: case {case}: {msg}", file=sys.stderr)


def _compare(args: argparse.Namespace, labels) -> int:
    from pathlib import Path

    from s3d._fs import write_json_atomic, write_text_atomic
    from s3d.metrics import bootstrap_ranks, evaluate_folder, plot_rank_stability, rank_methods

    if not args.out:
        print("s3d evaluate: --compare needs --out DIR for the rank table and plot", file=sys.stderr)
        return 2
    if len(args.compare) < 2:
        print("s3d evaluate: --compare needs at least two prediction folders", file=sys.stderr)
        return 2
    names = [Path(d).resolve().name for d in args.compare]
    if len(set(names)) != len(names):
        names = [str(d) for d in args.compare]
    out = Path(args.out)
    dataset = Path(args.ref).resolve().name
    results = {}
    failed = False
    for name, folder in zip(names, args.compare, strict=True):
        try:
            res = evaluate_folder(folder, args.ref, labels, args.tau, out_dir=out / name,
                                  workers=args.workers, empty=args.empty)
        except (FileNotFoundError, ValueError) as e:
            print(f"s3d evaluate: {folder}: {e}", file=sys.stderr)
            return 2
        _report_errors(res.errors, folder)
        failed |= bool(res.errors)
        results[name] = res.case_means(args.metric)
    cases = sorted(set.intersection(*(set(r) for r in results.values())))
    if not cases:
        print("s3d evaluate: no case was evaluated for every method; nothing to rank", file=sys.stderr)
        return 1
    table = {dataset: {m: [results[m][c] for c in cases] for m in names}}
    ranks = rank_methods(table)
    boot = bootstrap_ranks(table, n=args.bootstrap, seed=args.seed)
    text = ranks.to_text()
    print(f"{args.metric} (foreground mean), {len(cases)} cases evaluated by every method")
    print(text)
    write_text_atomic(out / "ranks.txt", text + "\n")
    interval = boot.interval(dataset)
    write_json_atomic(out / "ranks.json", {
        "metric": args.metric, "tau_mm": args.tau, "cases": cases, "methods": names,
        "mean": dict(zip(names, ranks.means[0].tolist(), strict=True)),
        "rank": dict(zip(names, ranks.ranks[0].tolist(), strict=True)),
        "bootstrap": {"n": args.bootstrap, "seed": args.seed,
                      "rank1_frequency": boot.frequency(1.0, dataset),
                      "median_rank": dict(zip(names, interval[:, 0].tolist(), strict=True)),
                      "rank_95": {m: interval[i, 1:].tolist() for i, m in enumerate(names)}},
    })
    try:
        plot_rank_stability(boot, out / "rank_stability.png", title=f"{args.metric}: {dataset}")
        print(f"wrote ranks.txt, ranks.json and rank_stability.png to {out}")
    except ImportError as e:
        print(f"s3d evaluate: no plot: {e}", file=sys.stderr)
        print(f"wrote ranks.txt and ranks.json to {out}")
    return 1 if failed else 0
