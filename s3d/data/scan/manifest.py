"""The manifest of a prepared directory: reading it, sharded preparation's assignment and merge.

Sharding (``s3d pretrain --prepare-only --shard I/N``, ``0 <= I < N``): a listed file belongs to shard
``blake2b(key) mod N`` where ``key`` is its path under the raw root (for list files: under the list's
folder), as a case id (:func:`~s3d.data.scan.headers.source_key`). So the assignment

- is deterministic on every machine (no coordination, no shared state besides the output folder);
- does not depend on where the archive is mounted, nor on the other files: adding files never moves
  a file to another shard, so a re-run after adding files redoes only the new ones;
- keeps duplicates (files with the same case id) in one shard, where the first one listed wins as in
  a single-machine run.

Each shard writes ``manifest.shard-IIII-of-NNNN.json`` into the shared output folder next to
``cases/``. When the last shard finishes it finds all N and merges them into ``manifest.json``
(:func:`merge_shards`; ``s3d pretrain --merge DIR`` does the same by hand). The merge checks that the
shards agree on the settings and on the listing (the number of files listed) and that every listed
file is in exactly one shard; its entries are in listing order, so the merged manifest equals a
single-machine run's entry for entry.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any

from s3d._fs import write_json_atomic

MANIFEST_NAME = "manifest.json"
CASES_DIR = "cases"
MANIFEST_VERSION = 1
_SHARD_RE = re.compile(r"^manifest\.shard-(\d+)-of-(\d+)\.json$")
#: manifest fields every shard of one preparation must share
SHARED_FIELDS = ("version", "target_spacing_mm", "dtype", "store", "filters", "listed")


def parse_shard(text: str) -> tuple[int, int]:
    """``"I/N"`` -> ``(I, N)`` with ``0 <= I < N`` (shards are numbered from 0, like array job ids).

    Example:
        >>> parse_shard("2/8")
        (2, 8)
    """
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise ValueError(f"--shard: expected I/N (e.g. 0/8), got {text!r}")
    index, count = int(m.group(1)), int(m.group(2))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text}: need 0 <= I < N (shards are numbered 0..N-1)")
    return index, count


def shard_of(key: str, count: int) -> int:
    """The shard (0..count-1) of a file's key: a stable hash (blake2b), the same on every machine.

    Example:
        >>> shard_of("ds001__sub-01__anat__sub-01_T1w", 1)
        0
    """
    digest = hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % int(count)


def shard_manifest_name(index: int, count: int) -> str:
    """File name of shard ``index`` of ``count``'s manifest (``manifest.shard-0002-of-0008.json``)."""
    return f"manifest.shard-{index:04d}-of-{count:04d}.json"


def shard_manifests(prepared_dir: str | os.PathLike[str]) -> dict[int, dict[int, Path]]:
    """The shard manifests in a folder: ``{count: {index: path}}``."""
    out: dict[int, dict[int, Path]] = {}
    d = Path(prepared_dir)
    if not d.is_dir():
        return out
    for p in d.iterdir():
        m = _SHARD_RE.match(p.name)
        if m:
            out.setdefault(int(m.group(2)), {})[int(m.group(1))] = p
    return out


