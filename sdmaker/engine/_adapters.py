"""LoRA adapters per request, applied per row so requests with different adapters share one UNet call.

A pipeline-wide ``set_adapters`` changes the UNet for everyone, which forces one-adapter batches. Here
the base weights are never touched: for a UNet call whose rows carry adapters, a forward hook on each
adapted ``nn.Linear`` / ``nn.Conv2d`` adds ``scale * alpha / rank * B(A(x))`` to the output rows of the
requests that asked for that adapter, with each request's own scale (both CFG halves of a request: the
whole request runs through its adapters, as diffusers' ``set_adapters`` does). Rows without adapters get
nothing; a call with no adapters at all installs no hook (the plain code path, no cost).

Adapters come from the store (kind ``lora``, ``sdmaker model import``). :class:`AdapterLibrary` resolves
a request's ``loras`` against it, refuses an adapter made for another base model (a 400 naming both
digests: weights digests, :func:`sdmaker.files.weights_digest`, so a base whose model card was rewritten
by ``sdmaker model tune`` keeps its adapters; full digests for adapters recorded before weights digests
existed), and keeps loaded adapters (tensors on the model's device and dtype) in an LRU cache bounded
by bytes (``settings.lora_cache_bytes``).
"""

from __future__ import annotations

import collections
import contextlib
import logging
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sdmaker.errors import InvalidRequestError, ModelFormatError, ModelNotFoundError

__all__ = ["AdapterCache", "AdapterLibrary", "LoadedAdapter", "adapter_rows", "adapters_for", "builtin_loras_dir", "load_adapter",
           "merged_adapters", "pickle_lora_to_safetensors", "unet_module_shapes"]

logger = logging.getLogger(__name__)

#: Default memory budget of the loaded-adapter cache (bytes) when no settings say otherwise.
DEFAULT_CACHE_BYTES = 256 * 1024**2


@dataclass
class LoadedAdapter:
    """One adapter's tensors, ready to run: module name -> (A, B scaled by alpha/rank, conv?)."""

    name: str
    digest: str  # sha256 of the adapter file
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, bool]]
    nbytes: int = 0
    base_digest: str | None = None


def unet_module_shapes(unet: Any) -> dict[str, tuple[int, ...]]:
    """Module name -> weight shape of the UNet's Linear and Conv2d layers (what a LoRA may adapt)."""
    return {name: tuple(m.weight.shape) for name, m in unet.named_modules()
            if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))}


def load_adapter(path: Path, *, name: str, digest: str, unet: Any, device: torch.device | str,
                 dtype: torch.dtype, base_digest: str | None = None) -> LoadedAdapter:
    """Read the LoRA file ``path`` for ``unet``: every layer checked against the UNet's, tensors on ``device``."""
    from safetensors import safe_open

    from sdmaker.store import check_lora_base, read_lora

    shapes = unet_module_shapes(unet)
    layout = read_lora(path, unet_modules=shapes)
    try:
        check_lora_base(layout, shapes, base="the serving model")
    except ModelFormatError as exc:
        raise InvalidRequestError(f"LoRA {name!r} does not fit this model: {exc.message}", field="loras",
                                  value=name) from exc
    layers: dict[str, tuple[torch.Tensor, torch.Tensor, bool]] = {}
    nbytes = 0
    with safe_open(str(path), framework="pt", device="cpu") as fh:
        for module, layer in layout.layers.items():
            down = fh.get_tensor(layer.down).to(torch.float32)
            up = fh.get_tensor(layer.up).to(torch.float32) * layer.factor
            conv = len(shapes[module]) == 4
            if conv and down.ndim == 2:  # a 1x1 convolution adapted as a linear layer (kohya)
                down, up = down[:, :, None, None], up[:, :, None, None]
            if not conv and up.ndim == 4:
                down, up = down.flatten(1), up.flatten(1)
            down, up = down.to(device=device, dtype=dtype), up.to(device=device, dtype=dtype)
            layers[module] = (down, up, conv)
            nbytes += down.numel() * down.element_size() + up.numel() * up.element_size()
    return LoadedAdapter(name=name, digest=digest, layers=layers, nbytes=nbytes, base_digest=base_digest)


