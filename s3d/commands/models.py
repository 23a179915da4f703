"""``s3d models``: the table of named pretrained weights, grouped by family and pre-training method."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "models",
        help="list the named pretrained weights (the model zoo)",
        description="List the registry of named pretrained weights, grouped by model family and pre-training "
        "method.",
    )
    parser.add_argument("--json", action="store_true", help="print the full registry as JSON")
    parser.set_defaults(func=_run)


def method_group(method: str) -> str:
    """The short method name a registry entry is grouped under (``"S3D (Spark3D: ...)"`` -> ``"S3D"``)."""
    return method.split(" (")[0].strip() or "-"


def _run(args: argparse.Namespace) -> int:
    import json

    from s3d.hub import list_models

    entries = list_models()
    if args.json:
        print(json.dumps([e.to_dict() for e in entries], indent=2))
        return 0
    families = {"ResEncUNet": "ResEnc U-Net", "Primus": "Primus"}
    groups: dict[tuple[str, str], list] = {}
    for e in entries:
        groups.setdefault((e.family, method_group(e.method)), []).append(e)
    header = ("name", "aliases", "repo", "revision", "data", "licence")
    rows: list[tuple[str, ...] | str] = []
    for family in families:
        keys = [k for k in groups if k[0] == family]
        if not keys:
            continue
        rows.append(f"{families[family]}")
        for key in keys:
            rows.append(f"  {key[1]}")
            for e in groups[key]:
                if e.package_data is not None:  # shipped inside s3d; the file's sha256 is checked on load
                    revision = f"shipped, sha256 {e.sha256[:12]}" if e.sha256 else "shipped"
                elif e.pinned:
                    revision = e.revision[:12]
                else:
                    revision = f"{e.revision} (unpinned)" + (f", sha256 {e.sha256[:12]}" if e.sha256 else "")
                short_aliases = [a for a in e.aliases if "/" not in a]
                data = e.data.split(":")[0].split(" (")[0]
                rows.append(("    " + e.name, ", ".join(short_aliases) or "-", e.repo_id or "-", revision, data,
                             e.license))
    table = [header] + [r for r in rows if isinstance(r, tuple)]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print("  ".join(cell.ljust(w) for cell, w in zip(("    " + header[0], *header[1:]), widths, strict=True)).rstrip())
    print("  ".join("-" * w for w in widths))
    for row in rows:
        if isinstance(row, str):
            print(row)
        else:
            print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    n_public = sum(1 for e in entries if e.package_data is None)
    print(
        f"\n{n_public} public checkpoints (+ {len(entries) - n_public} shipped with s3d). "
        "load with: s3d.load_pretrained(NAME, in_channels=..., num_classes=...); "
        "method, citation, record and provenance: s3d models --json"
    )
    return 0
