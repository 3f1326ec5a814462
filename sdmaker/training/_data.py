"""Training batches as a pure function of ``(seed, step)``: resume needs only the step number.

Batches are built by a torch ``DataLoader`` worker (``num_workers``) while the main process trains:
scenes are rendered on the fly, and for the UNet also encoded by the frozen VAE and the frozen MiniLM
text encoder. Text embeddings are produced exactly as ``StableDiffusionPipeline.encode_prompt`` does
(same tokenizer call, padding to ``model_max_length``, no attention mask for a BertModel), and cached by
caption string because the encoder is frozen.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdmaker.training._captions import caption
from sdmaker.training._config import data_for_step
from sdmaker.training._scenes import random_palette, render, sample_concept_scene, sample_scene, scene_rng

__all__ = ["TextEncoderCache", "UnetBatches", "VaeBatches", "image_to_tensor", "make_loader"]


def image_to_tensor(img: Any) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1], the VAE's input range."""
    arr = np.asarray(img, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _samples(cfg: dict[str, Any], step: int) -> list[tuple[Any, str, random.Random]]:
    return [(scene, text, rng) for scene, text, rng, _ in _flagged_samples(cfg, step)]


def _flagged_samples(cfg: dict[str, Any], step: int) -> list[tuple[Any, str, random.Random, bool]]:
    """The batch's (scene, caption, rng, is a concept scene) for ``step``."""
    data = data_for_step(cfg, step)
    out = []
    for i in range(cfg["batch_size"]):
        rng = scene_rng(cfg["seed"], step * cfg["batch_size"] + i)
        # concept scenes (opt-in: a LoRA's data) mixed with ordinary ones, so the old domain is not forgotten;
        # without extras no extra random draw is made, so the base recipe's data is unchanged
        extras = tuple(data.get("extra_shapes", ())), tuple(data.get("extra_colors", ()))
        concept = bool((extras[0] or extras[1]) and rng.random() < float(data.get("concept_prob", 0.5)))
        if concept:
            scene = sample_concept_scene(rng, extra_shapes=extras[0], extra_colors=extras[1],
                                         two_shape_prob=data["two_shape_prob"], jitter=data["jitter"])
        else:
            scene = sample_scene(rng, two_shape_prob=data["two_shape_prob"], heldout="exclude", jitter=data["jitter"])
        out.append((scene, caption(scene, rng, split="train", style=data.get("captions", "base")), rng, concept))
    return out


class VaeBatches(torch.utils.data.Dataset):
    """Item ``step`` = the image batch of that training step."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg

    def __len__(self) -> int:
        return int(self.cfg["steps"])

    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        crop = int(self.cfg["data"].get("crop", 0) or 0)
        recolor = float(self.cfg["data"].get("random_color_prob", 0.0) or 0.0)
        images, anchored = [], []
        for scene, _, rng in _samples(self.cfg, step):
            # without random_color_prob no extra draw is made: the base recipe's images are unchanged
            palette = random_palette(scene, rng) if recolor and rng.random() < recolor else None
            anchored.append(palette is None)
            img = image_to_tensor(render(scene, palette=palette))
            if crop:  # a crop around one of the shapes: edges, not flat background, is what needs learning
                cx, cy = rng.choice(scene.shapes).center
                x0 = min(max(int(cx) - crop // 2 + rng.randint(-crop // 4, crop // 4), 0), 64 - crop)
                y0 = min(max(int(cy) - crop // 2 + rng.randint(-crop // 4, crop // 4), 0), 64 - crop)
                img = img[:, y0:y0 + crop, x0:x0 + crop]
            images.append(img)
        return {"images": torch.stack(images), "anchored": torch.tensor(anchored), "step": torch.tensor(step)}


class TextEncoderCache:
    """Frozen MiniLM encoder called like the pipeline calls it, with an LRU cache by caption."""

    def __init__(self, model_dir: Path, max_length: int, capacity: int = 20000) -> None:
        from transformers import AutoTokenizer, BertModel

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, model_max_length=max_length)
        self.encoder = BertModel.from_pretrained(model_dir).eval().requires_grad_(False)
        self.max_length = max_length
        self.capacity = capacity
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()

    @torch.no_grad()
    def encode(self, captions: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(c for c in captions if c not in self._cache))
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.max_length, truncation=True,
                                 return_tensors="pt").input_ids
            hidden = self.encoder(ids)[0]  # last_hidden_state, no attention mask: what the pipeline feeds the UNet
            for text, emb in zip(missing, hidden, strict=True):
                self._cache[text] = emb.clone()
        out = []
        for text in captions:
            self._cache.move_to_end(text)
            out.append(self._cache[text])
        while len(self._cache) > self.capacity:
            self._cache.popitem(last=False)
        return torch.stack(out)


class UnetBatches(torch.utils.data.Dataset):
    """Item ``step`` = (VAE latents x scaling factor, caption embeddings) of that step's batch.

    Frozen models are loaded lazily inside the worker process (they are not sent through pickling).
    Caption dropout for classifier-free guidance replaces a caption by "" (what the pipeline encodes as
    the unconditional prompt) with probability ``caption_dropout``, decided by the sample's own RNG.
    """

    def __init__(self, cfg: dict[str, Any], text_model_dir: Path) -> None:
        self.cfg = cfg
        self.text_model_dir = text_model_dir
        self._vae: Any = None
        self._text: TextEncoderCache | None = None

    def __len__(self) -> int:
        return int(self.cfg["steps"])

    def _load(self) -> None:
        from diffusers import AutoencoderKL

        if self._vae is None:
            self._vae = AutoencoderKL.from_pretrained(self.cfg["vae"]).eval().requires_grad_(False)
            self._text = TextEncoderCache(self.text_model_dir, self.cfg["max_length"])

    @torch.no_grad()
    def __getitem__(self, step: int) -> dict[str, torch.Tensor]:
        self._load()
        assert self._text is not None
        samples = _flagged_samples(self.cfg, step)
        images = torch.stack([image_to_tensor(render(scene)) for scene, *_ in samples])
        captions = ["" if rng.random() < self.cfg["caption_dropout"] else text for _, text, rng, _ in samples]
        latents = self._vae.encode(images).latent_dist.mean
        fit = data_for_step(self.cfg, step).get("fit_latents")
        if fit:
            rows = [k for k, (scene, *_) in enumerate(samples) if _has_color(scene, fit["colors"])]
            if rows:
                latents[rows] = fit_latents(self._vae, latents[rows], images[rows], iters=int(fit["iters"]),
                                            lr=float(fit["lr"]), shape_weight=float(fit.get("shape_weight", 0.0)))
        latents = latents * float(self._vae.config.scaling_factor)
        batch = {"latents": latents, "embeds": self._text.encode(captions), "step": torch.tensor(step),
                 # the rows an adapter is for: concept scenes with their caption (an empty caption trains the
                 # unconditional prediction, which classifier-free guidance subtracts from every prompt's)
                 "concept": torch.tensor([concept and text != "" for (*_, concept), text in zip(samples, captions,
                                                                                                strict=True)])}
        if self.cfg.get("pixel_loss"):  # the decoded x0 prediction is compared with the image itself
            batch["images"] = images
        return batch


def _has_color(scene: Any, colors: list[str]) -> bool:
    return scene.background in colors or any(shape.color in colors for shape in scene.shapes)


def shape_pixel_weights(images: torch.Tensor, shape_weight: float) -> torch.Tensor:
    """Per-pixel loss weights: 1 on the background (read at the top-left corner), 1 + ``shape_weight`` on shapes.

    Why: a small shape covers a few percent of the image, so an unweighted pixel loss is mostly background.
    """
    return 1.0 + shape_weight * ((images - images[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.05).float()


def fit_latents(vae: Any, latents: torch.Tensor, images: torch.Tensor, *, iters: int, lr: float,
                shape_weight: float = 0.0) -> torch.Tensor:
    """Latents the frozen decoder renders as ``images``: the encoder's, refined by Adam on the pixel L1 loss.

    Why: a LoRA teaches the UNet to produce the latents it is trained on, and only the decoder turns them into
    pixels. ``mini``'s encoder maps pink to latents its decoder renders pale or white (measured: pink kept in
    14 of 32 held-out scenes after an encode-decode round trip), while latents fitted to the decoder keep it:
    27 of 32 after 10 steps at lr 0.2, 31 of 32 with the shapes' pixels (those unlike the background, read at
    the top-left corner) weighted ``1 + shape_weight`` = 10, since the background otherwise dominates the loss.
    Deterministic on a fixed thread count, so resumes stay exact.
    """
    weight = shape_pixel_weights(images, shape_weight)
    z = latents.detach().clone().requires_grad_(True)
    opt = torch.optim.Adam([z], lr=lr)
    with torch.enable_grad():
        for _ in range(iters):
            opt.zero_grad(set_to_none=True)
            loss = ((vae.decode(z).sample - images).abs() * weight).mean()
            loss.backward()
            opt.step()
    return z.detach()


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(dataset: VaeBatches | UnetBatches, start_step: int, num_workers: int) -> Any:
    """Batches for steps ``start_step .. len-1`` in order (one item = one whole batch)."""
    return torch.utils.data.DataLoader(
        dataset, batch_size=None, sampler=range(start_step, len(dataset)),
        num_workers=num_workers, worker_init_fn=_worker_init if num_workers else None,
        prefetch_factor=2 if num_workers else None, persistent_workers=False,
    )
