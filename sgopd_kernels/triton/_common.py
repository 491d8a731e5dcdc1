"""Triton helpers shared by the row kernels: addressing, loads, and the online folds.

A row is streamed in blocks of ``BLOCK_V`` logits. The forward kernels see a
block as a ``[BLOCK_V // SLOT, SLOT]`` tile (:func:`tile`): each of its
``BLOCK_V // SLOT`` slots is ``SLOT`` consecutive logits that one thread
holds (one 128-bit load for bfloat16), or, in the logits forward, as the
``[BLOCK_V // (2 SLOT), 2 SLOT]`` tile of :func:`tile2`, whose slots hold
``SLOT`` consecutive logits of each half of the block (two 128-bit loads, one
slot). Running state is kept per slot and reduced along the slot, inside the
thread; the slots are combined across threads once per row (``combine_*``).
Every fold comes in two forms, chosen by the constexpr ``GUARD``:

- ``GUARD=True`` sanitizes every element and every slot (a product ``e * x``
  is 0 where ``e == 0``, the bridge is -inf off the joint support, an empty
  slot keeps sums of 0): exact for any input, including -inf logits;
- ``GUARD=False`` does no sanitation. On finite logits it gives the same
  values; a -inf logit (or a slot that is -inf throughout) turns some
  accumulator into NaN, which the kernel detects once per row
  (:func:`any_nan`) to read that row again with ``GUARD=True``. The one
  exception is a teacher's -inf where the student has mass: a -inf sum and
  an infinite loss, which are the right values (the logits forward also
  tells its backward so, in the table's ``FINITE``).

Blocks inside the row of contiguous bfloat16 rows whose grid starts are
4-byte aligned are read as int32 pairs (:func:`load_pairs`): two float32 out
of one word with a shift and a mask.
"""

from __future__ import annotations

import triton
import triton.language as tl

NEG_INF = tl.constexpr(float("-inf"))
# logits per slot: 8 bfloat16 logits are one 128-bit load
SLOT = tl.constexpr(8)
# the forms of frame units (frame_units)
DIFF = tl.constexpr(0)
FMA = tl.constexpr(1)
ROW = tl.constexpr(2)
FMA_LIMIT = tl.constexpr(1048576.0)  # 2^20: |f scale| of a frame that takes FMA (fma_frames)


