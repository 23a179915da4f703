"""The table of named pretrained weights (one typed :class:`~s3d.hub.ModelEntry` per model).

Each entry names the public record it rests on (``record``: the model card, an adaptation plan, a
third-party pin); an entry whose repository s3d could not see says so there. A revision is a 40-hex
commit when one is known (then the download is immutable); otherwise a branch, flagged ``pinned=False``
(the files behind it may change). ``sha256`` is set where a digest of the file is on public record; a
download that does not match it is deleted and refused (pass an explicit ``revision`` to load another
version). The entries are grouped by family, then by method (``s3d models`` prints them so).
"""

from __future__ import annotations

from s3d.hub.adapt import PRIMUS_KEYS, RESENC_UNET_KEYS
from s3d.hub.entry import ModelEntry

__all__ = ["MODELS", "ModelEntry", "get_entry", "list_models"]

OPENMIND_CITATION = (
    "Wald, T., Ulrich, C., Suprijadi, J., Ziegler, S., Nohel, M., Peretzke, R., Koehler, G., "
    "Maier-Hein, K. H. An OpenMind for 3D medical vision self-supervised learning. arXiv:2412.17041 (2024)."
)
S3D_CITATION = (
    "Wald, T., Ulrich, C., Koehler, G., Zimmerer, D., Denner, S., Baumgartner, M., Isensee, F., "
    "Jaini, P., Maier-Hein, K. H. Revisiting MAE pre-training for 3D medical image segmentation. CVPR 2025."
)
PRIMUS_CITATION = (
    "Wald, T., Roy, S., Isensee, F., Ulrich, C., Ziegler, S., Trofimova, D., et al., Maier-Hein, K. H. "
    "Primus: Enforcing attention usage for 3D medical image segmentation. arXiv:2503.01835 (2025)."
)
MISSING_PIECE_CITATION = (
    "Eckstein, K., Ulrich, C., Baumgartner, M., Kaechele, J., Bounias, D., Wald, T., Floca, R., Maier-Hein, K. H. "
    "The Missing Piece: A case for pre-training in 3D medical object detection. MICCAI 2025. "
    "doi:10.1007/978-3-032-04965-0_58."
)
OPENMIND_DATA = (
    "OpenMind: 114k public 3D brain MRI volumes (23 modalities), huggingface.co/datasets/AnonRes/OpenMind"
)
OPENMIND_CARD = "OpenMind model card (huggingface.co/MIC-DKFZ/ResEncL-OpenMind-MAE: ResEnc-L and Primus-M, CC-BY-4.0)"

#: Long names of the pre-training methods.
METHODS = {
    "S3D": "S3D (Spark3D: sparse masked autoencoder with sparse conv/norm, mask token, densification convs)",
    "MAE": "MAE (masked autoencoder on the dense network, no sparsification)",
    "MG": "Models Genesis (MG: restoration of transformed volumes)",
    "VF": "VolumeFusion (VF: segmentation of fused volumes)",
    "VoCo": "VoCo (volume contrast)",
    "SimCLR": "SimCLR (contrastive)",
    "SwinUNETR": "SwinUNETR pretext (inpainting + rotation + contrastive)",
    "SimMIM": "SimMIM (masked image modelling: masked tokens replaced by a learnt token, linear-style decoder)",
}


