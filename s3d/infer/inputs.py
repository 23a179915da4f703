"""What a prediction reads: the cases of an input folder and the checks on each case's files.

:func:`scan_input_folder` groups ``{case}_{XXXX}.nii.gz`` (or ``.nii``) files into cases and reports
every file it cannot use, per case, so one bad case never stops a batch; :func:`check_case_files`
checks the headers of one case (readable NIfTI, 3D, at least 2 voxels along every axis, finite
positive spacing, a finite invertible affine, equal shapes) before any voxel is read.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from s3d.data.io import NIFTI_SUFFIXES, ImageHeader

_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


class CaseError(ValueError):
    """A case that cannot be predicted, and the input file at fault.

    Example:
        >>> raise CaseError("in/ct_001_0000.nii.gz", "contains NaN or inf voxels")
    """

    def __init__(self, file: str | os.PathLike[str], reason: str) -> None:
        super().__init__(f"{file}: {reason}")
        self.file = str(file)
        self.reason = reason


@dataclass
class CaseFailure:
    """One entry of a batch's failures: the case (``None`` for a file that belongs to none), the file at
    fault, why, and the outputs of an earlier run that were removed because they are not current."""

    case: str | None
    file: str
    reason: str
    removed: list[str] = field(default_factory=list)


@dataclass
class InputScan:
    """The cases of an input folder: usable ``cases`` (channel files in order), ``problems`` (cases or
    files that cannot be used, one entry each) and ``ignored`` (entries that are not NIfTI files)."""

    cases: dict[str, list[Path]]
    problems: list[CaseFailure]
    ignored: list[Path]


def _nifti_stem(name: str) -> tuple[str, str] | None:
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix) and len(name) > len(suffix):
            return name[: -len(suffix)], suffix
    return None


def scan_input_folder(input_dir: str | os.PathLike[str], num_channels: int, file_ending: str = ".nii.gz"
                      ) -> InputScan:
    """Group the NIfTI files of ``input_dir`` into cases, reporting every one it cannot use.

    ``{case}_{XXXX}.nii.gz`` and ``{case}_{XXXX}.nii`` are both read (``file_ending`` is the one named
    in messages). A case with a missing channel file, a channel index of ``num_channels`` or more, or
    one channel in both endings is a problem (all its problems are listed) and is left out; a NIfTI
    name without ``_XXXX``, a NIfTI ending in upper case (``.NII.GZ``) and a broken symbolic link are
    problems of no case. Hidden entries (``.name``, e.g. ``.DS_Store``) are skipped; other files and
    folders are ``ignored``.

    Raises:
        FileNotFoundError: ``input_dir`` is not a folder.
        ValueError: no usable case at all (listing every problem, each with its file).

    Example:
        >>> scan = scan_input_folder("imagesTs", num_channels=2)
        >>> scan.cases
        {'brain_001': [PosixPath('imagesTs/brain_001_0000.nii.gz'), PosixPath('imagesTs/brain_001_0001.nii.gz')]}
    """
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise FileNotFoundError(f"{input_dir}: input folder not found")
    problems: list[CaseFailure] = []
    ignored: list[Path] = []
    found: dict[str, dict[int, Path]] = {}
    bad: dict[str, list[CaseFailure]] = {}
    for p in sorted(input_dir.iterdir()):
        if p.name.startswith("."):
            continue
        stem = _nifti_stem(p.name) if p.is_file() else None
        if stem is None:
            looks = _nifti_stem(p.name.lower())
            if looks is not None and p.is_symlink() and not p.exists():
                problems.append(CaseFailure(None, str(p), f"a broken symbolic link (to {os.readlink(p)}); not read"))
            elif looks is not None and p.is_file():
                problems.append(CaseFailure(None, str(p), f"ending {p.name[-len(looks[1]):]!r}: s3d reads the "
                                            f"lower-case endings {' and '.join(NIFTI_SUFFIXES)}; rename it"))
            else:
                ignored.append(p)
            continue
        m = _CHANNEL_RE.match(stem[0])
        if m is None:
            problems.append(CaseFailure(None, str(p), f"name must be {{case}}_XXXX{file_ending} (XXXX = channel "
                                        "index, e.g. 0000); not read"))
            continue
        case, channel = m["case"], int(m["channel"])
        channels = found.setdefault(case, {})
        if channel >= num_channels:
            bad.setdefault(case, []).append(CaseFailure(
                case, str(p), f"channel {channel}, but the model takes {num_channels} channel(s) "
                f"(_0000 .. _{num_channels - 1:04d})"))
        elif channel in channels:
            bad.setdefault(case, []).append(CaseFailure(
                case, str(p), f"channel {channel} is also in {channels[channel].name}; keep one of the two"))
        else:
            channels[channel] = p
    cases: dict[str, list[Path]] = {}
    for case, channels in sorted(found.items()):
        missing = [c for c in range(num_channels) if c not in channels]
        bad.setdefault(case, []).extend(
            CaseFailure(case, str(input_dir / f"{case}_{c:04d}{file_ending}"), f"missing channel file of case "
                        f"{case!r}") for c in missing)
        if bad[case]:
            problems.extend(bad[case])
        else:
            cases[case] = [channels[c] for c in range(num_channels)]
    if not cases:
        if not problems:
            problems.append(CaseFailure(None, str(input_dir), f"no {{case}}_XXXX{file_ending} files"))
        lines = "\n".join(f"  - {p.file}: {p.reason}" for p in problems)
        raise ValueError(f"{input_dir}: no usable case; {len(problems)} problem(s) with the input files:\n{lines}")
    return InputScan(cases, problems, ignored)


def find_cases(input_dir: str | os.PathLike[str], num_channels: int, file_ending: str = ".nii.gz"
               ) -> dict[str, list[Path]]:
    """Group ``{case}_{XXXX}{file_ending}`` files of ``input_dir`` into cases, channels in order; strict.

    As :func:`scan_input_folder`, but any problem is an error.

    Raises:
        ValueError: listing every problem at once (a name without ``_XXXX``, a missing channel file,
            a channel index beyond ``num_channels``, no cases at all), each with its file name.

    Example:
        >>> find_cases("imagesTs", num_channels=2)
        {'brain_001': [PosixPath('imagesTs/brain_001_0000.nii.gz'),
                       PosixPath('imagesTs/brain_001_0001.nii.gz')]}
    """
    scan = scan_input_folder(input_dir, num_channels, file_ending)
    if scan.problems:
        lines = "\n".join(f"  - {p.file}: {p.reason}" for p in scan.problems)
        raise ValueError(f"{input_dir}: {len(scan.problems)} problem(s) with the input files:\n{lines}")
    return scan.cases


def _raw_pixdim(path: Path, header_class: type) -> np.ndarray:
    """pixdim as stored in the file: nibabel replaces zero spacings by 1 when it loads a header."""
    from nibabel.openers import ImageOpener

    with ImageOpener(str(path)) as f:
        return np.asarray(header_class.from_fileobj(f, check=False)["pixdim"], dtype=np.float64)


def check_case_files(image_paths: Sequence[str | os.PathLike[str]]) -> list[ImageHeader]:
    """Check the headers of one case's channel files before reading voxels.

    Each file must be a readable NIfTI holding one 3D volume at least 2 voxels thick along every
    axis, with finite spacings > 0 mm (``pixdim``) and a finite, invertible voxel-to-world affine;
    all channel files must have the first one's shape.

    Returns:
        The headers, in order.

    Raises:
        CaseError: naming the first file that fails and why.

    Example:
        >>> check_case_files(["in/ct_001_0000.nii.gz"])[0].shape
        (512, 512, 120)
    """
    from s3d._optional import optional_import
    from s3d.data.io import read_header

    nib = optional_import("nibabel", "reading NIfTI")

    if not image_paths:
        raise ValueError("image_paths: need at least one channel file")
    headers: list[ImageHeader] = []
    for p in map(Path, image_paths):
        try:
            h = read_header(p)
        except (ValueError, OSError) as e:
            text = str(e)
            raise CaseError(p, text[len(f"{p}: "):] if text.startswith(f"{p}: ") else text) from None
        if len(h.shape) != 3:
            kind = "4D" if len(h.shape) == 4 else f"{len(h.shape)}D"
            raise CaseError(p, f"shape {h.shape} is a {kind} image; a channel file holds one 3D volume "
                            "(one file per channel, {case}_XXXX)")
        thin = [a for a, n in enumerate(h.shape) if n < 2]
        if thin:
            raise CaseError(p, f"shape {h.shape} is 1 voxel thick along axis {thin[0]}: a 2D image, not a 3D "
                            "volume; 3D prediction needs at least 2 voxels along every axis")
        pixdim = _raw_pixdim(p, type(nib.load(str(p)).header))[1:4]
        if not (np.isfinite(pixdim).all() and (pixdim != 0).all()):
            raise CaseError(p, f"voxel spacing (header pixdim[1:4]) is {tuple(float(v) for v in pixdim)} mm; "
                            "each must be finite and > 0: fix the header")
        affine = h.affine
        if not np.isfinite(affine).all():
            raise CaseError(p, "voxel-to-world affine (sform/qform) holds NaN or inf; fix the header")
        if abs(float(np.linalg.det(affine[:3, :3]))) < 1e-12:
            raise CaseError(p, "voxel-to-world affine (sform/qform) is singular (determinant 0); fix the header")
        if headers and h.shape != headers[0].shape:
            raise CaseError(p, f"shape {h.shape} differs from {headers[0].path.name}'s {headers[0].shape} "
                            "(channel files of a case must match)")
        headers.append(h)
    return headers