@triton.jit
def row_ptr(X, row, d1, st0, st1):
    """The first element of row ``row`` of a tensor addressed as ``row_layout`` describes."""
    return X + (row // d1) * st0 + (row % d1) * st1


@triton.jit
def put(out, col, valid, x):
    """Column ``col`` of a row's table entry ``out``: ``x`` where the row is valid, else 0."""
    tl.store(out + col, tl.where(valid, x, 0.0))


@triton.jit
def row_offset(row, d1, st0, st1):
    """The element offset of row ``row``'s first element (see :func:`row_ptr`)."""
    return (row // d1) * st0 + (row % d1) * st1


@triton.jit
def grid_lead(off, ALIGN: tl.constexpr):
    """The streaming grid's lead of a row whose first element is at offset ``off``.

    With ``ALIGN`` (rows whose starts are not 16-byte aligned, e.g. V = 50257) a row is
    streamed on a grid whose column c' is the row's column c' - lead, lead = off mod SLOT
    moving the row's start back to a 16-byte boundary, so that the grid's blocks that lie
    inside the row load (and store) 128 bits unmasked; block 0 masks the lead columns.
    Without it the grid is the row (lead 0). int32: the column arithmetic stays 32-bit.
    """
    if ALIGN:
        lead = (off % SLOT).to(tl.int32)
    else:
        lead = 0
    return lead


@triton.jit
def on_grid(X, off, lead, ALIGN: tl.constexpr, HINT: tl.constexpr):
    """The row of ``X`` at offset ``off`` on the streaming grid (:func:`grid_lead`): ``X + off
    - lead`` with ``ALIGN``, else ``X + off``. ``HINT``: the caller knows ``off - lead`` to be
    a multiple of SLOT (the tensor's rows share the student's shift, its base 16-byte
    aligned), and says so, so that the unmasked blocks vectorize."""
    if ALIGN:
        if HINT:
            base = X + tl.multiple_of(off - lead, SLOT)
        else:
            base = X + (off - lead)
    else:
        base = X + off
    return base


@triton.jit
def bwd_span(lead, n_cols, V, BLOCKS: tl.constexpr, BLOCK_V: tl.constexpr):
    """The grid columns of backward program (row, j), which writes blocks j BLOCKS ..
    (j + 1) BLOCKS - 1 of a row whose grid columns [lead, lead + n_cols) are its (n_cols = 0
    for a masked row): (lo, hi), all its blocks, and (in_lo, in_hi), those that lie inside
    the row (unmasked loads and stores; the others mask on [lead, lead + n_cols) and store
    on [lead, lead + V)). Every bound but hi is a multiple of BLOCK_V."""
    lo = tl.program_id(1) * (BLOCKS * BLOCK_V)
    hi = tl.minimum(lo + BLOCKS * BLOCK_V, V + lead)
    in_lo = tl.maximum(lo, tl.cdiv(lead, BLOCK_V) * BLOCK_V)
    # (n_cols + lead <= V + lead, so hi's clamp to the row is implied; left out, the bounds
    # stay multiples of BLOCK_V where V + lead is odd, and the loads and stores vectorize)
    in_hi = tl.maximum(tl.minimum(lo + BLOCKS * BLOCK_V, ((n_cols + lead) // BLOCK_V) * BLOCK_V),
                       in_lo)
    return lo, hi, in_lo, in_hi


@triton.jit
def store_span(grid, cols, lead, V, x):
    """Store a block ``x`` of a row's gradient at grid columns ``cols``, masked to the row's
    columns [lead, lead + V)."""
    tl.store(grid + cols, x.to(grid.dtype.element_ty), mask=(cols >= lead) & (cols < V + lead))


@triton.jit
def load_span(row, cols, lo, hi, stv, STRIDED_V: tl.constexpr):
    """Raw logits at ``cols`` (any shape) as float32, -inf outside columns [lo, hi)."""
    if STRIDED_V:
        ptrs = row + cols.to(tl.int64) * stv
    else:
        ptrs = row + cols
    return tl.load(ptrs, mask=(cols >= lo) & (cols < hi), other=float("-inf")).to(tl.float32)


@triton.jit
def row_token(TOK, row, V, ignore_index):
    """The row's sampled token, whether the row counts, and whether the id is in [0, V)."""
    y = tl.load(TOK + row).to(tl.int64)
    return y, y != ignore_index, (y >= 0) & (y < V)


@triton.jit
def load_block(row, cols, stv, n, STRIDED_V: tl.constexpr):
    """Raw logits at ``cols`` (any shape) as float32, -inf at and past column ``n``."""
    if STRIDED_V:
        ptrs = row + cols.to(tl.int64) * stv
    else:
        ptrs = row + cols
    return tl.load(ptrs, mask=cols < n, other=float("-inf")).to(tl.float32)


@triton.jit
def load_full(row, cols, stv, STRIDED_V: tl.constexpr):
    """Raw logits of a block that lies inside the row: no mask."""
    if STRIDED_V:
        ptrs = row + cols.to(tl.int64) * stv
    else:
        ptrs = row + cols
    return tl.load(ptrs).to(tl.float32)


@triton.jit
def _unpack_bf16(w):
    """Two bfloat16 logits packed in an int32 word as float32 (low, high): one shift and
    one mask, where a conversion of the bfloat16 values would take a byte permute and a
    shift for the high one."""
    return (w << 16).to(tl.float32, bitcast=True), (w & -65536).to(tl.float32, bitcast=True)


@triton.jit
def load_pairs(row, start, BLOCK_V: tl.constexpr):
    """The bfloat16 logits of columns [start, start + BLOCK_V) of a block inside the row, read
    as int32 pairs (``row`` 4-byte aligned, ``start`` even), as float32."""
    w = tl.load(row.to(tl.pointer_type(tl.int32)) + start // 2 + tl.arange(0, BLOCK_V // 2))
    lo, hi = _unpack_bf16(w)
    return tl.reshape(tl.join(lo, hi), [BLOCK_V])


@triton.jit
def load_pairs_tile(row, start, BLOCK_V: tl.constexpr):
    """:func:`load_pairs` as the [BLOCK_V // SLOT, SLOT] tile of :func:`tile`."""
    pr = tl.arange(0, BLOCK_V // SLOT)[:, None] * (SLOT // 2) + tl.arange(0, SLOT // 2)[None, :]
    w = tl.load(row.to(tl.pointer_type(tl.int32)) + start // 2 + pr)
    lo, hi = _unpack_bf16(w)
    return tl.reshape(tl.join(lo, hi), [BLOCK_V // SLOT, SLOT])


@triton.jit
def load_inside(row, start, cols, stv, STRIDED_V: tl.constexpr, PAIRS: tl.constexpr,
                BLOCK_V: tl.constexpr):
    """A block inside the row (no mask) at ``cols = start + offsets`` (1-D, or the tile):
    in int32 pairs where ``PAIRS`` (bfloat16 rows whose grid starts are 4-byte aligned)."""
    if PAIRS:
        if len(cols.shape) == 2:
            x = load_pairs_tile(row, start, BLOCK_V)
        else:
            x = load_pairs(row, start, BLOCK_V)
    else:
        x = load_full(row, cols, stv, STRIDED_V)
    return x


@triton.jit
def tile(BLOCK_V: tl.constexpr):
    """Column offsets of one block as a [BLOCK_V // SLOT, SLOT] tile (row-major)."""
    return tl.arange(0, BLOCK_V // SLOT)[:, None] * SLOT + tl.arange(0, SLOT)[None, :]


@triton.jit
def join_halves(a, b):
    """Two [R, SLOT] tiles as one [R, 2 SLOT] tile: slot r holds slot r of both."""
    return tl.reshape(tl.join(a, b), [a.shape[0], 2 * SLOT])


@triton.jit
def tile2(BLOCK_V: tl.constexpr):
    """Column offsets of one block as a [BLOCK_V // (2 SLOT), 2 SLOT] tile: slot r holds
    the r-th SLOT columns of each half of the block (each thread loads two 128-bit vectors
    of bfloat16 and keeps one slot, so a slot's sums are rescaled once per 2 SLOT logits)."""
    h = tile(BLOCK_V // 2)
    return join_halves(h, h + BLOCK_V // 2)


@triton.jit
def load_inside2(row, start, stv, STRIDED_V: tl.constexpr, PAIRS: tl.constexpr,
                 BLOCK_V: tl.constexpr):
    """:func:`load_inside` of a block inside the row, as the tile of :func:`tile2`."""
    h = start + tile(BLOCK_V // 2)
    return join_halves(load_inside(row, start, h, stv, STRIDED_V, PAIRS, BLOCK_V // 2),
                       load_inside(row, start + BLOCK_V // 2, h + BLOCK_V // 2, stv, STRIDED_V,
                                   PAIRS, BLOCK_V // 2))


@triton.jit
def load_span2(row, start, lo, hi, stv, STRIDED_V: tl.constexpr, BLOCK_V: tl.constexpr):
    """:func:`load_span` of the block at ``start`` as the tile of :func:`tile2` (two loads
    of half tiles, so that each keeps the layout of a 128-bit load)."""
    h = start + tile(BLOCK_V // 2)
    return join_halves(load_span(row, h, lo, hi, stv, STRIDED_V),
                       load_span(row, h + BLOCK_V // 2, lo, hi, stv, STRIDED_V))


@triton.jit
def slot_state(BLOCK_V: tl.constexpr, value):
    """A per-slot vector of ``value``."""
    return tl.full([BLOCK_V // SLOT], value, tl.float32)


@triton.jit
def online(raw, m, z, scale2):
    """Fold a 1-D block of raw logits into (raw running max, sum 2^((raw - max) scale2))."""
    nm = tl.maximum(m, tl.max(raw, 0))
    r = tl.where(nm == float("-inf"), 0.0, nm)
    z = z * tl.exp2(tl.where(m == float("-inf"), 0.0, (m - r) * scale2)) \
        + tl.sum(tl.exp2((raw - r) * scale2), 0)
    return nm, z


@triton.jit
def frame_units(raw, f, scale, FORM: tl.constexpr):
    """A raw logit (or a maximum) in the units of a frame ``f``: ``(raw - f) scale``.

    ``FORM`` says how it is formed:

    - ``DIFF``: ``(raw - f) scale``, exact up to one rounding of the result;
    - ``FMA``: in one instruction, ``fma(raw, scale, -(f scale))``, one rounding of the
      exact ``raw scale - round(f scale)``. The value differs from ``(raw - f) scale`` by
      the rounding of ``f scale``, a shift common to every logit of the row, of up to
      2^-24 |f scale|. A kernel that forms its elements, its slots' maxima and its row's
      maximum in the same form sees the shift cancel from every probability and every
      expectation against ``-(C + log2 Z)``. The shift is absolute: a row whose frame is
      large (:func:`fma_frames`) would carry it at the size of its logits' differences;
    - ``ROW``: the row's choice between the two, ``f = (g, G)`` from :func:`row_frame`,
      formed as ``fma(raw - g, scale, -G)``: the bits of ``FMA`` (g = 0, G = f scale) or of
      ``DIFF`` (g = f, G = 0), one instruction more than ``FMA``.

    A backward that forms them as its forward did gets the forward's bits. -inf, +inf and
    NaN map to themselves in every form.
    """
    if FORM == ROW:
        g, G = f
        u = tl.fma(raw - g, scale, -G)
    elif FORM == FMA:
        u = tl.fma(raw, scale, -(f * scale))
    else:
        u = (raw - f) * scale
    return u


@triton.jit
def fma_frames(f_s, f_t, scale2, tscale2):
    """Whether a row with frames ``f_s`` and ``f_t`` takes ``FMA`` frame units: while both
    |f scale| < 2^20, the shift of that form stays below 2^-5 base-2 units, so a logit's
    frame units carry an absolute rounding of at most 2^-29 where they are near 0 (and
    their relative one elsewhere), as does the bridge that mixes both models' units. A
    frame of -1e15 (a model that holds its row near a huge constant) would carry a shift of
    up to 10^8 units, and one of -3e38 overflows: such rows take ``DIFF``, exact there (as
    do rows with an infinite or NaN frame, whatever their values)."""
    return (tl.abs(f_s * scale2) < FMA_LIMIT) & (tl.abs(f_t * tscale2) < FMA_LIMIT)


@triton.jit
def row_frame(f, scale, fma):
    """The frame ``(g, G)`` of ``ROW`` frame units: ``FMA``'s where ``fma`` (a row scalar),
    ``DIFF``'s elsewhere (:func:`frame_units`)."""
    return tl.where(fma, 0.0, f), tl.where(fma, f * scale, 0.0)


@triton.jit
def slot_ref(m, raw, f, scale, GUARD: tl.constexpr, FORM: tl.constexpr = DIFF):
    """Move each slot's raw running max ``m`` over a tile ``raw``.

    Returns the new max, its value in frame units ``c`` (:func:`frame_units` in the form
    ``FORM`` that the caller's elements take: the exponent of an element is its frame units
    minus c, 0 at the max) and the factor that rescales the slot's old sums. With ``GUARD``
    an empty slot (max -inf) has c = the frame units of 0, its sums 0. Without it an old
    max of -inf still gives the factor 0 (2^-inf), but a slot still empty after the tile
    has c = -inf, and its exponents (-inf - -inf) are NaN: a tile that is -inf in a whole
    slot shows as a NaN.
    """
    nm = tl.maximum(m, tl.max(raw, 1))
    if GUARD:
        # (c is also that of 0 where the max's frame units overflow to -inf: -3e38 against
        # a frame of ordinary logits, so that its elements give 2^-inf = 0, not NaN)
        c = frame_units(tl.where(nm == float("-inf"), 0.0, nm), f, scale, FORM)
        c = tl.where(c == float("-inf"), frame_units(0.0, f, scale, FORM), c)
        al = tl.exp2(tl.where(m == float("-inf"), 0.0, frame_units(m, f, scale, FORM) - c))
    else:
        c = frame_units(nm, f, scale, FORM)
        al = tl.exp2(frame_units(m, f, scale, FORM) - c)
    return nm, c, al


@triton.jit
def fold_lse(st, raw, xf, f, scale, GUARD: tl.constexpr, FORM: tl.constexpr = DIFF):
    """The online fold of one model, parametrized by its scale: st = (raw max, sum 2^(xf - c))
    per slot, where ``xf`` is the tile in frame units (:func:`frame_units` in the form
    ``FORM``; ``GUARD``: see :func:`slot_ref`)."""
    m, z = st
    nm, c, al = slot_ref(m, raw, f, scale, GUARD, FORM)
    return nm, z * al + tl.sum(tl.exp2(xf - c[:, None]), 1)


@triton.jit
def combine_lse(st, f, scale, FORM: tl.constexpr = DIFF):
    """Across slots: the row's (raw max, sum 2^(xf - C)) and each slot's weight 2^(c - C)
    (frame units in the form ``FORM``)."""
    m, z = st
    M = tl.max(m, 0)
    C = frame_units(tl.where(M == float("-inf"), 0.0, M), f, scale, FORM)
    c = frame_units(tl.where(m == float("-inf"), 0.0, m), f, scale, FORM)
    w = tl.where(m == float("-inf"), 0.0, tl.exp2(c - C))
    return M, tl.sum(z * w, 0), w


@triton.jit
def fold_bridge(st, x, sf, FKL: tl.constexpr, GUARD: tl.constexpr):
    """Fold a tile of bridge values x (frame units, -inf off the support) into the per-slot
    st = (max x, sum 2^(x - max), and for forward KL sum 2^(x - max) (x - max) and
    sum 2^(x - max) sf)."""
    m, z, ax, a_s = st
    nm = tl.maximum(m, tl.max(x, 1))
    if GUARD:
        ref = tl.where(nm == float("-inf"), 0.0, nm)
    else:  # a slot still empty after the tile: NaN exponents (see slot_ref)
        ref = nm
    if GUARD or FKL:  # forward KL multiplies dm by the old sum (0 in an empty slot)
        dm = tl.where(m == float("-inf"), 0.0, m - ref)
    else:
        dm = m - ref  # -inf in an empty slot: the factor 2^dm is 0
    al = tl.exp2(dm)
    xr = x - ref[:, None]
    e = tl.exp2(xr)
    if FKL:
        if GUARD:
            sx = tl.sum(tl.where(e == 0.0, 0.0, e * xr), 1)
            ss = tl.sum(tl.where(e == 0.0, 0.0, e * sf), 1)
        else:
            sx = tl.sum(e * xr, 1)
            ss = tl.sum(e * sf, 1)
        if GUARD:  # (sums whose factor is 0 drop out, even where they overflowed)
            ax = tl.where(al == 0.0, 0.0, (ax + dm * z) * al) + sx
            a_s = tl.where(al == 0.0, 0.0, a_s * al) + ss
        else:
            ax = (ax + dm * z) * al + sx
            a_s = a_s * al + ss
    return nm, z * al + tl.sum(e, 1), ax, a_s


@triton.jit
def combine_bridge(st, FKL: tl.constexpr):
    """Across slots: the row's (max x, sum 2^(x - max), and the forward-KL sums). A slot of
    weight 0 adds nothing: its sums may have overflowed (16 logits of -3e38 in a row whose
    mass lies elsewhere: 2^0 sf, summed against the slot's own maximum, is -inf there)."""
    m, z, ax, a_s = st
    M = tl.max(m, 0)
    ref = tl.where(M == float("-inf"), 0.0, M)
    dm = tl.where(m == float("-inf"), 0.0, m - ref)
    w = tl.exp2(dm)
    Z = tl.sum(z * w, 0)
    if FKL:
        AX = tl.sum(tl.where(w == 0.0, 0.0, (ax + dm * z) * w), 0)
        AS = tl.sum(tl.where(w == 0.0, 0.0, a_s * w), 0)
    else:
        AX = Z * 0.0
        AS = Z * 0.0
    return M, Z, AX, AS


@triton.jit
def bridge(tf, sf, a, b, support):
    """x = a (t - f_t) + b (s - f_s) with a pinned rounding: forward and backward agree bitwise."""
    return tl.where(support, tl.fma(a, tf, b * sf), float("-inf"))


@triton.jit
def any_nan(v):
    """Whether a per-slot vector holds a NaN (one reduction)."""
    s = tl.sum(v, 0)
    return s != s
