"""Kernels shared by the rules, the attacks and the round: presence masks, masked products,
row norms, pairwise distances, exact order statistics.

Speed comparisons below (one way of writing a kernel against another) were measured on
XLA:CPU at the sizes ``bench/aggregators.py`` times (n = 1000, d = 1e5); the figures it
records for the kernels as they are written are in ``bench/results/aggregators*.json``. No
results file records the alternatives, so the text says which was faster, not by how much.

Order statistics use an exact radix select instead of a sort. Each float32 is mapped to a
``uint32`` key whose unsigned order is the float order (NaN and absent rows map to the
largest key, so they sort last). The k-th smallest key of a column is then found bit by
bit, most significant first: 32 passes, each a compare-and-count over the rows, done as
two 16-bit halves (``select_keys``) with the counts added as trees of row slices (see
``row_layout``). Columns are processed in blocks (``lax.fori_loop`` over column blocks)
so one block of the ``[n, d]`` matrix stays in cache during its passes. Ranks may be
traced (they depend on the number of present clients), which a static ``lax.top_k``
could not offer. Up to ``FEW_ROWS`` rows (a peer-to-peer neighbourhood: its rule is
vmapped over the nodes) each row's rank is counted by comparing it with every other row
instead (``select_few``), and the two middle values are picked by a sorting network pruned
to them (``middle_keys_few``).

Conventions shared by the coordinate-wise rules (median, trimmed mean, MeaMed, Bulyan):
values are compared as floats (``-0.0 == 0.0``); a value tied with others at a selected
rank shares that rank's share equally among the tied clients, so results and per-client
weights do not depend on row order.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from fedsim.registry import ConfigError

BLOCK_ENTRIES = 1 << 20  # ``block_width``'s default: the order statistics' blocks off the CPU
# numpy scalars: a jnp constant here would start the device backend at import
_TOP = np.uint32(0xFFFFFFFF)
_TOP16 = np.uint16(0xFFFF)
UNROLL = 1  # radix passes per loop iteration (bigger: faster run, slower compile)


def check(ok: bool, message: str) -> None:
    """Raise a one-line ``ConfigError`` when a static setting is invalid."""
    if not ok:
        raise ConfigError(message)


def present_mask(weights: jax.Array) -> jax.Array:
    """``[n]`` bool: rows whose weight is positive (absent rows have weight 0)."""
    return weights > 0


# A node's neighbourhood (peer-to-peer, vmapped over nodes) has few rows: there a product
# with a handful of rows becomes a batched matrix-vector product XLA:CPU runs far slower
# than the elementwise form, which fuses into one pass (bench/peer.py measures it), and an
# order statistic counts pairs (``select_few``) or runs a selection network
# (``middle_keys_few``) instead of 32 radix passes.
FEW_ROWS = 32


def finite_rows(updates: jax.Array) -> jax.Array:
    """``[n]`` bool: rows with only finite entries.

    A product with a zero vector is NaN exactly where a row holds a NaN or an infinity
    (0 * inf = NaN) and cannot overflow; as a matrix-vector product it reads the rows
    once, faster on XLA:CPU than reducing an ``isfinite`` mask over each row.
    """
    if updates.shape[0] <= FEW_ROWS:
        return jnp.all(jnp.isfinite(updates), axis=1)
    return jnp.isfinite(dot(updates, jnp.zeros(updates.shape[1], updates.dtype)))


def dot(a: jax.Array, b: jax.Array) -> jax.Array:
    """Matrix product in full float32. GPUs would otherwise run float32 products as TF32
    (10-bit mantissa): too coarse for Gram-matrix distances, exact aggregation weights and
    the tight constraints the attacks solve. Memory-bound products lose no speed."""
    return jnp.matmul(a, b, precision=lax.Precision.HIGHEST)


# --- passes over all of [n, d] ------------------------------------------------------------
#
# On XLA:CPU an ``[n, d]`` intermediate that does not fit in cache costs far more than the
# pass itself: ``dot(c, where(keep[:, None], x, 0))`` writes the masked copy to fresh memory
# (several times the cost of a plain ``dot(c, x)`` at n=1000, d=1e5), and
# ``sum(x * x, axis=1)`` writes the product. The kernels below keep such intermediates to
# one column block at a time.

PASS_ENTRIES = 1 << 22  # entries per column block of a masked product (16 MB of float32)
NORM_ENTRIES = 1 << 20  # entries per column block of the row norms (measured best at 1e8)
GRAM_ENTRIES = 1 << 23  # entries per column chunk of a Gram matrix (8192 columns at n=1000)


def combine(coef: jax.Array, x: jax.Array, keep: jax.Array, finite=None) -> jax.Array:
    """``coef @ x`` over the rows where ``keep``: ``coef [n]`` or ``[r, n]``, ``x [n, d]``,
    ``keep [n]`` bool. Other rows count as 0 even when they hold NaN or Inf (which would
    poison a plain product: 0 * NaN = NaN).

    When every row is kept or known finite (``finite [n]`` bool, optional) the plain
    product is exact and runs; otherwise the masking is done one column block at a time.
    Under ``vmap`` with a batched condition both branches run (still cheaper than masking
    the whole matrix).
    """
    coef = jnp.where(keep, coef, 0).astype(x.dtype)
    if x.shape[0] <= FEW_ROWS:
        return jnp.sum(coef[..., :, None] * jnp.where(keep[:, None], x, 0), axis=-2)
    safe = keep if finite is None else keep | finite
    width = block_width(x.shape[0], PASS_ENTRIES, 256, x.shape[1])

    def masked():
        rows = coef.reshape(-1, coef.shape[-1])  # [r, n]
        out, _ = by_column_blocks(
            lambda xb, fresh: (dot(rows, jnp.where(keep[:, None], xb, 0)), jnp.zeros(xb.shape[0])),
            x,
            rows.shape[0],
            width,
        )
        return out.reshape(coef.shape[:-1] + x.shape[1:])

    return lax.cond(jnp.all(safe), lambda: dot(coef, x), masked)


def row_sq_norms(x: jax.Array, center: jax.Array | None = None) -> jax.Array:
    """``[n]`` squared L2 norms of the rows of ``x [n, d]`` (of ``x - center [d]`` when
    given; NaN or Inf for a row holding one), summed over column blocks: faster on XLA:CPU
    than ``sum(x * x, axis=1)``, and exact where ``|x|² - 2 x·c + |c|²`` would cancel for
    rows close to ``center``.

    Around a center (called once per iteration by the geometric median and centred
    clipping) each block's squared differences are summed by a matrix-vector product
    with ones, faster than the row reduction at n=1000, d=1e5 (the columns a block covers
    again are zeroed first: ``inf * 0`` would be NaN). Without one, the row reduction
    measured as fast or faster."""
    n, d = x.shape
    if n <= FEW_ROWS:  # a neighbourhood: one fused pass (see FEW_ROWS)
        diff = x if center is None else x - center[None]
        return jnp.sum(diff * diff, axis=1)

    def fn(xb, fresh, *center_block):
        if center_block:
            diff = jnp.where(fresh[None], xb - center_block[0][None], 0)
            return jnp.zeros((0, xb.shape[1]), x.dtype), dot(
                diff * diff, jnp.ones_like(fresh, x.dtype)
            )
        return jnp.zeros((0, xb.shape[1]), x.dtype), jnp.sum(jnp.where(fresh, xb * xb, 0), 1)

    columns = () if center is None else (center,)
    width = block_width(n, NORM_ENTRIES, 256, d)
    return by_column_blocks(fn, x, 0, width, *columns)[1]


def safe_div(a, b):
    """``a / b`` where ``b != 0``, else 0."""
    return jnp.where(b != 0, a / jnp.where(b != 0, b, 1), 0)


def pairwise_sq_dists(updates: jax.Array, ok: jax.Array) -> jax.Array:
    """``[n, n]`` squared L2 distances from one Gram matrix (``self_gram``), clamped at 0.

    Rows where ``ok`` is False (absent or non-finite) are infinitely far from every row,
    themselves included, and ``d(i, i) = 0`` exactly for the others. They are masked after
    the product rather than zeroed before it (a pass over ``[n, d]``): entry ``(i, j)`` of
    the Gram matrix only reads rows ``i`` and ``j``, so a NaN row spoils only its own row
    and column, which the mask replaces. ``gram_sq_dists`` is the attacks' form (see there
    for why there are two).
    """
    dist = _sq_dists(self_gram(updates))
    both = ok[:, None] & ok[None, :]
    dist = jnp.where(both, dist, jnp.inf)
    return dist.at[jnp.diag_indices_from(dist)].set(jnp.where(ok, 0.0, jnp.inf))


def gram_sq_dists(x: jax.Array) -> jax.Array:
    """``[n, n]`` squared L2 distances of all rows of ``x`` from one plain Gram product
    ``x @ x.T``, clamped at 0, unmasked, the diagonal as computed. The Gram trick loses
    precision for rows far from the origin compared with their spread: the attacks, which
    call this one, centre their pool first (distances do not change) and mask it after.

    Why two: ``pairwise_sq_dists`` (the rules) builds the Gram matrix by blocks from 512
    rows on, summing column chunks in another order, which moves the last bits of the
    distances at large n and d; the attacks' numbers stay what they were, bit for bit.
    """
    return _sq_dists(dot(x, x.T))


def _sq_dists(gram: jax.Array) -> jax.Array:
    sq = jnp.diagonal(gram)  # the squared norms, free
    return jnp.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0)


def self_gram(x: jax.Array, parts: int = 4, min_rows: int = 512) -> jax.Array:
    """``x @ x.T``, computing only the blocks on and above the diagonal.

    XLA's CPU matmul has no symmetric (syrk) path; with ``x`` cut into ``parts`` row blocks
    the ``parts (parts + 1) / 2`` products do 5/8 of the work for 4 parts, and the blocks
    stay large enough to run at full matmul speed. The columns are taken in chunks of about
    ``GRAM_ENTRIES`` entries (a loop summing the chunks' Gram matrices): over the whole
    length XLA's product ran slower at n=1000, d=1e5. Below ``min_rows`` rows one plain
    product is faster.
    """
    n, d = x.shape
    if n < min_rows:
        return jnp.matmul(x, x.T, precision=lax.Precision.HIGHEST)
    width = block_width(n, GRAM_ENTRIES, 256, d)
    n_full = d // width

    def body(j, acc):
        return acc + _upper_gram(lax.dynamic_slice_in_dim(x, j * width, width, axis=1), parts)

    gram = lax.fori_loop(0, n_full, body, jnp.zeros((n, n), x.dtype))
    if d > n_full * width:
        gram = gram + _upper_gram(x[:, n_full * width :], parts)
    return gram


def _upper_gram(x: jax.Array, parts: int) -> jax.Array:
    n = x.shape[0]
    size = -(-n // parts)
    rows = [x[i : i + size] for i in range(0, n, size)]
    grid = [[None] * len(rows) for _ in rows]
    for i, a in enumerate(rows):
        for j in range(i, len(rows)):
            grid[i][j] = jnp.matmul(a, rows[j].T, precision=lax.Precision.HIGHEST)
            grid[j][i] = grid[i][j].T
    return jnp.block(grid)


def sum_smallest(values: jax.Array, k: jax.Array) -> jax.Array:
    """Per row, the sum of the ``k`` (traced integer, >= 1) smallest entries of
    ``values [n, m]`` (the rules' ``[n, n]`` distance matrices).

    With ``t`` the k-th smallest (a radix select, faster than sorting at n = 1000), the
    sum is that of the entries below ``t`` plus ``t`` for each place left, which at most
    k - 1 entries below ``t`` leave at least one of, so an infinite ``t`` gives inf.
    ``sum_smallest_by_sort`` is the other contract (see there).
    """
    cols = values.T
    (cut,) = select(cols, jnp.ones(cols.shape[0], bool), jnp.reshape(k - 1, (1,)))
    below = cols < cut[None]
    left = (k - jnp.sum(below, axis=0)).astype(values.dtype)
    return jnp.sum(jnp.where(below, cols, 0), axis=0) + left * cut


def sum_smallest_by_sort(values: jax.Array, k) -> jax.Array:
    """Sum of the ``k`` smallest entries along the last axis (``+inf`` entries pad), where
    ``k`` (traced) may be a float, zero or negative: the sum of the entries whose 0-based
    place in sorted order is below ``k`` (nothing for ``k <= 0``).

    Why two: the attacks' Krum acceptance test needs a real-valued ``k`` that may drop to
    0 or below (a crafted row's neighbours among its own copies), which the radix select
    of ``sum_smallest`` (an integer rank >= 1) cannot take; and the two sum in different
    orders, so merging them would change results in their last bits. The attacks call this
    one on small ``[K, n]`` arrays, where a sort costs little.
    """
    s = jnp.sort(values, axis=-1)
    take = jnp.arange(values.shape[-1]) < k
    return jnp.sum(jnp.where(take, s, 0.0), axis=-1)


def ranks(scores: jax.Array) -> jax.Array:
    """``[n]`` int: position of each score in ascending order (ties by index)."""
    order = jnp.argsort(scores, stable=True)
    return jnp.zeros_like(order).at[order].set(jnp.arange(scores.shape[0]))


# --- reductions over rows of an in-cache block ---------------------------------------------
#
# XLA's CPU backend lowers a reduction over a non-minor axis (``sum(mask, axis=0)`` of an
# ``[n, B]`` block) through a windowed pre-reduction that materialises its input and runs
# scalar code. Comparing row slices and adding them as a tree of elementwise ops is one
# vectorised loop fusion instead: faster in the select's passes, and faster for the
# trimmed mean's column sums. (Not everywhere: the median's few sums were slower as trees,
# so each use was measured.)


def row_layout(n: int) -> tuple[int, int]:
    """``(groups, inner)`` with ``groups * inner >= n`` and little padding.

    Rows are reduced in two levels: ``groups`` slices of ``inner`` rows are combined first
    (their partial counts fit in int8 when ``groups <= 127``), then the ``inner`` rows left.
    ``inner`` lies in ``[w/2, w]`` for ``w = max(20, 2 sqrt(n))`` (measured best at 100 and
    1,000 rows), so neither level grows into a graph of thousands of slices.
    """
    widest = min(n, max(20, 2 * math.isqrt(n)))
    best = None
    for inner in range(widest, (widest + 1) // 2 - 1, -1):
        groups = -(-n // inner)
        waste = groups * inner - n
        if best is None or waste < best[0]:
            best = (waste, groups, inner)
    return best[1], best[2]


def _tree(op: Callable, parts: list) -> jax.Array:
    while len(parts) > 1:
        pairs = [op(a, b) for a, b in zip(parts[::2], parts[1::2], strict=False)]
        parts = pairs + ([parts[-1]] if len(parts) % 2 else [])
    return parts[0]


def _pad_rows(x: jax.Array, rows: int, value) -> jax.Array:
    pad = rows - x.shape[-2]
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[-2] = (0, pad)
    return jnp.pad(x, widths, constant_values=jnp.asarray(value, x.dtype))


def fold_rows(fn: Callable, x: jax.Array, present: jax.Array) -> tuple[jax.Array, ...]:
    """Per column, the sums over rows of ``fn(x_rows, present_rows)``'s outputs.

    ``x [n, B]``, ``present [n]`` bool; ``fn`` maps a slice ``[inner, B]`` (and its
    ``[inner, 1]`` presence) to a tuple of ``[inner, B]`` arrays, bool or float. Returns a
    tuple of float ``[B]`` sums (counts are exact below 2^24). Padding rows are absent.
    """
    n, width = x.shape
    groups, inner = row_layout(n)
    xs = _pad_rows(x, groups * inner, 0).reshape(groups, inner, width)
    ps = _pad_rows(present[:, None], groups * inner, False).reshape(groups, inner, 1)
    parts = [[v.astype(x.dtype) for v in fn(xs[g], ps[g])] for g in range(groups)]
    partial = [_tree(jnp.add, list(col)) for col in zip(*parts, strict=True)]
    return tuple(_tree(jnp.add, [p[i] for i in range(inner)]) for p in partial)


# --- radix select -------------------------------------------------------------------------


def to_keys(x: jax.Array, present: jax.Array) -> jax.Array:
    """Order-preserving ``uint32`` view of float32 ``x``; NaN and absent rows -> max key."""
    x = jnp.where(x == 0, jnp.zeros_like(x), x)  # one key for -0.0 and 0.0
    bits = lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    keys = jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(0x80000000))
    return jnp.where(jnp.isnan(x) | ~present[:, None], _TOP, keys)


def from_keys(keys: jax.Array) -> jax.Array:
    """Inverse of ``to_keys`` (the max key decodes to NaN)."""
    bits = jnp.where(keys >> 31 == 1, keys & jnp.uint32(0x7FFFFFFF), ~keys)
    return lax.bitcast_convert_type(bits, jnp.float32)


def _digit_search(digits: jax.Array, need: jax.Array, bits: int) -> jax.Array:
    """``[r, B]``: per rank and column, the smallest ``t`` with ``count(digits <= t) >=
    need``, found bit by bit. ``digits [r or 1, groups, inner, B]`` unsigned, ``need
    [r, 1]``."""
    dtype = digits.dtype
    groups = digits.shape[1]
    narrow_type = jnp.int8 if groups <= 127 else jnp.int16 if groups <= 32767 else jnp.int32
    found = jnp.zeros((need.shape[0], digits.shape[-1]), dtype)

    def narrow(i, found):
        bit = jnp.left_shift(jnp.asarray(1, dtype), (bits - 1 - i).astype(dtype))
        below = (found | (bit - 1))[:, None, :]
        # compare slice by slice: comparing first and slicing the mask after was slower
        # (XLA materialises the mask)
        hits = [(digits[:, g] <= below).astype(narrow_type) for g in range(groups)]
        partial = _tree(jnp.add, hits)
        count = _tree(jnp.add, [partial[:, j].astype(need.dtype) for j in range(partial.shape[1])])
        return jnp.where(count >= need, found, found | bit)

    return lax.fori_loop(0, bits, narrow, found, unroll=UNROLL)


def select_keys(keys: jax.Array, rank: jax.Array) -> jax.Array:
    """``[r, B]`` keys of the ``rank[j]``-th smallest (0-based) in each column of ``keys``.

    ``keys [n, B]`` uint32, ``rank [r]`` int (traced). The answer is the smallest key ``v``
    with ``count(keys <= v) > rank``, built bit by bit in two 16-bit halves (half the bytes
    per pass, twice the lanes per compare):

    1. the high half ``P`` of the answer, from the keys' high halves;
    2. the low half, from each key's low half with keys below ``P``'s range mapped to 0
       (always counted) and keys above it to 0xFFFF. Those are counted only at the
       all-ones candidate, which step 1 already showed has enough keys below it, so no
       decision changes.

    Rows are padded with the max key, which likewise never changes a decision.

    With at most ``FEW_ROWS`` rows (a peer-to-peer neighbourhood) the answer is found by
    counting instead (``select_few``): fewer compares than 32 passes over so few rows.
    """
    n, width = keys.shape
    if n <= FEW_ROWS:
        return select_few(keys, rank)
    groups, inner = row_layout(n)
    keys = _pad_rows(keys, groups * inner, _TOP).reshape(groups, inner, width)
    need = rank.astype(jnp.int16 if n <= 32767 else jnp.int32)[:, None] + 1
    high = (keys >> 16).astype(jnp.uint16)
    top = _digit_search(high[None], need, 16)[:, None, None, :]
    low = (keys & 0xFFFF).astype(jnp.uint16)[None]
    low = jnp.where(high[None] < top, jnp.uint16(0), jnp.where(high[None] > top, _TOP16, low))
    bottom = _digit_search(low, need, 16)
    return (top[:, 0, 0].astype(jnp.uint32) << 16) | bottom.astype(jnp.uint32)


def select_few(keys: jax.Array, rank: jax.Array) -> jax.Array:
    """``select_keys`` for few rows: the smallest key ``v`` among the rows with
    ``count(keys <= v) > rank``, counting each row's ``<=`` by comparing it with every row.

    ``keys [n, B]``, ``rank [r]``; ``n²`` compares per column. A loop over the candidate
    rows: its result is materialised once, where XLA:CPU would otherwise fuse all ``n²``
    compares into every consumer of the answer (an optimization barrier does not stop it).
    """
    n, width = keys.shape
    rows = [keys[j] for j in range(n)]

    def pick(i, best):
        row = lax.dynamic_index_in_dim(keys, i, keepdims=False)
        count = _tree(jnp.add, [(r <= row).astype(jnp.int32) for r in rows])
        return jnp.minimum(best, jnp.where(count[None] > rank[:, None], row[None], _TOP))

    return lax.fori_loop(0, n, pick, jnp.full((rank.shape[0], width), _TOP))


def select(x: jax.Array, present: jax.Array, rank: jax.Array) -> jax.Array:
    """``[r, d]`` float32: the ``rank``-th smallest present value of each column of ``x [n,
    d]``, ``rank [r]``.

    Wider than ``select_width(n)`` columns, one block of that width at a time, so each
    block stays in cache through its 32 passes (the attacks select over a whole ``[n, d]``
    pool; ``bench/select_width.py`` times both ways).
    """
    x = x.astype(jnp.float32)
    n, d = x.shape
    width = select_width(n)
    if d <= width or not _on_cpu():  # a GPU pass over the whole matrix is one wide kernel
        return from_keys(select_keys(to_keys(x, present), rank))
    zeros = jnp.zeros((n,), x.dtype)
    block = lambda xb, fresh: (select(xb, present, rank), zeros)
    return by_column_blocks(block, x, rank.shape[0], width)[0]


def block_width(
    n: int, entries: int = BLOCK_ENTRIES, narrowest: int = 64, widest: int = 8192
) -> int:
    """Columns per block for ``n`` rows: about ``entries`` entries, a power of two in
    ``[narrowest, widest]`` (narrow blocks of few rows spend their time in loop overhead)."""
    pow2 = 1 << round(math.log2(max(entries / max(n, 1), 1)))
    return int(min(widest, max(narrowest, pow2)))


def _on_cpu() -> bool:
    return jax.default_backend() == "cpu"


def select_width(n: int) -> int:
    """Columns per block for the coordinate-wise order statistics of ``n`` rows: on a CPU,
    the power of two nearest ``512 / 2^log10(n)`` (256 at 10-20 rows, 128 at 50-300, 64 at
    1,000-3,000, 32 at 10,000), within ``[16, 8192]``; elsewhere ``block_width(n)`` (2^20
    entries: each pass is one kernel launch on a GPU, where the README's GPU figures were
    measured with these; the narrow CPU widths were not tried there).

    Narrower than ``block_width``'s entry count: each radix pass re-reads the block, and a
    block that stays in the innermost caches gains more than wide blocks save in loop
    iterations. The widths were chosen by ``bench/select_width.py`` (median and trimmed
    mean at 10 to 10,000 rows; ``bench/results/select_width.json``).
    """
    if not _on_cpu():
        return block_width(n)
    return int(min(8192, max(16, 1 << round(9 - math.log10(max(n, 1))))))


def by_column_blocks(
    fn: Callable, x: jax.Array, n_out: int, block: int, *columns: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Apply ``fn(x_block [n, B], fresh [B] bool, *column_blocks) -> (out [n_out, B],
    per_row [n])`` over blocks of ``block`` columns (each caller sizes its own:
    ``block_width`` with its entry count, ``select_width``); each of ``columns`` (``[d]``
    vectors) is sliced like ``x``.

    Returns ``(out [n_out, d], sum of per_row over blocks [n])``. The last block is
    shifted left to fit (``dynamic_slice`` clamps), so some columns are computed twice;
    ``fresh`` marks the columns a block is the first to cover, so that per-row sums count
    each column once.
    """
    n, d = x.shape
    block = min(block, d)
    n_blocks = -(-d // block)

    def body(j, carry):
        out, acc = carry
        start = jnp.minimum(j * block, d - block)
        xb = lax.dynamic_slice_in_dim(x, start, block, axis=1)
        cols = [lax.dynamic_slice_in_dim(c, start, block) for c in columns]
        fresh = start + jnp.arange(block) >= j * block
        ob, rb = fn(xb, fresh, *cols)
        return lax.dynamic_update_slice_in_dim(out, ob.astype(out.dtype), start, 1), acc + rb

    init = (jnp.zeros((n_out, d), x.dtype), jnp.zeros((n,), x.dtype))
    if n_blocks == 1:
        return body(0, init)
    return lax.fori_loop(0, n_blocks, body, init)


# --- coordinate-wise kernels on one block -------------------------------------------------


def tie_share(x, present, value, share):
    """``[n, B]`` weight: ``share [B]`` split equally among present rows equal to value."""
    eq = present[:, None] & (x == value[None])
    count = jnp.sum(eq, axis=0)
    return jnp.where(eq, safe_div(share, count)[None], 0)


def middle_values(x, present, m):
    """``(lo [B], hi [B])``: the present values of ranks ⌊(m-1)/2⌋ and ⌊m/2⌋ per column,
    ``m`` the number of present rows (NaN sorts last, so either may be NaN).

    Few rows: a selection network (``middle_keys_few``). Else one radix select finds the
    lower middle value; the upper one is either the same value (enough copies) or the
    smallest key above it.
    """
    m = jnp.asarray(m)
    keys = to_keys(x, present)
    if x.shape[0] <= FEW_ROWS:
        lo, hi = middle_keys_few(keys, present, m)
        return from_keys(lo), from_keys(hi)
    (lo,) = select_keys(keys, ((m - 1) // 2)[None])
    enough = jnp.sum(keys <= lo, axis=0) >= m // 2 + 1
    hi = jnp.where(enough, lo, jnp.min(jnp.where(keys > lo, keys, _TOP), axis=0))
    return from_keys(lo), from_keys(hi)


def middle_keys_few(keys: jax.Array, present: jax.Array, m: jax.Array):
    """``middle_values`` on keys for few rows: ``keys [n, B]`` (absent rows hold the max
    key), ``present [n]``, ``m`` = ``sum(present)``. Returns ``(lo [B], hi [B])`` keys.

    The ranks depend on ``m``, a network's outputs do not: so ``p = mid - ⌊(m-1)/2⌋``
    absent rows (``mid = ⌊(n-1)/2⌋``, and ``0 <= p <= n - m``) take the smallest key
    instead of the largest, which moves rank ``r`` of the present keys to rank ``r + p``:
    the lower middle value to ``mid`` and the upper one to ``mid + 1`` for an even ``m``.
    Those two are picked by a pruned sorting network (``selection_network``), a few
    min/max per row instead of ``select_few``'s ``n²`` compares. No present row: the max
    key (NaN), as the counting select gives.
    """
    n = keys.shape[0]
    mid, upper = (n - 1) // 2, min((n - 1) // 2 + 1, n - 1)
    absent = ~present
    bottom = absent & (jnp.cumsum(absent) <= mid - (m - 1) // 2)
    keys = jnp.where(bottom[:, None], jnp.uint32(0), keys)
    steps = selection_network(n, (mid, upper))

    def network(trip, out):
        # ``+ trip`` (0) ties the network to the loop, or XLA would hoist it out of the loop
        rows = list(keys + trip.astype(keys.dtype))
        for a, b, keep_min, keep_max in steps:
            rows[a], rows[b] = (
                jnp.minimum(rows[a], rows[b]) if keep_min else rows[a],
                jnp.maximum(rows[a], rows[b]) if keep_max else rows[b],
            )
        return rows[mid], rows[upper]

    # One trip the compiler cannot count: the result is materialised once, where XLA:CPU
    # would otherwise fuse the whole network into every consumer of lo and hi.
    once = lax.optimization_barrier(jnp.int32(1))
    lo, up = lax.fori_loop(0, once, network, (keys[0], keys[0]))
    hi = jnp.where(m % 2 == 0, up, lo)
    return jnp.where(m > 0, lo, _TOP), jnp.where(m > 0, hi, _TOP)


@functools.cache
def sorting_network(n: int) -> tuple[tuple[int, int], ...]:
    """Batcher's odd–even merge sort on ``n`` wires: compare-exchanges ``(a, b)``, ``a <
    b``, after which wire ``a`` holds the smaller value. Built for the next power of two;
    exchanges with a wire ``>= n`` are dropped (as if that wire held the max key)."""
    size = 1 << max(n - 1, 0).bit_length()
    pairs = []

    def merge(lo: int, hi: int, step: int) -> None:
        if 2 * step < hi - lo:
            merge(lo, hi, 2 * step)
            merge(lo + step, hi, 2 * step)
            pairs.extend((i, i + step) for i in range(lo + step, hi - step, 2 * step))
        else:
            pairs.append((lo, lo + step))

    def sort(lo: int, hi: int) -> None:
        if hi > lo:
            half = lo + (hi - lo) // 2
            sort(lo, half)
            sort(half + 1, hi)
            merge(lo, hi, 1)

    sort(0, size - 1)
    return tuple((a, b) for a, b in pairs if b < n)


@functools.cache
def selection_network(n: int, wanted: tuple[int, ...]) -> tuple[tuple[int, int, bool, bool], ...]:
    """``sorting_network(n)`` pruned to the exchanges that the ranks ``wanted`` depend on:
    ``(a, b, keep_min, keep_max)``, where an output nothing later reads is not computed."""
    needed, steps = set(wanted), []
    for a, b in reversed(sorting_network(n)):
        keep_min, keep_max = a in needed, b in needed
        if keep_min or keep_max:
            steps.append((a, b, keep_min, keep_max))
            needed |= {a, b}
    return tuple(reversed(steps))


def median_block(x, present, m):
    """Coordinate-wise median of the present rows: mean of ranks ⌊(m-1)/2⌋ and ⌊m/2⌋.

    Returns ``(median [B], weight [n, B])``, weight = each row's share of the median. The
    median rule runs it over column blocks (``coordinatewise``); ``masked_median`` is the
    sorting one the attacks use (see there for why there are two).
    """
    lo, hi = middle_values(x, present, m)
    half = jnp.full_like(lo, 0.5)
    weight = tie_share(x, present, lo, half) + tie_share(x, present, hi, half)
    return jnp.where(lo == hi, lo, (lo + hi) / 2), weight


def masked_median(x: jax.Array, mask: jax.Array) -> jax.Array:
    """Per-coordinate median of the rows of ``x [n, d]`` where ``mask`` (mean of the two
    middle ones for an even count; zeros when no row), by sorting each column.

    Why two medians: this one serves the attacks (their pool's median, a region's centre),
    whose results tests pin, and differs from ``median_block`` at the corners: it is 0 for
    an empty mask, may return ``-0.0`` where the select returns ``0.0`` (the select maps
    both to one key), averages two equal middle values as ``0.5 (lo + hi)`` (which
    overflows beyond half the float32 range) and gives no per-row weights. The radix
    select is the faster one for the rules' large ``[n, d]``.
    """
    k = jnp.sum(mask.astype(jnp.int32))
    s = jnp.sort(jnp.where(mask[:, None], x, jnp.inf), axis=0)
    lo = jnp.take(s, jnp.maximum((k - 1) // 2, 0), axis=0)
    hi = jnp.take(s, jnp.maximum(k // 2, 0), axis=0)
    med = 0.5 * (lo + hi)
    return jnp.where(k > 0, med, jnp.zeros_like(med))


def trimmed_block(x, present, m, k):
    """Mean of the present values ranked ``k .. m-1-k`` per column.

    Ties at the cut values share the kept copies equally. Returns ``(mean [B],
    weight [n, B])``.
    """
    lo, hi = select(x, present, jnp.stack([k, m - 1 - k]))
    kept = (m - 2 * k).astype(x.dtype)

    def stats(xs, ps):
        inside = ps & (xs > lo) & (xs < hi)
        return (
            ps & (xs <= lo),
            ps & (xs < hi),
            jnp.where(inside, xs, 0),
        )

    le_lo, lt_hi, inside_sum = fold_rows(stats, x, present)
    n_lo = le_lo - k.astype(x.dtype)  # copies of lo that are kept
    n_hi = (m - k).astype(x.dtype) - lt_hi
    same = lo == hi
    n_lo = jnp.where(same, kept, n_lo)
    n_hi = jnp.where(same, 0, n_hi)
    total = inside_sum + jnp.where(n_lo > 0, lo * n_lo, 0) + jnp.where(n_hi > 0, hi * n_hi, 0)
    p = present[:, None]
    weight = (
        jnp.where(p & (x > lo) & (x < hi), 1.0, 0.0)
        + tie_share(x, present, lo, n_lo.astype(x.dtype))
        + tie_share(x, present, hi, n_hi.astype(x.dtype))
    )
    return total / kept, weight / kept


def closest_block(x, present, lo, hi, q):
    """Mean of the ``q`` present values closest to the median in each column, given its two
    middle values ``lo <= hi [B]`` (``middle_values``).

    Distances are taken to the interval ``[lo, hi]``, which no present value lies strictly
    inside: for every other value that is the distance to the median ``(lo + hi) / 2`` less
    the same ``(hi - lo) / 2``, so the order is the same, while ``lo`` and ``hi`` are both
    at 0 exactly. (Measured from the rounded midpoint, the two middle values of an even
    count could differ by a rounding and one of them win a tie that is exact.) Values tied
    at the cut distance enter through their average, scaled to the number of places left,
    so the result does not depend on row order. Returns ``(mean [B], weight [n, B])``.
    """
    dist = jnp.maximum(jnp.maximum(lo[None] - x, x - hi[None]), 0)
    (cut,) = select(dist, present, q[None] - 1)
    p = present[:, None]
    inside = p & (dist < cut)
    tie = p & (dist == cut)
    left = (q - jnp.sum(inside, axis=0)).astype(x.dtype)
    n_tie = jnp.sum(tie, axis=0)
    tie_mean = safe_div(jnp.sum(jnp.where(tie, x, 0), axis=0), n_tie)
    total = jnp.sum(jnp.where(inside, x, 0), axis=0) + jnp.where(left > 0, left * tie_mean, 0)
    qf = q.astype(x.dtype)
    weight = jnp.where(inside, 1.0, 0.0) + jnp.where(tie, safe_div(left, n_tie)[None], 0)
    return total / qf, weight / qf


def coordinatewise(block_fn: Callable, x: jax.Array, present: jax.Array, block: int | None = None):
    """Run ``block_fn(x_block, present) -> (out [B], weight [n, B])`` over column blocks
    (``block`` columns each, by default ``select_width(n)``).

    Returns ``(out [d], weight [n])`` where weight is averaged over the d coordinates.
    """

    def fn(xb, fresh):
        out, weight = block_fn(xb, present)
        fresh_w = fresh.astype(weight.dtype)
        return out[None], dot(weight, fresh_w)

    out, weight = by_column_blocks(fn, x, 1, block or select_width(x.shape[0]))
    return out[0], weight / x.shape[1]
