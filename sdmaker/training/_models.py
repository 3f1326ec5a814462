"""Architectures of the trained parts (AutoencoderKL, UNet2DConditionModel) and the noise schedule."""

from __future__ import annotations

from typing import Any

__all__ = ["build_scheduler", "build_unet", "build_vae", "scheduler_kwargs"]


def build_vae(model_cfg: dict[str, Any]) -> Any:
    """A small AutoencoderKL; 3 blocks = 64x64 images to 16x16 latents."""
    from diffusers import AutoencoderKL

    channels = list(model_cfg.get("block_out_channels", [16, 32, 64]))
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=int(model_cfg.get("latent_channels", 4)),
        block_out_channels=channels, layers_per_block=int(model_cfg.get("layers_per_block", 1)),
        down_block_types=["DownEncoderBlock2D"] * len(channels), up_block_types=["UpDecoderBlock2D"] * len(channels),
        norm_num_groups=int(model_cfg.get("norm_num_groups", 8)), sample_size=64,
        # fully convolutional without the mid-block attention: it can then be trained on crops
        mid_block_add_attention=bool(model_cfg.get("mid_block_add_attention", True)),
    )


def build_unet(model_cfg: dict[str, Any], *, sample_size: int, in_channels: int, cross_attention_dim: int) -> Any:
    """A small UNet2DConditionModel with cross-attention on the MiniLM token embeddings."""
    from diffusers import UNet2DConditionModel

    channels = tuple(model_cfg.get("block_out_channels", (64, 128, 128)))
    down = tuple(model_cfg.get("down_block_types",
                               ["CrossAttnDownBlock2D"] * (len(channels) - 1) + ["DownBlock2D"]))
    up = tuple(model_cfg.get("up_block_types", ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(channels) - 1)))
    return UNet2DConditionModel(
        sample_size=sample_size, in_channels=in_channels, out_channels=in_channels,
        layers_per_block=int(model_cfg.get("layers_per_block", 1)), block_out_channels=channels,
        down_block_types=down, up_block_types=up, cross_attention_dim=cross_attention_dim,
        attention_head_dim=int(model_cfg.get("attention_head_dim", 8)),
        norm_num_groups=int(model_cfg.get("norm_num_groups", 16)),
    )


def scheduler_kwargs(prediction_type: str = "epsilon") -> dict[str, Any]:
    """The training noise schedule (Stable Diffusion's), shared by training and the exported scheduler."""
    return {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
            "prediction_type": prediction_type}


def build_scheduler(kind: str = "ddpm", prediction_type: str = "epsilon") -> Any:
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    if kind == "ddpm":
        return DDPMScheduler(**scheduler_kwargs(prediction_type), clip_sample=False)
    if kind == "ddim":
        return DDIMScheduler(**scheduler_kwargs(prediction_type), clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return DPMSolverMultistepScheduler(**scheduler_kwargs(prediction_type), algorithm_type="dpmsolver++", solver_order=2,
                                       steps_offset=1)