class AdapterCache:
    """Loaded adapters by key, least recently used dropped first once their bytes pass ``max_bytes``.

    An adapter bigger than the whole budget is loaded for its requests and not kept. Running requests hold
    their own references, so dropping an entry never pulls tensors from under a batch.
    """

    def __init__(self, max_bytes: int = DEFAULT_CACHE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._items: collections.OrderedDict[tuple[Any, ...], LoadedAdapter] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple[Any, ...]) -> LoadedAdapter | None:
        with self._lock:
            adapter = self._items.get(key)
            if adapter is not None:
                self._items.move_to_end(key)
                self.hits += 1
            else:
                self.misses += 1
            return adapter

    def put(self, key: tuple[Any, ...], adapter: LoadedAdapter) -> None:
        with self._lock:
            if adapter.nbytes > self.max_bytes:
                logger.warning("LoRA %s (%d bytes) is larger than the adapter cache (%d bytes): not kept",
                               adapter.name, adapter.nbytes, self.max_bytes)
                return
            self._items[key] = adapter
            self._items.move_to_end(key)
            while sum(a.nbytes for a in self._items.values()) > self.max_bytes:
                old_key, old = self._items.popitem(last=False)
                self.evictions += 1
                logger.info("adapter cache: dropped %s (%d bytes)", old.name, old.nbytes)


@dataclass
class AdapterLibrary:
    """Resolves request ``loras`` for one model: store lookup, base check, loading through the cache.

    ``store``: a :class:`sdmaker.store.Store` (None: the default store of :func:`sdmaker.config.load_settings`).
    """

    store: Any = None
    cache: AdapterCache = field(default_factory=AdapterCache)
    #: (model path, model digest) -> its weights digest, computed once per loaded model
    _weights: dict[tuple[str, str], str] = field(default_factory=dict, repr=False)

    @classmethod
    def from_settings(cls, settings: Any = None) -> AdapterLibrary:
        from sdmaker.config import load_settings
        from sdmaker.store import Store

        settings = settings if settings is not None else load_settings()
        return cls(store=Store(settings.store_dir, settings=settings),
                   cache=AdapterCache(getattr(settings, "lora_cache_bytes", DEFAULT_CACHE_BYTES)))

    def adapter(self, model: Any, name: str) -> LoadedAdapter:
        """The adapter ``name`` for ``model`` (a :class:`~sdmaker.engine.LoadedModel`); 400/404 naming the problem."""
        from sdmaker.errors import ModelError

        try:
            try:
                manifest, path = self.store.lora_path(name)
            except ModelNotFoundError:
                if not self._import_builtin(name):
                    raise
                manifest, path = self.store.lora_path(name)
        except ModelNotFoundError as exc:
            raise ModelNotFoundError(f"loras: no LoRA adapter named {name!r}: {exc.message}", model=name,
                                     field="loras") from exc
        except ModelError as exc:  # a corrupt manifest, a bad name
            raise InvalidRequestError(f"loras: {name!r}: {exc.message}", field="loras", value=name) from exc
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"loras: {exc.message}", field="loras", value=name) from exc
        info = manifest.lora
        base_digest = info.base_digest
        self._check_base(model, name, info)
        pipe = model.pipeline
        unet = getattr(pipe.unet, "_orig_mod", pipe.unet)
        dtype = next(unet.parameters()).dtype
        device = next(unet.parameters()).device
        key = (info.sha256, id(unet), str(device), str(dtype))
        cached = self.cache.get(key)
        if cached is not None:
            return cached if cached.name == name else LoadedAdapter(name=name, digest=cached.digest,
                                                                    layers=cached.layers, nbytes=cached.nbytes,
                                                                    base_digest=base_digest)
        adapter = load_adapter(path, name=name, digest=info.sha256, unet=unet, device=device, dtype=dtype,
                               base_digest=base_digest)
        self.cache.put(key, adapter)
        return adapter

    def _check_base(self, model: Any, name: str, info: Any) -> None:
        """Refuse ``info`` (a :class:`~sdmaker.store.LoraInfo`) for ``model`` when it was made for another base:
        by weights digest when the adapter records one, else (adapters imported before) by full digest."""
        if info.base_weights_digest is not None:
            theirs, ours = info.base_weights_digest, self.model_weights_digest(model)
            if theirs == ours:
                return
            made = f"weights digest {theirs}" + (f", digest {info.base_digest}" if info.base_digest else "")
            serves = f"weights digest {ours or 'unknown'}, digest {model.digest or 'unknown'}"
            allowed = f"adapters whose base weights digest is {ours}"
        elif info.base_digest is not None:
            if info.base_digest == model.digest:
                return
            made, serves = f"digest {info.base_digest}", f"digest {model.digest or 'unknown'}"
            allowed = f"adapters whose base digest is {model.digest}"
        else:
            return
        raise InvalidRequestError(
            f"LoRA {name!r} was made for base model {info.base or '?'} ({made}), but this endpoint serves "
            f"{model.name} ({serves}); use the adapter with its own base model",
            field="loras", value=name, allowed=allowed)

    def model_weights_digest(self, model: Any) -> str | None:
        """``model``'s weights digest: from its store manifest when the store holds it (nothing read), else
        hashed from its folder's UNet and text-conditioning files, once per loaded model. None when unknown."""
        from sdmaker.errors import SdmakerError
        from sdmaker.files import weights_digest

        known = getattr(model, "weights_digest", None)
        if isinstance(known, str):
            return known
        path = getattr(model, "path", None)
        if path is None:
            return None
        key = (str(path), str(model.digest))
        if key not in self._weights:
            digest: str | None = None
            if self.store is not None:
                with contextlib.suppress(SdmakerError, OSError):
                    manifest = self.store.get(model.name)
                    if manifest.kind == "model" and manifest.digest == model.digest:
                        digest = manifest.weights_digest
            if digest is None:
                try:
                    digest = weights_digest(path)
                except (OSError, SdmakerError) as exc:
                    logger.warning("cannot compute the weights digest of %s: %s", path, exc)
                    return None
            self._weights[key] = digest
        return self._weights[key]

    def _import_builtin(self, name: str) -> bool:
        """Import the adapter ``name`` shipped with sdmaker (``sdmaker/models/loras/<name>/``, made for ``mini``)
        into the store on first use, as built-in models are; False when there is none."""
        from sdmaker.store import LORA_FILE, resolve_model
        from sdmaker.store._manifest import NAME_PATTERN

        settings = getattr(self.store, "settings", None)
        if settings is None or not NAME_PATTERN.match(name):
            return False
        file = builtin_loras_dir() / name / LORA_FILE
        if not file.is_file():
            return False
        base = resolve_model("mini", settings)
        logger.info("importing the built-in LoRA %s (base mini, digest %s) into the store", name, base.digest[:12])
        with contextlib.suppress(FileExistsError):  # a concurrent request imported it first
            self.store.import_lora(file, name=name, base=base.name, base_digest=base.digest,
                                   base_weights_digest=base.weights_digest, base_unet=base.path / "unet")
        return True


