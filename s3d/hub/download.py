"""Hub downloads through ``huggingface_hub.hf_hub_download`` plus sha256 pinning.

Caching, resuming, file locking and offline mode (``HF_HUB_OFFLINE=1``) all come from
huggingface_hub; this module only adds the checksum check and turns its errors into messages
that name the repository, revision and file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

CHUNK = 1 << 20


class ChecksumError(RuntimeError):
    """A downloaded file does not have the pinned sha256; it was removed from the cache."""


class HubFileError(FileNotFoundError):
    """A file could not be fetched from the Hub (missing, offline and not cached, network)."""


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks.

    Example:
        >>> sha256_file("model.safetensors")[:8]
        '3f2a9c1e'
    """
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _quarantine(path: Path) -> None:
    """Remove a bad cached file: the blob it points to and the snapshot link."""
    real = path.resolve()
    for p in {real, path}:
        with contextlib.suppress(FileNotFoundError, IsADirectoryError):
            p.unlink()


def commit_from_cache_path(path: str | os.PathLike[str]) -> str | None:
    """The commit hash in a Hub cache path (``.../snapshots/<commit>/<file>``), else ``None``."""
    parts = Path(path).parts
    if "snapshots" in parts:
        i = parts.index("snapshots")
        if i + 1 < len(parts) and len(parts[i + 1]) == 40:
            return parts[i + 1]
    return None


def hub_download(
    repo_id: str,
    filename: str,
    *,
    revision: str | None = None,
    sha256: str | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
) -> Path:
    """Download (or find in the cache) one file of a Hub model repo, verifying ``sha256`` if given.

    Args:
        repo_id: ``"org/name"``.
        filename: path inside the repo.
        revision: branch, tag or 40-hex commit (``None`` = ``main``).
        sha256: expected hex digest. On mismatch the file is deleted from the cache (so it is never
            used later) and :class:`ChecksumError` is raised.
        cache_dir: Hub cache directory (default: huggingface_hub's, ``HF_HUB_CACHE``).
        endpoint: Hub URL; default ``$HF_ENDPOINT`` read at call time, else huggingface.co.

    Returns:
        The local path (inside the Hub cache).

    Example:
        >>> p = hub_download("AnonRes/ResEncL-OpenMind-MAE", "config.json")
    """
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    from s3d._version import __version__

    endpoint = endpoint or os.environ.get("HF_ENDPOINT") or None
    where = f"{repo_id}@{revision or 'main'}/{filename}"
    try:
        path = hf_hub_download(
            repo_id,
            filename,
            revision=revision,
            cache_dir=cache_dir,
            endpoint=endpoint,
            library_name="s3d",
            library_version=__version__,
        )
    except LocalEntryNotFoundError as err:  # subclass of EntryNotFoundError: test it first
        raise HubFileError(
            f"{where} is not in the local cache and the Hub cannot be reached "
            f"(offline mode or network error): {_first_line(err)}"
        ) from err
    except RepositoryNotFoundError as err:
        raise HubFileError(
            f"Hub repository {repo_id!r} not found (or private) while fetching {where}: {_first_line(err)}"
        ) from err
    except RevisionNotFoundError as err:
        raise HubFileError(
            f"revision {revision!r} not found in Hub repository {repo_id!r} while fetching {where}"
        ) from err
    except (EntryNotFoundError, RemoteEntryNotFoundError) as err:
        raise HubFileError(
            f"file {filename!r} not found in Hub repository {repo_id!r} (revision {revision or 'main'})"
        ) from err
    except HfHubHTTPError as err:
        raise HubFileError(
            f"could not fetch {where} from {endpoint or 'the Hub'}: {_first_line(err)}"
        ) from err
    except OSError as err:  # e.g. a truncated transfer (huggingface_hub's size consistency check)
        raise HubFileError(
            f"download of {where} failed and nothing was cached for it: {_first_line(err)}"
        ) from err
    path = Path(path)
    if sha256 is not None:
        got = sha256_file(path)
        if got != sha256.lower():
            _quarantine(path)
            raise ChecksumError(
                f"{where}: sha256 mismatch (expected {sha256.lower()}, got {got}); the file was removed "
                "from the cache. The upload changed or the download is corrupt; re-run to download again, "
                "or update the registry pin if the new file is trusted."
            )
    return path


def _first_line(err: BaseException) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
