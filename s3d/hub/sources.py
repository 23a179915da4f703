"""Where pretrained weights come from: a registry name, a Hub repo, a local directory or file.

:func:`resolve` turns what the user typed into local files (downloading from the Hub when needed)
plus what is known about them: the format, the architecture from ``config.json``, the registry
entry and its adaptation keys. Every failure names the path, repository or file it concerns.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from s3d.hub.adapt import AdaptationKeys, keys_for
from s3d.hub.download import ChecksumError, HubFileError, hub_download, sha256_file
from s3d.hub.nnssl import CheckpointError
from s3d.hub.registry import ModelEntry, get_entry, list_models
from s3d.hub.s3d_format import CONFIG_NAME, WEIGHTS_NAME, is_s3d_config, parse_config, read_config
from s3d.nn.family import ModelConfig

#: The file name nnssl gives its final checkpoint (also what OpenMind repos publish).
NNSSL_NAME = "checkpoint_final.pth"
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt")

_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


@dataclass
class Source:
    """Resolved weights: the local file, its format and what is known about it.

    Attributes:
        weights: the local weights file (in the Hub cache for Hub sources).
        format: ``"s3d"`` (safetensors) or ``"nnssl"`` (``.pth``).
        config: the architecture from ``config.json`` (s3d format), ``None`` when there is none.
        entry: the registry entry, ``None`` for directories, files and unregistered repos.
        repo_id, revision: Hub origin (``None`` for local files).
        sha256: the pinned digest the download was verified against.
        config_file: the ``config.json`` that ``config`` was read from.
        cache_dir: the Hub cache the weights came from (for companion files such as
            ``adaptation_plan.json``).
    """

    weights: Path
    format: str
    config: ModelConfig | None = None
    entry: ModelEntry | None = None
    repo_id: str | None = None
    revision: str | None = None
    sha256: str | None = None
    config_file: Path | None = None
    cache_dir: str | None = None

    def keys_for(self, config: ModelConfig) -> AdaptationKeys:
        """The registry entry's adaptation keys, else those of ``config``'s family."""
        return self.entry.keys if self.entry is not None else keys_for(config)


def _s3d_source(weights: Path) -> Source:
    """Safetensors weights with the ``config.json`` next to them, if there is one."""
    cfg = weights.parent / CONFIG_NAME
    if cfg.is_file():
        return Source(weights, "s3d", read_config(cfg), config_file=cfg)
    return Source(weights, "s3d")


def _holds_weights(folder: Path) -> bool:
    """``folder`` has a file :func:`_local_source` would read as weights."""
    return ((folder / WEIGHTS_NAME).is_file() or (folder / NNSSL_NAME).is_file()
            or any(folder.glob("*.pth")) or any(folder.glob("*.pt")))


def _local_source(path: Path) -> Source:
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / WEIGHTS_NAME).is_file():
            return _s3d_source(path / WEIGHTS_NAME)
        if (path / NNSSL_NAME).is_file():
            return Source(path / NNSSL_NAME, "nnssl")
        pths = sorted(path.glob("*.pth")) + sorted(path.glob("*.pt"))
        if len(pths) == 1:
            return Source(pths[0], "nnssl")
        if (path / CONFIG_NAME).is_file() and not pths:
            raise FileNotFoundError(
                f"{path / WEIGHTS_NAME}: missing - {path} has {CONFIG_NAME} but no weights. Copy the "
                f"{WEIGHTS_NAME} that belongs with it into the directory (save_pretrained writes both)."
            )
        found = sorted(p.name for p in path.iterdir())[:10]
        raise FileNotFoundError(
            f"{path}: expected {WEIGHTS_NAME} (+ {CONFIG_NAME}), {NNSSL_NAME} or a single .pth file; found {found}"
            + (". Pass the weights file itself to choose one." if pths else "")
        )
    if path.suffix == ".safetensors":
        return _s3d_source(path)
    if path.suffix in (".pth", ".pt"):
        return Source(path, "nnssl")
    raise ValueError(f"{path}: unknown weights file type {path.suffix!r}; expected .safetensors, .pth or .pt")


def _hub_source(repo_id: str, revision: str | None, cache_dir: str | None, entry: ModelEntry | None) -> Source:
    if entry is not None:
        # the sha256 pin belongs to the registry's revision; another revision asked for explicitly is unpinned
        sha256 = entry.sha256 if revision in (None, entry.revision) else None
        weights = hub_download(entry.repo_id, entry.filename, revision=revision, sha256=sha256, cache_dir=cache_dir)
        config, config_file = None, None
        if entry.format == "s3d":
            config_file = hub_download(entry.repo_id, CONFIG_NAME, revision=revision, cache_dir=cache_dir)
            config = read_config(config_file)
        return Source(weights, entry.format, config, entry, entry.repo_id, revision, sha256,
                      config_file=config_file, cache_dir=cache_dir)
    config_path = hub_download(repo_id, CONFIG_NAME, revision=revision, cache_dir=cache_dir)
    try:
        obj = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{config_path} ({repo_id}): cannot read JSON config ({err})") from None
    if is_s3d_config(obj):
        config = parse_config(obj, f"{config_path} ({repo_id})")
        weights = hub_download(repo_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir)
        return Source(weights, "s3d", config, None, repo_id, revision, config_file=config_path,
                      cache_dir=cache_dir)
    weights = hub_download(repo_id, NNSSL_NAME, revision=revision, cache_dir=cache_dir)
    return Source(weights, "nnssl", None, None, repo_id, revision, cache_dir=cache_dir)


def _package_source(entry: ModelEntry, revision: str | None) -> Source:
    """Weights shipped inside the s3d package (``entry.package_data``): offline, checked against ``entry.sha256``."""
    from importlib.resources import files

    if revision not in (None, entry.revision):
        raise ValueError(f"{entry.name!r} ships inside the s3d package and has no other revision; "
                         f"drop revision={revision!r}")
    folder = Path(str(files("s3d"))) / entry.package_data  # type: ignore[operator]
    weights = folder / entry.filename
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: missing from the installed s3d package ({entry.name!r} ships "
                                "with it); reinstall s3d")
    if entry.sha256 is not None and sha256_file(weights) != entry.sha256:
        raise ChecksumError(f"{weights}: sha256 does not match the registry's for {entry.name!r}; the installed "
                            "file is damaged or was replaced - reinstall s3d")
    config_file = folder / CONFIG_NAME
    return Source(weights, "s3d", read_config(config_file), entry, None, None, entry.sha256, config_file)


def _looks_like_path(text: str) -> bool:
    """A name that can only be a local path (a Hub repo id is ``org/name[@revision]``)."""
    name = text.partition("@")[0]
    return (
        text.startswith(("/", "./", "../", "~", "\\")) or name.endswith(WEIGHT_SUFFIXES) or name.count("/") > 1
    )


def local_path(name: str | os.PathLike[str]) -> Path | None:
    """The local file or folder ``name`` means for :func:`resolve`, or ``None`` (a registry name, a Hub repo).

    A bare registry name that is also a folder without weights means the registered model, as in
    :func:`resolve`. Used to keep outputs apart from a local source.

    Example:
        >>> local_path("s3d-demo") is None   # the shipped weights, even with a ./s3d-demo folder here
        True
    """
    if not (isinstance(name, os.PathLike) or os.path.exists(str(name))):
        return None
    path = Path(name)
    named = None if isinstance(name, os.PathLike) or _looks_like_path(str(name)) else get_entry(str(name))
    if named is None or not path.is_dir() or _holds_weights(path):
        return path
    return None


def resolve(name: str | os.PathLike[str], revision: str | None = None, cache_dir: str | None = None) -> Source:
    """Find the weights ``name`` refers to: an existing local path, ``hf://org/name@rev``, a registry
    name or alias (weights shipped with the package, e.g. ``"s3d-demo"``, load offline), or a Hub
    repo id ``org/name[@revision]`` (tried in this order). A bare registry name that is also a local
    folder holding no weights (such as the ``s3d-demo/`` output folder of ``s3d demo``) means the
    registered model; write ``./NAME`` to insist on the folder.

    Raises:
        FileNotFoundError: a local path (or a name that can only be one) that does not exist, or a
            directory without weights.
        ValueError: a name that is none of the above (the message lists the registry).
        s3d.hub.HubFileError: the repo or file cannot be fetched.
        s3d.hub.CheckpointError: a ``config.json`` that is not valid (the message names file and key).

    Example:
        >>> resolve("runs/brain/backbone").format
        's3d'
    """
    path = local_path(name)
    if path is not None:
        return _local_source(path)
    # (a folder named like a registered model that holds no weights, such as ``s3d demo``'s output folder
    # ``./s3d-demo``, means the registered model)
    text = str(name)
    if text.startswith("hf://"):
        match = _REPO_RE.match(text[len("hf://") :])
        if not match:
            raise ValueError(f"{text!r}: expected hf://org/name or hf://org/name@revision")
        return _hub_source(match["repo"], revision or match["rev"], cache_dir, None)
    entry = get_entry(text)
    if entry is not None and entry.package_data is not None:
        return _package_source(entry, revision)
    if entry is not None:
        return _hub_source(entry.repo_id, revision or entry.revision, cache_dir, entry)
    if _looks_like_path(text):
        raise FileNotFoundError(f"{text}: no such file or directory")
    match = _REPO_RE.match(text)
    if match:
        try:
            return _hub_source(match["repo"], revision or match["rev"], cache_dir, None)
        except HubFileError as err:
            raise HubFileError(f"{err} (and there is no local file or directory {text!r})") from err
    names = sorted({m.name for m in list_models()} | {a for m in list_models() for a in m.aliases})
    raise ValueError(
        f"{text!r} is not an existing local path, a registered model ({', '.join(names)}), "
        "or a Hub repo id 'org/name[@revision]'"
    )
