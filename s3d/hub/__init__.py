"""Model zoo: named pretrained weights on the Hugging Face Hub, save/load/push, nnssl and nnU-Net interop.

Example:
    >>> from s3d.hub import load_pretrained
    >>> model = load_pretrained("s3d-b", in_channels=2, num_classes=4)
"""

from s3d.hub.adapt import AdaptationKeys, LoadReport, StrictLoadError, adapt_state_dict, replicate_stem
from s3d.hub.download import ChecksumError, HubFileError, hub_download, sha256_file
from s3d.hub.nnssl import (
    CheckpointError,
    adaptation_plan,
    canonicalize,
    infer_config,
    nnssl_checkpoint,
    nnunet_checkpoint,
    read_checkpoint,
    to_dna_state_dict,
)
from s3d.hub.pretrained import load_pretrained, load_state, push_to_hub, save_pretrained
from s3d.hub.registry import MODELS, ModelEntry, get_entry, list_models

__all__ = [
    "MODELS",
    "AdaptationKeys",
    "CheckpointError",
    "ChecksumError",
    "HubFileError",
    "LoadReport",
    "ModelEntry",
    "StrictLoadError",
    "adapt_state_dict",
    "adaptation_plan",
    "canonicalize",
    "get_entry",
    "hub_download",
    "infer_config",
    "list_models",
    "load_pretrained",
    "load_state",
    "nnssl_checkpoint",
    "nnunet_checkpoint",
    "push_to_hub",
    "read_checkpoint",
    "replicate_stem",
    "save_pretrained",
    "sha256_file",
    "to_dna_state_dict",
]