def _openmind(
    family: str,
    method: str,
    aliases: tuple[str, ...] = (),
    provenance: str = "",
    sha256: str | None = None,
    revision: str = "main",
    record: str = "",
    citation: str = OPENMIND_CITATION,
) -> ModelEntry:
    primus = family == "PrimusM"
    prefix, arch, keys = ("primus_m", "primus_m", PRIMUS_KEYS) if primus else ("resenc_l", "resenc_l", RESENC_UNET_KEYS)
    short = f"{'primus' if primus else 'openmind'}-{method.lower()}"
    return ModelEntry(
        name=f"{prefix}.openmind_{method.lower()}",
        # Published as AnonRes/<family>-OpenMind-*; the Hub now redirects those to MIC-DKFZ/.
        repo_id=f"MIC-DKFZ/{family}-OpenMind-{method}",
        filename="checkpoint_final.pth",
        revision=revision,
        format="nnssl",
        architecture=arch,
        aliases=(*aliases, short, f"AnonRes/{family}-OpenMind-{method}"),
        sha256=sha256,
        method=METHODS[method],
        data=OPENMIND_DATA,
        license="CC-BY-4.0",
        citation=citation + (" " + PRIMUS_CITATION if primus else ""),
        provenance=provenance
        or (
            f"{'Primus-M' if primus else 'ResEnc-L'} pre-trained with {method} by the OpenMind authors with nnssl on "
            "OpenMind (public brain MRI); nnssl checkpoint, converted on load."
        ),
        record=record or OPENMIND_CARD,
        keys=keys,
        extra_files=("adaptation_plan.json", "config.json"),
    )


def _not_seen(method: str) -> str:
    return (f"{OPENMIND_CARD}, which lists {method} among the methods; nnssl has the Primus trainer. s3d saw no file "
            "of this repository: if it is absent, loading fails with HubFileError naming it.")


#: sha256 of s3d/zoo/s3d-demo/model.safetensors (checked on every load).
DEMO_SHA256 = "f53810df93bead1aa569ff6fbf8fb17485aaf4743e81901eb31798ff6759392a"

