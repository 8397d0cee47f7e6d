"""Compact encodings of pruned weight tensors (ALGORITHMS.md section 1, step 4).

Every weight is seen as the matrix ``out x in_flat`` (a conv's filters flattened), and stored in
whichever of these encodings is smallest for it:

* ``csr`` -- compressed sparse rows: the non-zero values (AA), each row's start (JA, ``rows + 1``
  entries) and each value's column (IC), i.e. ``2a + n + 1`` numbers for ``a`` non-zeros in ``n``
  rows. Both index arrays use the smallest integer type that holds them (uint8, int16, int32, int64).
* ``delta`` -- relative indices as in Deep Compression (Han, Mao, Dally 2016, section 3): each
  non-zero stores the gap from the previous one in the flattened matrix, in 4, 8 or 16 bits; a gap
  wider than the width allows is bridged by a padding entry whose value is 0 (a "filler zero").
  No row pointers are needed. Fillers also run on to within one gap of the tensor's end, so the
  stored gaps account for every element: a header cannot declare more elements than its data covers.
* ``nm`` -- packed N:M: every group of M consecutive inputs of a row keeps at most N weights; store
  exactly N values per group and each value's position in the group in ``ceil(log2 M)`` bits.
* ``dense`` -- the tensor as it is (biases, BatchNorm statistics, weights that are not sparse enough).

Then, losslessly (format version 3, :func:`pack_floats`): the float array of any encoding (the
non-zero values, or a dense tensor) is split into byte planes, and each plane that deflates by 3% or
more is stored deflated (zlib). A float32 weight's top byte (sign and 7 exponent bits) carries ~1.5
bits of information in a pruned LLM, its low mantissa bytes ~8: SmolLM2-135M's kept values take
3.25 bytes instead of 4, and its embedding (dequantised from 4 bits) 2.45.

Decoding gives every non-zero bit for bit. Zeros come back as +0.0: a pruned weight multiplied by
its mask may be -0.0, which compares equal to 0 but whose sign bit is not worth storing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import BrainsurgeonError

# Index widths tried for CSR, smallest first; int16 is used up to 32767 because safetensors and
# torch agree on its layout everywhere (unsigned 16-bit is newer in both).
CSR_INDEX_DTYPES = (torch.uint8, torch.int16, torch.int32, torch.int64)
DELTA_BITS = (4, 8, 16)
NM_GROUP_SIZES = (4, 8, 16, 32)


@dataclass
class Encoded:
    """One encoded tensor: its arrays (named parts) and the JSON-able facts needed to decode it."""

    encoding: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    parts: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict = field(default_factory=dict)
    version: int = 3  # the file format version it was read from or is written in (decoding checks differ)

    @property
    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parts.values())


# ----------------------------------------------------------------------------- helpers
def info_int(info: dict, key: str, *, lo: int | None = None, hi: int | None = None, choices=None) -> int:
    """A whole number from a header entry, refused (one line) if missing, not an integer or out of range."""
    v = info.get(key)
    if isinstance(v, bool) or not isinstance(v, int):
        raise BrainsurgeonError(f"header field {key!r} is {v!r}, not an integer: the file is damaged")
    if (choices is not None and v not in choices) or (lo is not None and v < lo) or (hi is not None and v > hi):
        allowed = f"one of {tuple(choices)}" if choices is not None else f"in [{lo}, {hi}]"
        raise BrainsurgeonError(f"header field {key!r} is {v}, not {allowed}: the file is damaged")
    return v


def check_shape(shape) -> tuple[int, ...]:
    """A header shape: a list of non-negative integers (no fractions, no booleans)."""
    if not isinstance(shape, list) or any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in shape):
        raise BrainsurgeonError(f"header shape {shape!r} is not a list of non-negative integers: the file is damaged")
    return tuple(shape)


def smallest_index_dtype(max_value: int) -> torch.dtype:
    """The narrowest integer dtype of CSR_INDEX_DTYPES that can hold ``max_value`` (>= 0)."""
    for dt in CSR_INDEX_DTYPES:
        if max_value <= torch.iinfo(dt).max:
            return dt
    raise BrainsurgeonError(f"an index of {max_value} does not fit in 64 bits")


def as_matrix(t: torch.Tensor) -> torch.Tensor:
    """The ``out x in_flat`` view of a weight (a conv's filters flattened), as the pruners see it."""
    return t.reshape(t.shape[0], -1)


def pack_bits(values: np.ndarray, bits: int) -> np.ndarray:
    """Pack small unsigned integers (< 2**bits, bits in 1..8) into bytes, little-endian within a byte."""
    values = np.asarray(values, dtype=np.uint8)
    per_byte = 8 // bits
    pad = (-len(values)) % per_byte
    v = np.concatenate([values, np.zeros(pad, np.uint8)]).reshape(-1, per_byte).astype(np.uint16)
    shifts = (np.arange(per_byte, dtype=np.uint16) * bits)[None, :]
    return (v << shifts).sum(axis=1).astype(np.uint8)


def unpack_bits(packed: np.ndarray, bits: int, count: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: the first ``count`` integers."""
    per_byte = 8 // bits
    if len(packed) * per_byte < count:
        raise BrainsurgeonError(f"packed index array holds {len(packed) * per_byte} entries, {count} expected")
    shifts = (np.arange(per_byte, dtype=np.uint8) * bits)[None, :]
    v = (packed.astype(np.uint8)[:, None] >> shifts) & np.uint8((1 << bits) - 1)
    return v.reshape(-1)[:count]


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().contiguous().numpy()


# ----------------------------------------------------------------------------- CSR
def encode_csr(t: torch.Tensor) -> Encoded:
    m = as_matrix(t.detach().cpu())
    rows, cols = m.shape
    nz = m != 0
    counts = nz.sum(dim=1)
    row_ptr = torch.zeros(rows + 1, dtype=torch.int64)
    row_ptr[1:] = torch.cumsum(counts, 0)
    col_idx = nz.nonzero()[:, 1]  # row-major order, so grouped by row
    nnz = int(row_ptr[-1])
    return Encoded(
        "csr", tuple(t.shape), t.dtype,
        {
            "values": m[nz].contiguous(),
            "row_ptr": row_ptr.to(smallest_index_dtype(nnz)),
            "col_idx": col_idx.to(smallest_index_dtype(max(cols - 1, 0))),
        },
        {"nnz": nnz},
    )


def decode_csr(e: Encoded) -> torch.Tensor:
    rows, cols = e.shape[0], math.prod(e.shape[1:])
    values, row_ptr, col_idx = e.parts["values"], e.parts["row_ptr"], e.parts["col_idx"]
    nnz = values.numel()
    # the writer uses the narrowest index types: so the column type bounds the declared width, and the
    # row pointers the height, before anything of the declared size is allocated
    if col_idx.dtype != smallest_index_dtype(max(cols - 1, 0)) or row_ptr.dtype != smallest_index_dtype(nnz):
        raise BrainsurgeonError(f"CSR index types ({row_ptr.dtype}, {col_idx.dtype}) do not fit the declared "
                                f"{rows} x {cols} matrix with {nnz} values")
    row_ptr, col_idx = row_ptr.long(), col_idx.long()
    if row_ptr.numel() != rows + 1 or col_idx.numel() != nnz:
        raise BrainsurgeonError(f"CSR arrays have inconsistent lengths ({row_ptr.numel()} row pointers for {rows} rows, "
                                f"{col_idx.numel()} column indices for {nnz} values)")
    if nnz and (int(row_ptr[0]) != 0 or int(row_ptr[-1]) != nnz or bool((row_ptr[1:] < row_ptr[:-1]).any())):
        raise BrainsurgeonError("CSR row pointers are not a non-decreasing sequence from 0 to the number of values")
    if nnz and (int(col_idx.min()) < 0 or int(col_idx.max()) >= cols):
        raise BrainsurgeonError(f"CSR column indices fall outside 0..{cols - 1}")
    row_start = torch.zeros(nnz, dtype=torch.bool)
    row_start[row_ptr[:-1][row_ptr[:-1] < nnz]] = True
    if nnz > 1 and not bool(((col_idx[1:] > col_idx[:-1]) | row_start[1:]).all()):
        raise BrainsurgeonError("CSR column indices repeat or are out of order within a row (two values for one weight)")
    out = torch.zeros(rows, cols, dtype=e.dtype)
    row_of = torch.repeat_interleave(torch.arange(rows), row_ptr[1:] - row_ptr[:-1])
    out[row_of, col_idx] = values
    return out.reshape(e.shape)


# ----------------------------------------------------------------------------- delta (Deep Compression)
def _delta_entries(flat_positions: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaps of the non-zeros (first gap counted from -1), with filler entries where a gap overflows.

    Returns ``(gaps, is_real)``: one gap per stored entry, and whether the entry is a real weight
    (else a filler zero). A gap ``g > cap`` becomes ``ceil(g / cap) - 1`` fillers of gap ``cap`` and
    the remainder.
    """
    cap = (1 << bits) - 1
    gaps = np.diff(np.concatenate([[-1], flat_positions])).astype(np.int64)
    fillers = (gaps - 1) // cap  # entries needed before the real one
    total = len(gaps) + int(fillers.sum())
    out = np.full(total, cap, dtype=np.int64)
    real = np.zeros(total, dtype=bool)
    real_at = np.cumsum(fillers + 1) - 1
    out[real_at] = gaps - fillers * cap
    real[real_at] = True
    return out, real


def _trailing_fillers(flat_positions: np.ndarray, numel: int, bits: int) -> int:
    """Fillers of gap ``cap`` after the last non-zero, so that fewer than ``cap`` elements stay uncovered."""
    last = int(flat_positions[-1]) if len(flat_positions) else -1
    return (numel - 1 - last) // ((1 << bits) - 1)


def delta_size(flat_positions: np.ndarray, bits: int, value_bytes: int, numel: int) -> int:
    cap = (1 << bits) - 1
    gaps = np.diff(np.concatenate([[-1], flat_positions]))
    entries = len(gaps) + int(((gaps - 1) // cap).sum()) + _trailing_fillers(flat_positions, numel, bits)
    return entries * value_bytes + math.ceil(entries * bits / 8)


def encode_delta(t: torch.Tensor, bits: int) -> Encoded:
    flat = t.detach().cpu().reshape(-1)
    pos = _np((flat != 0).nonzero().reshape(-1))
    gaps, real = _delta_entries(pos, bits)
    tail = _trailing_fillers(pos, flat.numel(), bits)
    gaps = np.concatenate([gaps, np.full(tail, (1 << bits) - 1, dtype=np.int64)])
    real = np.concatenate([real, np.zeros(tail, dtype=bool)])
    values = torch.zeros(len(gaps), dtype=t.dtype)
    values[torch.from_numpy(real)] = flat[flat != 0]
    if bits < 8:
        idx = pack_bits(gaps, bits)
    elif bits == 8:
        idx = gaps.astype(np.uint8)
    else:  # 16-bit gaps kept as int16 bit patterns: the same bytes, a dtype every safetensors reader knows
        idx = gaps.astype(np.uint16).view(np.int16)
    idx_t = torch.from_numpy(np.ascontiguousarray(idx))
    return Encoded("delta", tuple(t.shape), t.dtype, {"values": values, "gaps": idx_t},
                   {"bits": bits, "entries": int(len(gaps))})


def decode_delta(e: Encoded) -> torch.Tensor:
    bits = info_int(e.info, "bits", choices=DELTA_BITS)
    entries = info_int(e.info, "entries", lo=0)
    values = e.parts["values"]
    raw = _np(e.parts["gaps"])
    if raw.dtype != (np.int16 if bits == 16 else np.uint8):
        raise BrainsurgeonError(f"{bits}-bit delta gaps are stored as {raw.dtype}: the file is damaged")
    if values.numel() != entries:
        raise BrainsurgeonError(f"delta-coded tensor holds {values.numel()} values, its header says {entries}")
    if bits < 8:
        gaps = unpack_bits(raw, bits, entries).astype(np.int64)
    else:
        gaps = raw.view(np.uint8 if bits == 8 else np.uint16).astype(np.int64)
        if len(gaps) != entries:
            raise BrainsurgeonError(f"delta-coded tensor holds {len(gaps)} gaps, its header says {entries}")
    n = math.prod(e.shape)
    if entries and (gaps.min() < 1):
        raise BrainsurgeonError("delta-coded gaps must be >= 1")
    pos = np.cumsum(gaps) - 1
    if entries and pos[-1] >= n:
        raise BrainsurgeonError(f"delta-coded positions run past the tensor's {n} elements")
    last = int(pos[-1]) if entries else -1
    # checked before allocating: a header declaring more elements than the gaps cover is refused
    # (version 1 wrote no trailing fillers: there, at most 65536 elements per stored entry)
    uncovered = (1 << bits) - 1 if e.version >= 2 else (1 << 16) * max(entries, 1)
    if n - 1 - last >= uncovered:
        raise BrainsurgeonError(f"the header declares {n} elements, but the delta-coded data covers only {last + 1}")
    out = torch.zeros(n, dtype=e.dtype)
    out[torch.from_numpy(pos)] = values  # fillers write their 0 where the weight is 0 anyway
    return out.reshape(e.shape)


# ----------------------------------------------------------------------------- packed N:M
def nm_pattern(t: torch.Tensor, m: int) -> int | None:
    """The smallest N such that every group of ``m`` consecutive inputs holds at most N non-zeros."""
    mat = as_matrix(t)
    if mat.shape[1] % m:
        return None
    return int((mat.reshape(mat.shape[0], -1, m) != 0).sum(-1).max())


def nm_size(t: torch.Tensor, n: int, m: int) -> int:
    groups = t.numel() // m
    bits = max(1, math.ceil(math.log2(m)))
    return groups * n * t.element_size() + math.ceil(groups * n * _packed_width(bits) / 8)


def _packed_width(bits: int) -> int:
    """Bits per position as packed: a divisor of 8 (1, 2, 4, 8) so no position straddles bytes."""
    for w in (1, 2, 4, 8):
        if bits <= w:
            return w
    raise BrainsurgeonError(f"an N:M group of more than 256 is not supported (needs {bits} bits)")


def encode_nm(t: torch.Tensor, n: int, m: int) -> Encoded:
    mat = as_matrix(t.detach().cpu())
    groups = mat.reshape(mat.shape[0], -1, m)
    nz = groups != 0
    # stable sort puts the non-zeros first, in position order; the rest fill up to N with zeros
    order = torch.argsort((~nz).to(torch.int8), dim=-1, stable=True)[..., :n]
    values = torch.gather(groups, -1, order)
    values = torch.where(values == 0, torch.zeros((), dtype=values.dtype), values)  # -0.0 -> +0.0
    width = _packed_width(max(1, math.ceil(math.log2(m))))
    packed = pack_bits(_np(order.reshape(-1)).astype(np.uint8), width) if width < 8 else _np(order.reshape(-1)).astype(np.uint8)
    return Encoded("nm", tuple(t.shape), t.dtype,
                   {"values": values.reshape(-1).contiguous(), "positions": torch.from_numpy(packed)},
                   {"n": n, "m": m, "bits": width})


def decode_nm(e: Encoded) -> torch.Tensor:
    m = info_int(e.info, "m", lo=2, hi=256)
    n = info_int(e.info, "n", lo=1, hi=m)
    width = info_int(e.info, "bits", choices=(_packed_width(math.ceil(math.log2(m))),))
    rows, cols = e.shape[0], math.prod(e.shape[1:])
    if cols % m or not (0 < n <= m):
        raise BrainsurgeonError(f"an N:M encoding with N={n}, M={m} does not fit rows of {cols} inputs")
    count = rows * (cols // m) * n
    values = e.parts["values"]
    if values.numel() != count:
        raise BrainsurgeonError(f"N:M tensor holds {values.numel()} values, {count} expected")
    raw = _np(e.parts["positions"])
    pos = unpack_bits(raw, width, count) if width < 8 else raw[:count]
    if len(pos) != count or (count and int(pos.max()) >= m):
        raise BrainsurgeonError(f"N:M positions are missing or fall outside a group of {m}")
    if n > 1 and count and bool((np.diff(np.sort(pos.reshape(-1, n), axis=1), axis=1) == 0).any()):
        raise BrainsurgeonError("N:M positions repeat within a group (two values for one weight)")
    out = torch.zeros(rows, cols // m, m, dtype=e.dtype)
    out.scatter_(-1, torch.from_numpy(pos.astype(np.int64)).reshape(rows, cols // m, n), values.reshape(rows, cols // m, n))
    return out.reshape(e.shape)


# ----------------------------------------------------------------------------- choice
def encode_dense(t: torch.Tensor) -> Encoded:
    return Encoded("dense", tuple(t.shape), t.dtype, {"data": t.detach().cpu().contiguous()})


# Bytes a file spends per stored array besides its data (its safetensors header entry) and per
# sparse tensor (its entry in the tensor table): for small tensors this decides, so it is counted.
PART_OVERHEAD = 64
TABLE_OVERHEAD = 96


def stored_size(e: Encoded, name: str = "") -> int:
    """The bytes ``e`` costs in a file: data plus header entries (a dense tensor has no table entry)."""
    table = 0 if e.encoding == "dense" else TABLE_OVERHEAD + len(name)
    return e.nbytes + len(e.parts) * (PART_OVERHEAD + len(name)) + table


def encode_best(t: torch.Tensor, name: str = "") -> Encoded:
    """Encode ``t`` in the smallest of dense / CSR / delta (4, 8, 16 bits) / packed N:M.

    Sizes count the header entries too, so a small tensor is never stored larger than dense.
    Only floating tensors of two or more dimensions (weights) are candidates for a sparse encoding.
    """
    dense = encode_dense(t)
    if t.dim() < 2 or not t.is_floating_point() or t.numel() == 0:
        return dense
    # every sparse encoding stores each non-zero's value and at least one bit of position: when that
    # alone is no smaller than dense (an unpruned embedding), skip building the candidates
    if int((t != 0).sum()) * (t.element_size() + 0.125) >= dense.nbytes:
        return dense
    candidates = [dense, encode_csr(t)]
    best = lambda: min(stored_size(c, name) for c in candidates)  # noqa: E731
    pos = _np((t.reshape(-1) != 0).nonzero().reshape(-1))
    sizes = {bits: delta_size(pos, bits, t.element_size(), t.numel()) for bits in DELTA_BITS}
    best_bits = min(sizes, key=sizes.get)
    if sizes[best_bits] + 2 * PART_OVERHEAD < best():
        candidates.append(encode_delta(t, best_bits))
    for m in NM_GROUP_SIZES:
        n = nm_pattern(t, m)
        if n is not None and n < m and nm_size(t, max(n, 1), m) + 2 * PART_OVERHEAD < best():
            candidates.append(encode_nm(t, max(n, 1), m))
    return min(candidates, key=lambda c: stored_size(c, name))


# ----------------------------------------------------------------------------- lossless float packing
PACK_CODEC = "zlib-planes"
PACK_MIN_ELEMENTS = 4096  # below this the header entries cost more than deflating saves
PACK_LEVEL = 3  # zlib level: 6 saves 1.5% more of the values and takes twice as long
PACK_SAMPLE = 1 << 20  # bytes of a plane deflated first to decide whether the whole plane is worth it


def _float_part(e: Encoded) -> str:
    return "data" if e.encoding == "dense" else "values"


def _deflated(plane: bytes) -> bytes | None:
    """``plane`` deflated, or None when that saves under 3% (mantissa bytes: near 8 bits of entropy)."""
    import zlib

    sample = plane[:PACK_SAMPLE]
    if len(zlib.compress(sample, 1)) >= 0.97 * len(sample):
        return None
    z = zlib.compress(plane, PACK_LEVEL)
    return z if len(z) < 0.97 * len(plane) else None


def pack_floats(e: Encoded) -> Encoded:
    """``e`` with its float array stored as byte planes, deflated where that pays; ``e`` itself if nothing does."""
    key = _float_part(e)
    t = e.parts.get(key)
    if t is None or not t.is_floating_point() or t.numel() < PACK_MIN_ELEMENTS:
        return e
    raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().reshape(-1, t.element_size())
    streams, planes = [], []
    for i in range(raw.shape[1]):
        plane = np.ascontiguousarray(raw[:, i]).tobytes()
        z = _deflated(plane)
        streams.append(plane if z is None else z)
        planes.append(["raw" if z is None else "zlib", len(streams[-1])])
    stored = sum(len(b) for b in streams)
    if stored >= 0.97 * raw.size:
        return e
    parts = {k: v for k, v in e.parts.items() if k != key}
    parts[f"{key}_packed"] = torch.frombuffer(bytearray(b"".join(streams)), dtype=torch.uint8)
    info = {**e.info, "packed": {"part": key, "codec": PACK_CODEC, "count": int(t.numel()), "planes": planes}}
    return Encoded(e.encoding, e.shape, e.dtype, parts, info, e.version)


def _inflate(chunk: bytes, size: int) -> bytes:
    """Exactly ``size`` bytes from one complete zlib stream; never more are allocated (no zip bombs)."""
    import zlib

    d = zlib.decompressobj()
    try:
        out = d.decompress(chunk, size)
    except zlib.error as err:
        raise BrainsurgeonError(f"a packed byte plane does not inflate ({err}): the file is damaged") from None
    if len(out) != size or not d.eof or d.unconsumed_tail or d.unused_data:
        raise BrainsurgeonError(f"a packed byte plane does not inflate to its declared {size} bytes: the file is damaged")
    return out


def unpack_floats(e: Encoded) -> Encoded:
    """The inverse of :func:`pack_floats`; every declared size checked before anything is allocated."""
    spec = e.info.get("packed")
    if spec is None:
        return e
    if e.version < 3:
        raise BrainsurgeonError(f"packed tensors exist from format version 3, this file says {e.version}: the file is damaged")
    key = _float_part(e)
    if not isinstance(spec, dict) or spec.get("part") != key or spec.get("codec") != PACK_CODEC:
        raise BrainsurgeonError(f"the packing entry {str(spec)[:80]} is not {PACK_CODEC} of {key!r}: the file is damaged")
    itemsize = torch.empty(0, dtype=e.dtype).element_size()
    count = info_int(spec, "count", lo=0, hi=math.prod(e.shape))  # no encoding stores more values than elements
    planes, blob = spec.get("planes"), e.parts.get(f"{key}_packed")
    if not isinstance(planes, list) or len(planes) != itemsize or any(
            not isinstance(p, list) or len(p) != 2 or p[0] not in ("raw", "zlib") or isinstance(p[1], bool)
            or not isinstance(p[1], int) or p[1] < 0 for p in planes):
        raise BrainsurgeonError(f"the packing entry lists {str(planes)[:80]}, not {itemsize} byte planes: the file is damaged")
    if blob is None or blob.dtype != torch.uint8 or blob.dim() != 1 or blob.numel() != sum(p[1] for p in planes):
        raise BrainsurgeonError(f"the packed {key} array is missing or not the {sum(p[1] for p in planes)} bytes its "
                                "planes declare: the file is damaged")
    data, out, offset = memoryview(blob.numpy()), np.empty((count, itemsize), np.uint8), 0  # slices: no copies
    for i, (codec, length) in enumerate(planes):
        chunk = data[offset: offset + length]
        offset += length
        if codec == "raw" and length != count:
            raise BrainsurgeonError(f"a raw byte plane holds {length} bytes for {count} values: the file is damaged")
        out[:, i] = np.frombuffer(chunk if codec == "raw" else _inflate(chunk, count), np.uint8)
    parts = {k: v for k, v in e.parts.items() if k != f"{key}_packed"}
    flat = torch.from_numpy(out).view(e.dtype).reshape(-1)
    # a dense tensor takes its shape back; a count that does not fit it is refused by decode()'s shape check
    parts[key] = flat.reshape(e.shape) if key == "data" and count == math.prod(e.shape) else flat
    return Encoded(e.encoding, e.shape, e.dtype, parts, {k: v for k, v in e.info.items() if k != "packed"}, e.version)


DECODERS = {"csr": decode_csr, "delta": decode_delta, "nm": decode_nm, "dense": lambda e: e.parts["data"]}
PARTS = {"csr": ("values", "row_ptr", "col_idx"), "delta": ("values", "gaps"), "nm": ("values", "positions"),
         "dense": ("data",)}


def decode(e: Encoded) -> torch.Tensor:
    if e.encoding not in DECODERS:
        raise BrainsurgeonError(f"unknown tensor encoding {e.encoding!r}; this file needs a newer brainsurgeon")
    e = unpack_floats(e)
    missing = [p for p in PARTS[e.encoding] if p not in e.parts]
    if missing:
        raise BrainsurgeonError(f"a {e.encoding} tensor is missing its parts {missing}: the file is damaged")
    for p in ("values", "data"):
        if p in e.parts and e.parts[p].dtype != e.dtype:
            raise BrainsurgeonError(f"stored values are {e.parts[p].dtype}, the header says {e.dtype}: the file is damaged")
    out = DECODERS[e.encoding](e)
    if tuple(out.shape) != tuple(e.shape):
        raise BrainsurgeonError(f"a {e.encoding} tensor decodes to shape {tuple(out.shape)}, the header says {e.shape}")
    return out
