"""Check a ``.safetensors`` file's header before it enters the store (no torch, no safetensors import).

The format: an 8-byte little-endian u64 ``N``, ``N`` bytes of JSON, then the tensor data. The JSON maps
tensor names to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the data)
plus an optional ``"__metadata__"`` of strings. A corrupt or hostile header (``N`` = 2^63, offsets past
the end, two tensors sharing bytes, a pickle renamed ``.safetensors``) would otherwise be stored and
fail only when a worker loads it, so the store refuses it at import. The rules are the ones the
safetensors library applies on load: tensors are laid out back to back from offset 0 and cover the
data exactly.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path
from typing import Any

from sdmaker.errors import ModelFormatError

__all__ = ["MAX_HEADER_BYTES", "check_safetensors"]

#: The safetensors library refuses headers over 100 MB; so does sdmaker.
MAX_HEADER_BYTES = 100_000_000

#: Bits per element of every dtype the safetensors format defines.
_DTYPE_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64, "F4": 4,
    "F6_E2M3": 6, "F6_E3M2": 6,
}


def _sniff(head: bytes) -> str | None:
    """What a file that is not safetensors probably is, from its first bytes."""
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (the torch.save checkpoint format, which unpickles on load)"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        return "a Python pickle (unpickling runs arbitrary code)"
    return None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice")
        out[key] = value
    return out


def _is_uint(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def check_safetensors(path: Path, *, name: str | None = None) -> None:
    """Refuse ``path`` unless its header is a sane safetensors header that matches the file's length.

    ``name`` is how the file is named in the message (its path inside the model). Reads only the
    header. Raises ``ModelFormatError`` naming the file and what is wrong (``fields["reason"]``).
    """
    path = Path(path)
    label = name or str(path)

    def bad(reason: str) -> ModelFormatError:
        if kind is not None and not parsed:  # a header that did not parse: say what the file really is
            reason = f"it is {kind}, renamed .safetensors ({reason})"
        return ModelFormatError(f"{label} is not a valid safetensors file: {reason}; nothing was stored",
                                model=label, path=label, reason=reason)

    kind: str | None = None
    parsed = False
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        kind = _sniff(head)  # only used to explain a header that does not parse (0x80 0x02 is a valid N)
        if len(head) < 8:
            raise bad(f"it is {size} bytes long, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER_BYTES:
            raise bad(f"the declared header length {n} is over the {MAX_HEADER_BYTES}-byte limit")
        if n > size - 8:
            raise bad(f"the declared header length {n} runs past the end of the {size}-byte file")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad(f"the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    parsed = True
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict)
                                     and all(isinstance(v, str) for v in metadata.values())):
        raise bad("__metadata__ must map names to strings")
    data_len = size - 8 - n
    spans: list[tuple[int, int, str]] = []
    for tensor, info in header.items():
        if not isinstance(info, dict):
            raise bad(f"tensor {tensor!r}: its entry is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPE_BITS:
            raise bad(f"tensor {tensor!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or not all(_is_uint(d) for d in shape):
            raise bad(f"tensor {tensor!r}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_uint(o) for o in offsets)):
            raise bad(f"tensor {tensor!r}: data_offsets {offsets!r} is not a [begin, end] pair of "
                      "non-negative integers")
        begin, end = offsets
        if begin > end:
            raise bad(f"tensor {tensor!r}: data_offsets [{begin}, {end}] end before they begin")
        if end > data_len:
            raise bad(f"tensor {tensor!r}: data_offsets [{begin}, {end}] run past the {data_len} bytes of data")
        bits = math.prod(shape) * _DTYPE_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise bad(f"tensor {tensor!r}: {dtype} {shape} needs {bits / 8:g} bytes but data_offsets "
                      f"[{begin}, {end}] hold {end - begin}")
        spans.append((begin, end, tensor))
    at = 0
    for begin, end, tensor in sorted(spans):
        if begin < at:
            raise bad(f"tensor {tensor!r}: data_offsets [{begin}, {end}] overlap the previous tensor's bytes "
                      f"(which end at {at})")
        if begin > at:
            raise bad(f"tensor {tensor!r}: data_offsets [{begin}, {end}] leave a gap of {begin - at} bytes "
                      f"after offset {at}")
        at = end
    if at != data_len:
        raise bad(f"the tensors cover {at} bytes but the file holds {data_len} bytes of data")
