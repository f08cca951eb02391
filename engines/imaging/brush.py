"""Masks in Label Studio's brush RLE, the `rle` of a `brushlabels` result.

The format (label-studio-sdk's `converter.brush`, read by its `decode_rle`): a bit stream of a
32-bit value count, the word size less one (5 bits) and four run-length field sizes less one
(4 bits each), then runs, each a flag bit (1: one value repeated, 0: that many literal values),
2 bits choosing a field size, the run's length less one in that many bits, and the value(s) in
word-size bits; zero bits pad the stream to whole bytes. The values are the RGBA pixels of the
mask, row-major, each channel the mask's byte (0 or 255).
"""

import numpy as np

WORD_BITS = 8
RUN_FIELD_BITS = (3, 4, 8, 16)
_LONGEST_RUN = 1 << RUN_FIELD_BITS[-1]


def _bits(value: int, width: int) -> list[int]:
    return [(value >> shift) & 1 for shift in range(width - 1, -1, -1)]


def _runs(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(lengths, values) of the runs of equal values, split at the longest length a run
    field holds."""
    if values.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, values.dtype)
    ends = np.append(np.flatnonzero(values[1:] != values[:-1]), values.size - 1)
    lengths = np.diff(np.append(-1, ends))
    pieces = np.maximum(1, -(-lengths // _LONGEST_RUN))
    run_values = np.repeat(values[ends], pieces)
    split: list[int] = []
    for length, count in zip(lengths.tolist(), pieces.tolist(), strict=True):
        split.extend([_LONGEST_RUN] * (count - 1) + [length - _LONGEST_RUN * (count - 1)])
    return np.asarray(split, np.int64), run_values


def encode_rle(values: np.ndarray) -> list[int]:
    """uint8 values -> the RLE bytes, as the list of ints a result's `rle` holds."""
    flat = np.ascontiguousarray(values, dtype=np.uint8).reshape(-1)
    bits = _bits(flat.size, 32) + _bits(WORD_BITS - 1, 5)
    for size in RUN_FIELD_BITS:
        bits += _bits(size - 1, 4)
    lengths, run_values = _runs(flat)
    for length, value in zip(lengths.tolist(), run_values.tolist(), strict=True):
        field = next(i for i, size in enumerate(RUN_FIELD_BITS) if length <= 1 << size)
        if length == 1:  # a literal run of one value
            bits += [0, *_bits(field, 2), *_bits(0, RUN_FIELD_BITS[field])]
        else:
            bits += [1, *_bits(field, 2), *_bits(length - 1, RUN_FIELD_BITS[field])]
        bits += _bits(value, WORD_BITS)
    packed = np.packbits(np.asarray(bits, dtype=np.uint8))
    return [int(b) for b in packed]


def mask_rle(mask: np.ndarray) -> list[int]:
    """A boolean (H, W) mask -> the RLE of its RGBA pixels (255 where set)."""
    if mask.ndim != 2:
        raise ValueError(f"a brush mask is 2-D, got shape {mask.shape}")
    pixels = np.where(mask, np.uint8(255), np.uint8(0))
    return encode_rle(np.repeat(pixels.reshape(-1), 4))