def builtin_loras_dir() -> Path:
    """Where sdmaker's own trained adapters ship (``sdmaker/models/loras/<name>/pytorch_lora_weights.safetensors``)."""
    import sdmaker.models

    return Path(sdmaker.models.__file__).parent / "loras"


def _library(model: Any) -> AdapterLibrary:
    library = getattr(model, "adapters", None)
    if library is None:
        library = AdapterLibrary.from_settings()
        model.adapters = library
    return library


def adapters_for(model: Any, request: Any) -> list[tuple[LoadedAdapter, float]]:
    """The adapters (with their scales) ``request`` asks for on ``model``; [] when none. Raises 400/404 errors."""
    refs = getattr(request, "loras", None)
    if not refs:
        return []
    library = _library(model)
    out: list[tuple[LoadedAdapter, float]] = []
    for ref in refs:
        name, scale = (ref["name"], float(ref.get("scale", 1.0))) if isinstance(ref, dict) else (ref.name, ref.scale)
        out.append((library.adapter(model, name), scale))
    return out


#: One UNet call's per-row adapter use: adapter -> (row selector, per-row scales or one float)
_Plan = list[tuple[LoadedAdapter, slice | torch.Tensor, torch.Tensor | float]]


def _plan(per_job: Sequence[Sequence[tuple[LoadedAdapter, float]]], sizes: Sequence[int],
          device: torch.device, dtype: torch.dtype) -> _Plan:
    """Group rows by adapter: a slice when its rows are contiguous with one scale, else indices + scales."""
    rows: dict[int, tuple[LoadedAdapter, list[int], list[float]]] = {}
    start = 0
    for adapters, size in zip(per_job, sizes, strict=True):
        for adapter, scale in adapters:
            entry = rows.setdefault(id(adapter.layers), (adapter, [], []))
            entry[1].extend(range(start, start + size))
            entry[2].extend([scale] * size)
        start += size
    plan: _Plan = []
    for adapter, idx, scales in rows.values():
        if idx == list(range(idx[0], idx[-1] + 1)) and len(set(scales)) == 1:
            plan.append((adapter, slice(idx[0], idx[-1] + 1), scales[0]))
        else:
            plan.append((adapter, torch.tensor(idx, device=device),
                         torch.tensor(scales, device=device, dtype=dtype)))
    return plan


