"""``s3d models``: the table of named pretrained weights."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the named pretrained weights (the model zoo)",
        description="List the registry of named pretrained weights.",
    )
    parser.add_argument("--json", action="store_true", help="print the full registry as JSON")
    parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    import json

    from s3d.hub import list_models

    entries = list_models()
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
        return 0
    rows = [("name", "aliases", "repo", "revision", "format", "method", "licence")]
    for e in entries:
        if e.package_data is not None:  # shipped inside s3d; the file's sha256 is checked on load
            revision = f"shipped, sha256 {e.sha256[:12]}" if e.sha256 else "shipped"
        else:
            revision = e.revision[:12] if e.pinned else f"{e.revision} (unpinned)"
        short_aliases = [a for a in e.aliases if "/" not in a]
        rows.append(
            (e.name, ", ".join(short_aliases) or "-", e.repo_id, revision, e.format, e.method, e.license)
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for n, row in enumerate(rows):
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))
    print(
        "\nload with: s3d.load_pretrained(NAME, in_channels=..., num_classes=...)"
        "; provenance: s3d models --json"
    )
    return 0
