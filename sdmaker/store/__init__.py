"""The local model store, model artifacts (packaging and safe extraction) and S3 transfers.

Nothing here imports torch: storing, packaging and resolving models are file operations.
"""

from sdmaker.store import _s3 as s3  # S3 transfers: s3.upload / download / download_prefix / copy / ...
from sdmaker.store._archive import DEFAULT_MAX_MEMBERS, DEFAULT_MAX_TOTAL_BYTES, archive_format, safe_extract
from sdmaker.store._lora import (
    LORA_FILE,
    LoraLayer,
    LoraLayout,
    check_lora_base,
    kohya_module_name,
    parse_lora,
    read_lora,
    unet_weight_shapes,
)
from sdmaker.store._manifest import (
    Architecture,
    LoraInfo,
    ManifestFile,
    ModelManifest,
    Tuning,
    read_architecture,
    validate_name,
)
from sdmaker.store._package import PackageResult, format_for, package_model
from sdmaker.store._resolve import ResolvedModel, resolve_model
from sdmaker.store._s3 import S3Uri, is_s3_uri, parse_s3_uri
from sdmaker.store._store import Store

__all__ = [
    "DEFAULT_MAX_MEMBERS",
    "DEFAULT_MAX_TOTAL_BYTES",
    "LORA_FILE",
    "Architecture",
    "LoraInfo",
    "LoraLayer",
    "LoraLayout",
    "ManifestFile",
    "ModelManifest",
    "PackageResult",
    "ResolvedModel",
    "S3Uri",
    "Store",
    "Tuning",
    "archive_format",
    "check_lora_base",
    "kohya_module_name",
    "parse_lora",
    "read_lora",
    "unet_weight_shapes",
    "format_for",
    "is_s3_uri",
    "package_model",
    "parse_s3_uri",
    "read_architecture",
    "resolve_model",
    "s3",
    "safe_extract",
    "validate_name",
]
