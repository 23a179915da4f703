"""The table of named pretrained weights (one typed entry per model).

Every entry points at weights that exist on the Hugging Face Hub. A revision is a 40-hex commit
when one is known (then the download is immutable); otherwise a branch, flagged ``pinned=False``
(the files behind it may change). ``sha256`` is set where a digest of the file is on public
record; a download that does not match it is deleted and refused (pass an explicit ``revision``
to load another version).
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from s3d.hub.adapt import RESENC_UNET_KEYS, AdaptationKeys
from s3d.nn.config import ResEncUNetConfig, get_config

_COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")

OPENMIND_CITATION = (
    "Wald, T., Ulrich, C., Suprijadi, J., Ziegler, S., Nohel, M., Peretzke, R., Koehler, G., "
    "Maier-Hein, K. H. An OpenMind for 3D medical vision self-supervised learning. arXiv:2412.17041 (2024)."
)
S3D_CITATION = (
    "Wald, T., Ulrich, C., Koehler, G., Zimmerer, D., Denner, S., Baumgartner, M., Isensee, F., "
    "Jaini, P., Maier-Hein, K. H. Revisiting MAE pre-training for 3D medical image segmentation. CVPR 2025."
)
OPENMIND_DATA = (
    "OpenMind: 114k public 3D brain MRI volumes (23 modalities), huggingface.co/datasets/AnonRes/OpenMind"
)


@dataclass(frozen=True)
class ModelEntry:
    """One named set of pretrained weights.

    Attributes:
        name: the registry name (``load_pretrained(name)``).
        repo_id: Hub repository ``org/name``.
        filename: the weights file inside the repo.
        revision: 40-hex commit (pinned) or a branch name (unpinned).
        format: ``"s3d"`` (model.safetensors + config.json) or ``"nnssl"`` (``.pth`` dict).
        architecture: preset name or config dict used when the file does not determine it
            (nnssl files: the architecture is inferred from tensor shapes and checked against it).
        aliases: other names that resolve to this entry.
        sha256: pinned hex digest of ``filename`` (``None``: not verified).
        method: pre-training method.
        data: pre-training data.
        license: SPDX-like licence id of the weights.
        citation: how to cite.
        provenance: one line: who trained it, how, on what.
        keys: where the stem, encoder and segmentation heads are in the state dict (what
            :func:`~s3d.hub.load_pretrained` adapts); the ResEnc U-Net's by default.
        extra_files: other files in the repo (informational).
        package_data: for weights shipped inside the s3d package: their folder relative to the
            package (s3d format); loaded offline, never from the Hub (``repo_id`` is then empty).
    """

    name: str
    repo_id: str
    filename: str
    revision: str
    format: str
    architecture: str | dict[str, Any] = "resenc_l"
    aliases: tuple[str, ...] = ()
    sha256: str | None = None
    method: str = ""
    data: str = ""
    license: str = ""
    citation: str = ""
    provenance: str = ""
    keys: AdaptationKeys = RESENC_UNET_KEYS
    extra_files: tuple[str, ...] = field(default_factory=tuple)
    package_data: str | None = None

    @property
    def pinned(self) -> bool:
        """True when ``revision`` is an immutable 40-hex commit."""
        return bool(_COMMIT_RE.match(self.revision))

    @property
    def config(self) -> ResEncUNetConfig:
        """The architecture as a config (``architecture`` is a preset name or a config dict)."""
        arch = self.architecture
        return get_config(arch) if isinstance(arch, str) else ResEncUNetConfig.from_dict(arch)

    @property
    def stem_key(self) -> str:
        """``keys.stem_key``: the first conv's weight (adapted for other input channel counts)."""
        return self.keys.stem_key

    @property
    def encoder_prefix(self) -> str:
        """``keys.encoder_prefix``: key prefix of the encoder."""
        return self.keys.encoder_prefix

    @property
    def head_key(self) -> str:
        """Weight of the final (full-resolution) segmentation head in this architecture."""
        return f"{self.keys.head_prefix}{self.config.n_stages - 2}.weight"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict including ``pinned``."""
        d = asdict(self)
        d["pinned"] = self.pinned
        return d


def _openmind(
    method: str,
    long_name: str,
    aliases: tuple[str, ...] = (),
    provenance: str = "",
    sha256: str | None = None,
    revision: str = "main",
) -> ModelEntry:
    return ModelEntry(
        name=f"resenc_l.openmind_{method.lower()}",
        # Published as AnonRes/ResEncL-OpenMind-*; the Hub now redirects those to MIC-DKFZ/.
        repo_id=f"MIC-DKFZ/ResEncL-OpenMind-{method}",
        filename="checkpoint_final.pth",
        revision=revision,
        format="nnssl",
        architecture="resenc_l",
        aliases=(*aliases, f"openmind-{method.lower()}", f"AnonRes/ResEncL-OpenMind-{method}"),
        sha256=sha256,
        method=long_name,
        data=OPENMIND_DATA,
        license="CC-BY-4.0",
        citation=OPENMIND_CITATION,
        provenance=provenance
        or (
            f"ResEnc-L pre-trained with {long_name} by the OpenMind authors with nnssl on OpenMind "
            "(public brain MRI); nnssl checkpoint, converted on load."
        ),
        extra_files=("adaptation_plan.json", "config.json"),
    )


#: sha256 of s3d/zoo/s3d-demo/model.safetensors (checked on every load).
DEMO_SHA256 = "f53810df93bead1aa569ff6fbf8fb17485aaf4743e81901eb31798ff6759392a"

#: Registry entries, in display order. Only repositories confirmed to exist are listed (see docs/zoo.md).
MODELS: tuple[ModelEntry, ...] = (
    _openmind(
        "MAE",
        "MAE (sparse masked autoencoder, the S3D recipe)",
        aliases=("s3d-b",),
        # sha256 and size (491,198,606 bytes) as recorded by two independent public projects that pin
        # this file; not measured by s3d (no network here). A mismatch fails loudly.
        sha256="7a847af785635335c00e711d16ff4d225d86ecd5992b14c059df2b520e3ee933",
        provenance=(
            "ResEnc-L pre-trained by the paper's authors with nnssl's MAE trainer (the S3D-B recipe) on the "
            "public OpenMind brain MRI collection (114k volumes) - NOT the paper's private 39k-volume set; "
            "the paper's own S3D-B weights are not public."
        ),
    ),
    _openmind("VF", "VolumeFusion (VF)"),
    _openmind("SimCLR", "SimCLR (contrastive)"),
    _openmind(
        "VoCo",
        "VoCo (volume contrast)",
        provenance=(
            "ResEnc-L encoder pre-trained with VoCo by the OpenMind authors with nnssl on OpenMind "
            "(public brain MRI); the checkpoint holds the encoder only, so the decoder is freshly "
            "initialised on load."
        ),
    ),
    _openmind("SwinUNETR", "SwinUNETR pretext (inpainting + rotation + contrastive)"),
    # Shipped inside the package (s3d/zoo/s3d-demo, a few MB): the demo network, pre-trained once by
    # `s3d demo --make-weights` (s3d/demo/weights.py); its model card there has the recipe and loss curve.
    ModelEntry(
        name="s3d-demo",
        repo_id="",
        filename="model.safetensors",
        revision="package",
        format="s3d",
        architecture="tiny",
        sha256=DEMO_SHA256,
        method="MAE (sparse masked autoencoder, the S3D-B recipe scaled down)",
        data="synthetic brain MRI from s3d.data.synthetic (3000 volumes, T1/T2/FLAIR/PD, cohort seed 1000)",
        license="CC-BY-4.0",
        citation=S3D_CITATION,
        provenance=(
            "The `tiny` ResEnc U-Net of `s3d demo`, pre-trained by s3d with the S3D-B recipe scaled down "
            "(`s3d demo --make-weights`) on synthetic data only; for the demo and tests, not for real images."
        ),
        package_data="zoo/s3d-demo",
    ),
)


def list_models() -> list[ModelEntry]:
    """All registry entries.

    Example:
        >>> [m.name for m in list_models()][:1]
        ['resenc_l.openmind_mae']
    """
    return list(MODELS)


def get_entry(name: str) -> ModelEntry | None:
    """The entry called ``name`` or having it as an alias (case-insensitive), else ``None``.

    Example:
        >>> get_entry("s3d-b").repo_id
        'AnonRes/ResEncL-OpenMind-MAE'
    """
    key = name.lower()
    for entry in MODELS:
        if entry.name.lower() == key or key in (a.lower() for a in entry.aliases):
            return entry
    return None