def _load(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read the shard manifest ({e}); run that shard again") from e


def merge_shards(prepared_dir: str | os.PathLike[str], count: int | None = None) -> dict[str, Any]:
    """Merge the N shard manifests of ``prepared_dir`` into ``manifest.json`` and return it.

    Args:
        prepared_dir: the output folder every shard wrote to.
        count: N; default: the only N present.

    Raises:
        ValueError: shards missing (named, with the command that prepares them), shards of several
            N without ``count``, shards that disagree on settings or on the listing, or a file listed
            in two shards or in none.

    Example:
        >>> merge_shards("prep/")["counts"]["ok"]
        1000
    """
    d = Path(prepared_dir)
    found = shard_manifests(d)
    if count is None:
        if not found:
            raise ValueError(f"{d}: no shard manifests (manifest.shard-I-of-N.json) to merge")
        if len(found) > 1:
            raise ValueError(f"{d}: shard manifests of several shard counts ({', '.join(map(str, sorted(found)))}); "
                             f"remove the stale ones")
        count = next(iter(found))
    have = found.get(count, {})
    missing = [i for i in range(count) if i not in have]
    if missing:
        shown = ", ".join(f"{i}/{count}" for i in missing[:10]) + (", ..." if len(missing) > 10 else "")
        raise ValueError(f"{d}: {len(missing)} of {count} shards not prepared yet ({shown}); run "
                         f"`s3d pretrain --data RAW --out {d} --prepare-only --shard I/{count}` for each")
    shards = [_load(have[i]) for i in range(count)]
    first = shards[0]
    for i, m in enumerate(shards[1:], start=1):
        for key in SHARED_FIELDS:
            if m.get(key) != first.get(key):
                what = "listed files" if key == "listed" else key
                hint = (" (files were added or removed between shard runs: re-run every shard; finished "
                        "files are skipped)" if key == "listed" else " (run every shard with the same options)")
                raise ValueError(f"{have[i]}: {what} {m.get(key)!r} differs from {have[0].name}'s "
                                 f"{first.get(key)!r}{hint}")
    owner: dict[int, int] = {}
    for i, m in enumerate(shards):
        for idx in {e["listing_index"] for e in m["entries"]}:
            if idx in owner:
                raise ValueError(f"{have[i]}: listed file #{idx} is also in shard {owner[idx]}/{count}")
            owner[idx] = i
    listed = int(first["listed"])
    lost = sorted(set(range(listed)) - set(owner))
    if lost:
        raise ValueError(f"{d}: {len(lost)} listed file(s) are in no shard manifest (first: #{lost[0]}); "
                         f"re-run the shards")
    entries = sorted((e for m in shards for e in m["entries"]),
                     key=lambda e: (e["listing_index"], -1 if e.get("volume_index") is None else e["volume_index"]))
    counts = {s: sum(e["status"] == s for e in entries) for s in ("ok", "rejected", "failed")}
    counts.update(processed=sum(m["counts"]["processed"] for m in shards),
                  skipped=sum(m["counts"]["skipped"] for m in shards))
    merged = {**{k: v for k, v in first.items() if k not in ("shard", "entries", "counts")},
              "counts": counts, "entries": entries, "shards": count}
    write_json_atomic(d / MANIFEST_NAME, merged)
    return merged


def read_manifest(prepared_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Load ``manifest.json`` of a prepared directory (clear error if it is not one).

    Example:
        >>> read_manifest("prep/")["counts"]
        {'ok': 40, 'rejected': 3, 'failed': 1, 'processed': 40, 'skipped': 0}
    """
    path = Path(prepared_dir) / MANIFEST_NAME
    if not path.is_file():
        shards = shard_manifests(prepared_dir)
        if shards:
            have = ", ".join(f"{len(v)} of {n}" for n, v in sorted(shards.items()))
            raise FileNotFoundError(f"{prepared_dir}: no {MANIFEST_NAME} yet, only shard manifests ({have}); "
                                    f"run the missing shards, then `s3d pretrain --merge {prepared_dir}`")
        raise FileNotFoundError(f"{prepared_dir}: no {MANIFEST_NAME}; run `s3d pretrain --prepare-only` "
                                f"(or s3d.data.scan.prepare) on the raw folder first")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise ValueError(f"{path}: not a valid manifest ({e}); prepare the directory again") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("entries"), list):
        raise ValueError(f"{path}: not a manifest (no 'entries' list); prepare the directory again")
    return manifest


def training_cases(manifest: dict[str, Any], prepared_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The preprocessed cases of a manifest: dicts with ``case_id``, ``subject``, ``file`` (under ``prepared_dir``).

    Raises:
        ValueError: an entry without its keys, or a ``file`` that is not a relative path inside
            ``prepared_dir`` (a manifest never points s3d elsewhere); the message names the manifest.
    """
    from s3d._paths import safe_relative

    base = Path(prepared_dir)
    source = base / MANIFEST_NAME
    out = []
    for i, e in enumerate(manifest["entries"]):
        try:
            if e["status"] != "ok" or not e.get("file"):
                continue
            out.append({"case_id": e["case_id"], "subject": e["subject"],
                        "file": str(safe_relative(e["file"], f"entry {i}: file", source, base)),
                        "shape": e.get("preprocessed_shape")})
        except (KeyError, TypeError, AttributeError) as err:
            raise ValueError(f"{source}: entry {i} is malformed ({type(err).__name__}: {err}); prepare the "
                             "directory again") from None
    return out
