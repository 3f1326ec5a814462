"""The generation engine: load diffusers Stable Diffusion folders and run requests on them.

One denoising loop (``_loop``) serves everything: ``generate`` runs it for one request, ``StepBatcher``
steps many requests through it together.

Nothing here imports HTTP or CLI libraries; progress reaches callers through ``on_step`` and ``on_progress``
callbacks (step, elapsed, ETA and optional preview images: ``_preview``).
"""

from sdmaker.engine._device import Placement, cpu_has_native_bf16, resolve_placement
from sdmaker.engine._generate import generate
from sdmaker.engine._images import MIME_TYPES, encode_image, encode_image_base64, read_recipe
from sdmaker.engine._loader import (
    MODEL_CARD_FILE,
    PICKLE_SUFFIXES,
    LoadedModel,
    card_dtype,
    find_pickle_weights,
    load_model,
    read_model_card,
    read_model_defaults,
)
from sdmaker.engine._random_models import KINDS, build_random_pipeline, clip_bpe_path, minilm_dir
from sdmaker.engine._result import GeneratedImage, GenerationResult, StepCallback
from sdmaker.engine._schedulers import make_scheduler, scheduler_name_of
from sdmaker.engine._sheet import contact_sheet

__all__ = [
    "KINDS",
    "MIME_TYPES",
    "MODEL_CARD_FILE",
    "PICKLE_SUFFIXES",
    "GeneratedImage",
    "GenerationResult",
    "LoadedModel",
    "Placement",
    "StepCallback",
    "build_random_pipeline",
    "card_dtype",
    "clip_bpe_path",
    "contact_sheet",
    "cpu_has_native_bf16",
    "encode_image",
    "encode_image_base64",
    "find_pickle_weights",
    "generate",
    "load_model",
    "make_scheduler",
    "minilm_dir",
    "read_model_card",
    "read_model_defaults",
    "read_recipe",
    "resolve_placement",
    "scheduler_name_of",
]

# LoRA adapters per request, applied per row (issue 16); speed work (issue 5): own loop with DeepCache,
# step-level batching, speed options.
from sdmaker.engine._adapters import (  # noqa: E402
    AdapterCache,
    AdapterLibrary,
    LoadedAdapter,
    adapter_rows,
    adapters_for,
    builtin_loras_dir,
    load_adapter,
    merged_adapters,
    pickle_lora_to_safetensors,
    unet_module_shapes,
)
from sdmaker.engine._batching import BatcherStats, BatchJob, StepBatcher  # noqa: E402
from sdmaker.engine._compiled import (  # noqa: E402
    COMPILE_MODES,
    ENGINES,
    StepCompiler,
    compile_decision,
    enable_compiled_steps,
    engine_decision,
)
from sdmaker.engine._fast import (  # noqa: E402
    SpeedOptions,
    apply_speed_options,
    recommended_dtype,
    recommended_options,
)
from sdmaker.engine._generate import generate_fast  # noqa: E402
from sdmaker.engine._preview import (  # noqa: E402
    PREVIEW_KEY,
    LatentPreview,
    ProgressCallback,
    StepProgress,
    fit_latent_preview,
    fit_preview_file,
    preview_interval,
    read_latent_preview,
)

__all__ += [
    "AdapterCache",
    "AdapterLibrary",
    "LoadedAdapter",
    "adapter_rows",
    "adapters_for",
    "builtin_loras_dir",
    "load_adapter",
    "merged_adapters",
    "pickle_lora_to_safetensors",
    "unet_module_shapes",
    "BatchJob",
    "BatcherStats",
    "COMPILE_MODES",
    "ENGINES",
    "StepCompiler",
    "compile_decision",
    "enable_compiled_steps",
    "engine_decision",
    "SpeedOptions",
    "StepBatcher",
    "apply_speed_options",
    "generate_fast",
    "PREVIEW_KEY",
    "LatentPreview",
    "ProgressCallback",
    "StepProgress",
    "fit_latent_preview",
    "fit_preview_file",
    "preview_interval",
    "read_latent_preview",
    "recommended_dtype",
    "recommended_options",
]