_Entry = tuple[torch.Tensor, torch.Tensor, bool, slice | torch.Tensor, torch.Tensor | float]


@dataclass
class _Stack:
    """Every linear adapter of one layer in one call, stacked: ``out += ((x A^T) * M) B^T``.

    ``down`` is the adapters' A matrices stacked by rank (R x in), ``up`` their B matrices side by side
    (out x R) and ``mask`` (rows x R) holds, for each row, its scale in the columns of the adapters it uses
    and 0 elsewhere. Two matmuls per layer however many adapters a call mixes, instead of a gather, two
    matmuls and a scatter per adapter: a row's sum over its adapter's columns is exactly its own
    ``scale * B(A(x))``, and the zeroed columns add nothing.
    """

    down: torch.Tensor
    up: torch.Tensor
    mask: torch.Tensor


def _stack(entries: Sequence[_Entry], rows: int, masks: dict[tuple[Any, ...], torch.Tensor]) -> _Stack:
    """The :class:`_Stack` of linear ``entries``; layers with the same adapters (by plan) share one mask."""
    down = torch.cat([e[0] for e in entries])
    up = torch.cat([e[1] for e in entries], dim=1)
    key = tuple((id(e[3]), id(e[4]), e[0].shape[0]) for e in entries)
    mask = masks.get(key)
    if mask is None:
        mask = torch.zeros(rows, down.shape[0], device=down.device, dtype=down.dtype)
        col = 0
        for adapter_down, _up, _conv, sel, scale in entries:
            rank = adapter_down.shape[0]
            per_row = torch.zeros(rows, device=down.device, dtype=down.dtype)
            if isinstance(sel, slice):
                per_row[sel] += scale
            else:  # a request naming one adapter twice lists its rows twice: the scales add up
                per_row.index_add_(0, sel, scale if isinstance(scale, torch.Tensor)
                                   else torch.full((len(sel),), scale, device=down.device, dtype=down.dtype))
            mask[:, col:col + rank] = per_row[:, None]
            col += rank
        masks[key] = mask
    return _Stack(down, up, mask)


def _is_whole(entry: _Entry, rows: int) -> bool:
    """Whether ``entry`` covers every row of the call with one scale (its delta is one fused ``addmm_``)."""
    sel, scale = entry[3], entry[4]
    return isinstance(sel, slice) and sel.start == 0 and sel.stop == rows and not isinstance(scale, torch.Tensor)


def _hook(entries: list[_Entry], rows: int, stack: _Stack | None = None) -> Any:
    owner = threading.get_ident()  # the step batcher's heavy lane runs the same UNet on another thread meanwhile

    def hook(module: Any, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        if threading.get_ident() != owner:
            return out
        x = args[0]
        if x.shape[0] != rows or out.shape[0] != rows:
            raise RuntimeError(f"LoRA rows: a layer saw {x.shape[0]} rows, the call has {rows}")
        if stack is not None:
            h = F.linear(x, stack.down)
            h.mul_(stack.mask.view(rows, *([1] * (h.dim() - 2)), -1))
            if out.is_contiguous():
                out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), stack.up.t())
            else:
                out.add_(F.linear(h, stack.up))
        for entry in entries:
            down, up, conv, sel, scale = entry
            if not conv and _is_whole(entry, rows) and out.is_contiguous():
                # the common case (every row, one scale): out += scale * (x A^T) B^T, the add fused into the matmul
                flat = x.reshape(-1, x.shape[-1])
                out.view(-1, out.shape[-1]).addmm_(flat @ down.t(), up.t(), alpha=float(scale))
                continue
            whole = isinstance(sel, slice) and sel.start == 0 and sel.stop == rows
            xs = x if whole else x[sel] if isinstance(sel, slice) else x.index_select(0, sel)
            if conv:
                delta = F.conv2d(F.conv2d(xs, down, None, module.stride, module.padding, module.dilation), up)
            else:
                delta = F.linear(F.linear(xs, down), up)
            if isinstance(scale, torch.Tensor):
                out.index_add_(0, sel, delta * scale.view(-1, *([1] * (delta.dim() - 1))))  # type: ignore[arg-type]
            else:
                (out if whole else out[sel]).add_(delta, alpha=scale)
        return out
    return hook


