"""How the activation store holds each (token, layer) row of `d_model` values.

bfloat16 is stored as uint16 (Zarr has no bfloat16; the array's attributes say
`logical_dtype: bfloat16`), float16 and float32 as themselves. `float8_e4m3` halves
bfloat16: each row is stored as uint8, its `d_model` values divided by max|row| / 448 and
cast to float8 e4m3fn, followed by that scale as 4 little-endian float32 bytes (`encode`,
`decode`), so a stored row is `d_model + 4` bytes and every reader gets bfloat16 back.
The checks for NaN/inf and the row norms the dump writes work on rows as stored.
"""

from __future__ import annotations

import numpy as np
import torch

_STORAGE = {"bfloat16": "uint16", "float16": "float16", "float32": "float32", "float8_e4m3": "uint8"}
FP8 = "float8_e4m3"
E4M3_MAX = 448.0
"""The largest finite float8 e4m3fn value: each row is scaled so its max |value| maps here."""
SCALE_BYTES = 4
"""A float8 row's float32 scale, stored after its values."""


def storage_dtype(logical: str) -> np.dtype:
    return np.dtype(_STORAGE[logical])


def storage_view(array: np.ndarray, logical: str) -> torch.Tensor:
    """Stored values as a torch tensor of the storage layout (no copy): bfloat16 for
    bfloat16, the raw uint8 rows for float8 (what `encode` writes into)."""
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if logical == "bfloat16" else t


def encode(x: torch.Tensor, logical: str) -> torch.Tensor:
    """Activations `x` (..., d_model) in the storage layout of `logical`: for float8 the
    scaled e4m3 values and the float32 scale of each row, as uint8 (..., d_model + 4); for
    the others `x` itself (copying it into a `storage_view` casts it)."""
    if logical != FP8:
        return x
    x = x.float()
    # Rows of zeros get a tiny scale instead of 0, so x / scale stays 0 rather than NaN.
    scale = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-30) / E4M3_MAX
    # Rounded up to a bfloat16 value (the low 16 bits of a positive float32 cleared upward,
    # so max|x| / scale stays <= 448): then `decode` multiplies in bfloat16 exactly.
    scale = ((scale.view(torch.int32) + 0xFFFF) & ~0xFFFF).view(torch.float32)
    values = (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    return torch.cat([values, scale.view(torch.uint8)], dim=-1)


E4M3_TABLE = (
    torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).bfloat16().view(torch.int16).numpy()
)
"""Every e4m3 byte's value as bfloat16 bits (all are exact in bfloat16): a table lookup decodes
on the CPU 3x faster than torch's float8 cast."""


def _e4m3_values(values: torch.Tensor) -> torch.Tensor:
    """uint8 e4m3 bytes -> their bfloat16 values."""
    if values.device.type != "cpu":
        return values.view(torch.float8_e4m3fn).to(torch.bfloat16)
    return torch.from_numpy(E4M3_TABLE[values.numpy()]).view(torch.bfloat16)


def decode(stored: torch.Tensor, logical: str) -> torch.Tensor:
    """The inverse of `encode`: activations in bfloat16 for float8, else stored values as
    they are."""
    if logical != FP8:
        return stored
    if stored.numel() == 0:  # torch views no bytes of an empty tensor as float32
        shape = stored.shape[:-1] + (stored.shape[-1] - SCALE_BYTES,)
        return torch.empty(shape, dtype=torch.bfloat16, device=stored.device)
    values, scale = _e4m3_values(stored[..., :-SCALE_BYTES]), stored[..., -SCALE_BYTES:].contiguous()
    if not (scale.view(torch.int32) & 0xFFFF).any():
        # bfloat16 scales (`encode` writes them): a 4-bit by 8-bit product is exact in float32,
        # so one bfloat16 multiply rounds it as the float32 formula then a cast does.
        return values * scale.view(torch.float32).bfloat16()
    return (values.float() * scale.view(torch.float32)).bfloat16()


def to_torch(array: np.ndarray, logical: str) -> torch.Tensor:
    """Stored values as a torch tensor of their logical dtype: a view, except for float8
    (decoded to bfloat16)."""
    return decode(storage_view(array, logical), logical)


_EXPONENT = {
    "bfloat16": (np.uint16, 0x7F80),
    "float16": (np.uint16, 0x7C00),
    "float32": (np.uint32, 0x7F800000),
    FP8: (np.uint32, 0x7F800000),  # of the float32 scale: NaN/inf in a row makes it NaN/inf
}


def nonfinite_rows(values: np.ndarray, logical: str) -> np.ndarray:
    """Per (row, layer) of `values` (rows, n_layers, ...) as stored, whether it holds a
    NaN/inf. Works on the raw bits (all exponent bits set): bf16 elementwise ops are slow
    on CPU. For float8 the scale says it (`encode` makes it NaN/inf then)."""
    int_type, mask = _EXPONENT[logical]
    if logical == FP8:
        values = np.ascontiguousarray(values[..., -SCALE_BYTES:])
    return ((values.view(int_type) & mask) == mask).any(axis=2)


def nonfinite_layers(values: np.ndarray, logical: str, block: int = 256) -> np.ndarray:
    """Per layer, whether any stored value of `values` (rows, n_layers, ...) is NaN/inf,
    block by block: a whole-shard temporary would cost more than the check."""
    bad = np.zeros(values.shape[1], dtype=bool)
    for b in range(0, len(values), block):
        bad |= nonfinite_rows(values[b : b + block], logical).any(axis=0)
    return bad


def row_norms(values: np.ndarray, logical: str, block: int = 1024) -> np.ndarray:
    """The L2 norm of every (row, layer) of stored `values` (rows, n_layers, ...) as float32
    (rows, n_layers), computed from the values as readers get them, block by block."""
    out = np.empty(values.shape[:2], np.float32)
    for b in range(0, len(values), block):
        out[b : b + block] = to_torch(values[b : b + block], logical).float().norm(dim=-1).numpy()
    return out


def encoding_attributes(logical: str) -> dict[str, str]:
    """The array attributes that describe the stored layout of `logical` to other readers."""
    if logical != FP8:
        return {}
    return {
        "encoding": "per (token, layer): d_model float8_e4m3fn values v, then a little-endian "
        "float32 scale s; activation = v * s, with s = max|activation| / 448 rounded up to a "
        "bfloat16 value"
    }