#: Registry entries, in display order (family, then method). See docs/zoo.md for the record of each.
MODELS: tuple[ModelEntry, ...] = (
    # ---- ResEnc-L on OpenMind ------------------------------------------------------------------
    _openmind(
        "ResEncL", "S3D",
        aliases=("s3d-b",),
        provenance=(
            "ResEnc-L pre-trained by the paper's authors with S3D (nnssl's sparse Spark3D trainer, the paper's S3D-B "
            "method) on the public OpenMind brain MRI collection (114k volumes) - NOT the paper's private 39k-volume "
            "set; the paper's own S3D-B weights are not public."
        ),
        record=f"{OPENMIND_CARD}; repository fetched by a public download script (AnonRes/ResEncL-OpenMind-S3D)",
        citation=f"{S3D_CITATION} {OPENMIND_CITATION}",
    ),
    _openmind(
        "ResEncL", "MAE",
        # sha256 and size (491,198,606 bytes) as recorded by two independent public projects that pin this file;
        # not measured by s3d (no network here). A mismatch fails loudly.
        sha256="7a847af785635335c00e711d16ff4d225d86ecd5992b14c059df2b520e3ee933",
        record=f"{OPENMIND_CARD}; sha256 pinned by two public projects (ISLES26-StrokeFusion and another)",
    ),
    _openmind("ResEncL", "MG", record=f"{OPENMIND_CARD}, which lists Models Genesis; s3d saw no file of this "
              "repository: if it is absent, loading fails with HubFileError naming it."),
    _openmind("ResEncL", "VF", record=f"{OPENMIND_CARD}; adaptation_plan.json seen (AnonRes/ResEncL-OpenMind-VF)"),
    _openmind(
        "ResEncL", "VoCo",
        provenance=(
            "ResEnc-L encoder pre-trained with VoCo by the OpenMind authors with nnssl on OpenMind "
            "(public brain MRI); the checkpoint holds the encoder only, so the decoder is freshly "
            "initialised on load."
        ),
    ),
    _openmind("ResEncL", "SimCLR",
              record=f"{OPENMIND_CARD}; adaptation_plan.json seen (AnonRes/ResEncL-OpenMind-SimCLR, patch 192x192x64)"),
    _openmind("ResEncL", "SwinUNETR"),
    # ---- ResEnc-L on CT-RATE + ABCD (The Missing Piece) ------------------------------------------
    ModelEntry(
        name="resenc_l.ct_abcd_s3d",
        repo_id="MIC-DKFZ/ResEncL-MissingPiece-S3D",
        filename="checkpoint_final.pth",
        revision="main",
        format="nnssl",
        architecture="resenc_l",
        aliases=("ct-s3d", "missingpiece-s3d"),
        method=METHODS["S3D"],
        data="CT-RATE + ABCD Study: chest CT (CT-RATE) and brain MRI (ABCD), as the model card states",
        license="CC-BY-4.0",
        citation=f"{MISSING_PIECE_CITATION} {S3D_CITATION}",
        provenance=(
            "ResEnc-L pre-trained with S3D (Spark3D) on CT-RATE + ABCD by the authors of The Missing Piece (MICCAI "
            "2025), released for nnDetection fine-tuning; the only public S3D weights that saw CT. nnssl checkpoint, "
            "converted on load (encoder and stem as nnDetection loads them)."
        ),
        record=("model card huggingface.co/MIC-DKFZ/ResEncL-MissingPiece-S3D (data, method); licence cc-by-4.0 as on "
                "the sibling card MIC-DKFZ/ResEncL-MissingPiece-MAE"),
        extra_files=("adaptation_plan.json",),
    ),
    # ---- Primus-M on OpenMind -------------------------------------------------------------------
    _openmind(
        "PrimusM", "MAE",
        # sha256 as recorded by one public project that pins this file (ISLES26-StrokeFusion); not measured by s3d.
        sha256="b866ac5f61d7e90d3a6cbb00a759ffc9d73beb5e63baa6b3cd654671ebc9a552",
        provenance=(
            "Primus-M pre-trained with MAE by the OpenMind authors with nnssl on OpenMind (public brain MRI): a "
            "token-dropping encoder, a 2-block decoder EVA and a learnt mask token; the decoder EVA and the mask "
            "token are dropped on load (a segmentation Primus has neither)."
        ),
        record=f"{OPENMIND_CARD}; sha256 pinned by a public project (ISLES26-StrokeFusion)",
    ),
    _openmind("PrimusM", "SimMIM",
              record=f"{OPENMIND_CARD}; adaptation_plan.json seen (AnonRes/PrimusM-OpenMind-SimMIM)"),
    _openmind("PrimusM", "MG", record=f"{OPENMIND_CARD}; adaptation_plan.json seen (AnonRes/PrimusM-OpenMind-MG)"),
    _openmind("PrimusM", "VF", record=f"{OPENMIND_CARD}; adaptation_plan.json seen (AnonRes/PrimusM-OpenMind-VF)"),
    _openmind("PrimusM", "SimCLR", record=_not_seen("SimCLR")),
    _openmind("PrimusM", "VoCo", record=_not_seen("VoCo")),
    _openmind("PrimusM", "SwinUNETR", record=_not_seen("SwinUNETR")),
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
        method="S3D (sparse masked autoencoder, the S3D-B recipe scaled down)",
        data="synthetic brain MRI from s3d.data.synthetic (3000 volumes, T1/T2/FLAIR/PD, cohort seed 1000)",
        license="CC-BY-4.0",
        citation=S3D_CITATION,
        provenance=(
            "The `tiny` ResEnc U-Net of `s3d demo`, pre-trained by s3d with the S3D-B recipe scaled down "
            "(`s3d demo --make-weights`) on synthetic data only; for the demo and tests, not for real images."
        ),
        record="shipped with s3d (s3d/zoo/s3d-demo, its model card has the recipe)",
        package_data="zoo/s3d-demo",
    ),
)


def list_models() -> list[ModelEntry]:
    """All registry entries.

    Example:
        >>> [m.name for m in list_models()][:1]
        ['resenc_l.openmind_s3d']
    """
    return list(MODELS)


def get_entry(name: str) -> ModelEntry | None:
    """The entry called ``name`` or having it as an alias (case-insensitive), else ``None``.

    Example:
        >>> get_entry("s3d-b").repo_id
        'MIC-DKFZ/ResEncL-OpenMind-S3D'
    """
    key = name.lower()
    for entry in MODELS:
        if entry.name.lower() == key or key in (a.lower() for a in entry.aliases):
            return entry
    return None