class _WeightState:
    """Who may run the UNet now: :func:`merged_adapters` holds its weights changed for one thread's run."""

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.owner: int | None = None  # the thread whose run has adapters merged into the weights
        self.in_flight = 0  # UNet calls running on other terms (the batcher and its heavy lane)


_STATE_LOCK = threading.Lock()


def _state(unet: Any) -> _WeightState:
    with _STATE_LOCK:
        state = getattr(unet, "_sdmaker_lora_state", None)
        if state is None:
            state = _WeightState()
            unet._sdmaker_lora_state = state
        return state


@contextlib.contextmanager
def adapter_rows(unet: Any, per_job: Sequence[Sequence[tuple[LoadedAdapter, float]]],
                 sizes: Sequence[int]) -> Iterator[None]:
    """Within the block, ``unet`` adds each job's adapters to that job's rows (``sizes``: rows per job, in order).

    Installs one forward hook per adapted layer for the block only; with no adapters it installs nothing.
    Inside :func:`merged_adapters` on this thread the weights already carry the run's adapters: no hooks.
    A call from another thread waits while a merged run holds the weights.
    """
    unet = getattr(unet, "_orig_mod", unet)
    state = _state(unet)
    me = threading.get_ident()
    with state.cond:
        while state.owner is not None and state.owner != me:
            state.cond.wait()
        merged = state.owner == me
        state.in_flight += 0 if merged else 1
    handles: list[Any] = []
    try:
        if any(per_job) and not merged:
            param = next(unet.parameters())
            plan = _plan(per_job, sizes, param.device, param.dtype)
            by_module: dict[str, list[Any]] = {}
            for adapter, sel, scale in plan:
                for module, (down, up, conv) in adapter.layers.items():
                    by_module.setdefault(module, []).append((down, up, conv, sel, scale))
            modules = dict(unet.named_modules())
            rows = sum(sizes)
            masks: dict[tuple[Any, ...], torch.Tensor] = {}
            for name, entries in by_module.items():
                linear = [e for e in entries if not e[2]]
                stack = None
                if len(linear) > 1 or (linear and not _is_whole(linear[0], rows)):  # rows differ: stack them
                    stack = _stack(linear, rows, masks)
                    entries = [e for e in entries if e[2]]
                handles.append(modules[name].register_forward_hook(_hook(entries, rows, stack)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        if not merged:
            with state.cond:
                state.in_flight -= 1
                state.cond.notify_all()


@contextlib.contextmanager
def merged_adapters(unet: Any, adapters: Sequence[tuple[LoadedAdapter, float]]) -> Iterator[None]:
    """Add ``adapters`` into the UNet's weights for a one-request run (``generate``), restored exactly after.

    A run alone needs no per-row selection, so its adapters cost one ``W += scale * B A`` per layer per
    request instead of extra work in every layer at every step. The original weights are copied first and
    copied back (never subtracted), and the UNet belongs to this thread meanwhile: the step batcher's calls
    (its heavy lane too) wait at :func:`adapter_rows`. Without adapters nothing happens.
    """
    if not adapters:
        yield
        return
    unet = getattr(unet, "_orig_mod", unet)
    state = _state(unet)
    me = threading.get_ident()
    with state.cond:
        while state.owner is not None or state.in_flight:
            state.cond.wait()
        state.owner = me
    modules = dict(unet.named_modules())
    saved: dict[str, torch.Tensor] = {}
    try:
        with torch.no_grad():
            for adapter, scale in adapters:
                for name, (down, up, _conv) in adapter.layers.items():
                    weight = modules[name].weight
                    if name not in saved:
                        saved[name] = weight.detach().clone()
                    delta = up.flatten(1) @ down.flatten(1)  # (out, in x kh x kw): a 1x1 up after any down kernel
                    weight.add_(delta.view(weight.shape), alpha=scale)
        yield
    finally:
        with torch.no_grad():
            for name, original in saved.items():
                modules[name].weight.copy_(original)
        with state.cond:
            state.owner = None
            state.cond.notify_all()

def pickle_lora_to_safetensors(src: Path, out: Path) -> Path:
    """Rewrite a pickled LoRA state dict (``.bin``/``.pt``) as safetensors; only after the user allowed pickle.

    ``torch.load(weights_only=True)`` refuses anything but tensors and plain containers.
    """
    from safetensors.torch import save_file

    state = torch.load(src, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelFormatError(f"{src} does not hold a flat dict of tensors (a LoRA state dict)", path=str(src))
    save_file({str(k): v.contiguous() for k, v in state.items()}, str(out))
    return out
