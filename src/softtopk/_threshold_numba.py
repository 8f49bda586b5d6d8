"""Numba kernels of the threshold family (:mod:`softtopk.threshold`), the rows in parallel: the whole threshold
search of a normalised mask's row (start, safeguarded Newton, the mask) in one call and its implicit backward in
another; DFTopK's selection and mask, and its backward; the hard top-k mask.

Imported lazily by :mod:`softtopk.threshold` (``pip install numba``) for float32 CPU tensors in eager mode; the
pure-torch solver there is the reference (and the path under ``torch.compile``, ``torch.func`` and on CUDA). For
every row r, with u = x · rt (rt = 1/t) in float64:

    y_i = clip(φ(u_i − τ), 0, 1),   Σ_i y_i = k,

found by the same safeguarded Newton iteration as the reference (on logit(S/n) for the exponential families while
S is far from k, on S otherwise), from a start at the order statistics of the row around rank k (small k: the exact
k-th and (k+1)-th largest, see :func:`_top_pair`; else the threshold of the same problem on a strided subsample of
the row).
A row the kernel does not handle (a non-finite score, |x|/t beyond 1e12, no convergence within ``max_iter``) is
counted, and the caller solves the whole call with the reference instead.

The exponential families need one exponential per entry, not one per entry and step: one pass stores
v_i = e^(u_i − c) (float32: clipped to e^86 above, 0 below e^-86) around the start c, and every Newton step then
evaluates the mask at τ from q_i = v_i e^(c − τ) = e^(z_i) with one division per entry (the sigmoid q/(1 + q), the
Laplace CDF q/2 or 1 − 1/(2q)), recomputing the v_i only if τ moves 40 from c (where the clipping could start to
matter: the entries it touches then contribute below e^-46). The step expected to land within the tolerance writes
the mask over the v_i. The entries stored as 0 get their exact mask only when τ ends more than 1 below c; else it is
0, its exact value being below e^-85 = 1.2e-37 (float32's smallest normal number is 1.2e-38). Per entry the
arithmetic is float32 (relative error about 2e-7, the mask's own rounding); the sums over a row are float32 within
blocks of ``_BLOCK`` entries and float64 across them.

The sparse families (φ at 0 below z = 0 and at 1 above z = 1) take their Newton steps on a window of the row in rows
of 256 entries and more: the root lies in [u_(⌊k⌋+1) − 1, u_(⌈k⌉)], bracketed by the order statistics the start
selects (or a subsample's, in long rows), and only the entries that can be inside (0, 1) for τ there (a few
percent of the row at the usual temperatures) are summed at each step, the others counting 0 or 1
(:func:`_newton_window`).

The exponential itself is a vectorisable one (2^m cast from its bit pattern in a register, a Taylor polynomial of
e^f on [-ln2/2, ln2/2]), so that LLVM vectorises every pass over a row: numba's ``math.exp``
is a scalar libm call, 4–5x slower. Minimum and maximum are taken over integer keys of the float bit patterns, which
vectorise too. The passes use the float flags ``reassoc, contract, arcp, nsz`` only (reductions vectorise; no
finite-math assumption) and ``error_model="numpy"`` (no zero-division branch in the loop).
"""

from __future__ import annotations

import math

import numba
import numpy as np  # the callers make the kernels' small parameter arrays with it (mod.np): there whenever numba is
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

from ._numba_threads import lanes as lanes  # re-exported: the callers split rows with it
from ._numba_threads import launch as launch
from ._numba_threads import torch_threads as torch_threads

SIGMOID, LAPLACE, EUCLIDEAN, CUBIC = 0, 1, 2, 3
#: the family names of :data:`softtopk.threshold.FAMILIES`, by kernel code
CODES = {"sigmoid": SIGMOID, "lapsum": LAPLACE, "sparse2": EUCLIDEAN, "sparse4/3": CUBIC}
_CUBIC32 = 4  # p = 4/3 in the backward, with z in float32 (see :func:`_dphi_z`)

_FAST = {"reassoc", "contract", "arcp", "nsz"}
_POW2 = 2.0 ** np.arange(-160, 161).astype(np.float64)
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_SCAN_K = 32  # rows with k < this get their start from the exact top-(k+1) (unless _MAX_START_K <= k)
_SHORT = 32  # ... by ranking in rows shorter than this many times k + 1, else through block maxima
_WIDTH = 32  # ... of blocks of this many entries
_BLOCKS = 1024  # ... at most this many (wider blocks in longer rows)
_BUF = 32 + 3 * _BLOCKS  # the float32 scratch of those selections (>= 32 + _SHORT * _SCAN_K): the ranks' 32, the
_KEPT_AT = 32 + 2 * _BLOCKS  # ... blocks' maxima, the blocks that reach the bound, and from here the entries kept
_KEPT = _BUF - _KEPT_AT  # ... by :func:`_block_kept`
_MAX_START_K = 8  # ... exponential families with k from this up, in rows up to 64 k long, start at the maximum
_SAMPLE = 256  # otherwise from a strided subsample of about this many entries (rows longer than 2x this)
_BIG = 1e12  # |x|/t beyond this: the reference, which re-centres
_CLIP = 86.0  # the stored exponentials e^(u − c) are clipped to e^86 above and 0 below e^-86: normal float32 numbers
_RECENTRE = 40.0  # ... and recomputed around τ once τ is further than this from their centre c
#: the exponentials below e^-86 (the clip) are stored as 0, so that the mask there is exactly 0 (as where it
#: underflows); it is recomputed exactly only when τ ends more than this below their centre c: otherwise its exact
#: value is below e^(−86 + 1) = 1.2e-37, within ten times float32's smallest normal number (the scalar pass that
#: recomputes it cost 15% of the forward at n = 1.28e5, t = 0.075)
_FIX_BELOW = 1.0
_F32_RANGE = 2.0**20  # |u| and |c| up to this: the exponential pass in float32 (|u| · 2^-48 ≈ 4e-9 from rt's split)
_LN2_HI = np.float32(0.693359375)  # ln 2 = _LN2_HI + _LN2_LO, the first exact with few bits (Cody and Waite)
_LN2_LO = np.float32(_LN2 - 0.693359375)
SCAN_K = _SCAN_K
#: selections with k >= _SCAN_K in rows longer than this go through a sampled window (quickselect on a copy of the
#: row is slower from here: 2.6 against 1.5 µs at n = 512, k = 32; 45 against 24 µs at n = 4096, k = 512)
_WINDOW_MIN_N = 512
_WINDOW_SAMPLE = 1024  # ... of about this many entries
_WINDOW_STRIDE = 8  # ... at least this far apart (rows up to 8192: a larger sample costs more than it narrows)
_TINY_N = 16  # DFTopK's rows up to this long: the sigmoid over many rows in one loop
_NAN_COUNT = 1 << 24  # what :func:`_hard_row` adds to its count for a NaN (above any row's length that it counts)
#: the sums of the exponential passes: float32 within blocks of this many entries (which LLVM spreads over vector
#: lanes), float64 across blocks. Positive terms: relative error below 127 u = 7.6e-6 in any order of summation
#: (u = 2^-24), under the default float32 tolerance of 1e-5 k on S = k. Float64 throughout cost 0.3 ns per entry of
#: the exponential pass's 0.8, and half of a sweep (measured), the conversions and the 8-lane adds being the bound.
_BLOCK = 128


@intrinsic
def _float32_of_bits(typingctx, bits):
    """The float32 whose bit pattern is the low 32 bits of the integer ``bits``: a register bitcast. (Writing the
    bits through an int32 view of an array and reading them back as float32 would alias the array with itself, and
    LLVM then leaves the loop scalar.)"""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        word = args[0]
        if bits.bitwidth != 32:
            word = builder.trunc(word, context.get_value_type(types.int32))
        return builder.bitcast(word, context.get_value_type(types.float32))

    return types.float32(bits), codegen


def _llvm(builder, name, result, *params):
    """The LLVM intrinsic ``name`` of the given IR types, declared once per module."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(result, list(params)), name)


def _splat(elt, value, lanes=32):
    """A constant vector of ``lanes`` copies of ``value``."""
    return ir.Constant(ir.VectorType(elt, lanes), [value] * lanes)


@intrinsic
def _fma32(typingctx, a, b, c):
    """a b + c in float32 with one rounding (``llvm.fma``: a vector FMA instruction where the CPU has one, which is
    what the loops that call it are built for; libm's fmaf elsewhere)."""
    if not all(isinstance(t, types.Float) and t.bitwidth == 32 for t in (a, b, c)):
        return None

    def codegen(context, builder, signature, args):
        f32 = context.get_value_type(types.float32)
        return builder.call(_llvm(builder, "llvm.fma.f32", f32, f32, f32, f32), args)

    return types.float32(a, b, c), codegen


def _vector_at(context, builder, aryty, ary, start, lanes):
    """A pointer to the ``lanes``-vector of the C-contiguous array ``ary`` that begins at index ``start``."""
    data = context.make_array(aryty)(context, builder, value=ary).data
    elt = context.get_value_type(aryty.dtype)
    return builder.bitcast(builder.gep(data, [start]), ir.PointerType(ir.VectorType(elt, lanes)))


def _pointer(numba_type, llvm_type):
    @intrinsic
    def at(typingctx, address):
        if not isinstance(address, types.Integer):
            return None

        def codegen(context, builder, signature, args):
            return builder.inttoptr(args[0], ir.PointerType(llvm_type))

        return types.CPointer(numba_type)(address), codegen

    at.__doc__ = f"""The {numba_type} pointer at an integer address (a tensor's ``data_ptr()``): an ``inttoptr``."""
    return at


_f32_at = _pointer(types.float32, ir.FloatType())
_f64_at = _pointer(types.float64, ir.DoubleType())
_i64_at = _pointer(types.int64, ir.IntType(64))


@numba.njit(inline="always")
def _rows_at(address, rows, n):
    """The C-contiguous float32 array (rows, n) at ``address``: a contiguous tensor's memory, given by its
    ``data_ptr()`` (0 and n = 0 for none). The parallel kernels take their arrays so, allocated by torch: a numpy
    view of a tensor, or a numpy array, costs a small call about a microsecond each (numpy's code is out of the
    cache by then), and numba's dispatch types an integer faster than an array."""
    return numba.carray(_f32_at(address), (rows, n))


@numba.njit(inline="always")
def _f64s_at(address, shape):
    """The C-contiguous float64 array of ``shape`` at ``address`` (see :func:`_rows_at`)."""
    return numba.carray(_f64_at(address), shape)


@numba.njit(inline="always")
def _i64s_at(address, shape):
    """The C-contiguous int64 array of ``shape`` at ``address`` (see :func:`_rows_at`)."""
    return numba.carray(_i64_at(address), shape)


def _is_row(a, dtype) -> bool:
    return isinstance(a, types.Array) and a.ndim == 1 and a.layout == "C" and a.dtype == dtype


@intrinsic
def _key_max32(typingctx, xi, start):
    """The largest :func:`_key` of xi[start : start + 32] (int32 bit patterns, a C-contiguous row; no bounds check):
    two vector loads and a vector reduction, 2.5x as fast as :func:`_key_max` over 32 entries (measured; LLVM's
    vectorised loop over a slice of unknown length has a remainder and a reduction of its own)."""
    if not (_is_row(xi, types.int32) and isinstance(start, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        i32, vec = ir.IntType(32), ir.VectorType(ir.IntType(32), 32)
        b = builder.load(_vector_at(context, builder, signature.args[0], args[0], args[1], 32), align=4)
        key = builder.xor(b, builder.and_(builder.ashr(b, _splat(i32, 31)), _splat(i32, 0x7FFFFFFF)))
        return builder.call(_llvm(builder, "llvm.vector.reduce.smax.v32i32", i32, vec), [key])

    return types.int32(xi, start), codegen


def _mask32(context, builder, signature, args, op):
    """The 32-bit mask of a[start : start + 32] ``op`` v (a C-contiguous int32 or float32 row, v of its dtype;
    an ordered float comparison: NaN is never counted)."""
    aryty = signature.args[0]
    elt = context.get_value_type(aryty.dtype)
    i32 = ir.IntType(32)
    a = builder.load(_vector_at(context, builder, aryty, args[0], args[1], 32), align=4)
    v = context.cast(builder, args[2], signature.args[2], aryty.dtype)
    splat = builder.insert_element(ir.Constant(ir.VectorType(elt, 32), ir.Undefined), v, ir.Constant(i32, 0))
    splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(i32, 32), [0] * 32))
    cmp = builder.icmp_signed(op, a, splat) if aryty.dtype == types.int32 else builder.fcmp_ordered(op, a, splat)
    return builder.bitcast(cmp, i32)


def _popcount(builder, bits):
    i32 = ir.IntType(32)
    return builder.call(_llvm(builder, "llvm.ctpop.i32", i32, i32), [bits])


def _counter(op):
    @intrinsic
    def count32(typingctx, a, start, v):
        if not (isinstance(start, types.Integer) and (_is_row(a, types.int32) or _is_row(a, types.float32))):
            return None

        def codegen(context, builder, signature, args):
            return _popcount(builder, _mask32(context, builder, signature, args, op))

        return types.int32(a, start, v), codegen

    count32.__doc__ = f"""How many of a[start : start + 32] are {op} v (see :func:`_mask32`): a vector comparison and
    a population count."""
    return count32


_count_ge32 = _counter(">=")
_count_gt32 = _counter(">")


@intrinsic
def _bits_ge32(typingctx, x, start, v):
    """The bits of x[start : start + 32] >= v (bit i for entry start + i; a float32 row, NaN never set), as an
    int64: one vector comparison."""
    if not (_is_row(x, types.float32) and isinstance(start, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        return builder.zext(_mask32(context, builder, signature, args, ">="), ir.IntType(64))

    return types.int64(x, start, v), codegen


@intrinsic
def _bits_in32(typingctx, x, start, lo, hi):
    """The bits of lo <= x[start : start + 32] < hi (bit i for entry start + i; a float32 row, NaN never set), as an
    int64: two vector comparisons."""
    if not (_is_row(x, types.float32) and isinstance(start, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        sig = signature.args
        above = _mask32(context, builder, types.int32(sig[0], sig[1], sig[2]), [args[0], args[1], args[2]], ">=")
        below = _mask32(context, builder, types.int32(sig[0], sig[1], sig[3]), [args[0], args[1], args[3]], "<")
        return builder.zext(builder.and_(above, below), ir.IntType(64))

    return types.int64(x, start, lo, hi), codegen


@intrinsic
def _lowest_bit(typingctx, bits):
    """The index of the lowest set bit of a non-zero int64 (``llvm.cttz``: one instruction)."""
    if not (isinstance(bits, types.Integer) and bits.bitwidth == 64):
        return None

    def codegen(context, builder, signature, args):
        i64 = ir.IntType(64)
        cttz = _llvm(builder, "llvm.cttz.i64", i64, i64, ir.IntType(1))
        return builder.call(cttz, [args[0], ir.Constant(ir.IntType(1), 1)])  # (1: undefined for 0)

    return types.int64(bits), codegen


@intrinsic
def _hard32(typingctx, x, out, start, a):
    """out[start : start + 32] = 1 where x[start : start + 32] >= a, else 0 (float32 rows; a not NaN); returns how
    many, plus ``_NAN_COUNT`` where one of the 32 is NaN."""
    if not (_is_row(x, types.float32) and _is_row(out, types.float32) and isinstance(start, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        f32, i32 = ir.FloatType(), ir.IntType(32)
        bits = _mask32(context, builder, types.int32(signature.args[0], signature.args[2], signature.args[3]),
                       [args[0], args[2], args[3]], ">=")  # fmt: skip
        hit = builder.bitcast(bits, ir.VectorType(ir.IntType(1), 32))
        ones = builder.select(hit, _splat(f32, 1.0), _splat(f32, 0.0))
        v = builder.load(_vector_at(context, builder, signature.args[0], args[0], args[2], 32), align=4)
        nan = builder.bitcast(builder.fcmp_unordered("uno", v, v), i32)
        builder.store(ones, _vector_at(context, builder, signature.args[1], args[1], args[2], 32), align=4)
        flag = builder.select(builder.icmp_unsigned("!=", nan, ir.Constant(i32, 0)), ir.Constant(i32, _NAN_COUNT),
                              ir.Constant(i32, 0))  # fmt: skip
        return builder.add(_popcount(builder, bits), flag)

    return types.int32(x, out, start, a), codegen


@numba.njit(inline="always")
def _as_float32(t):
    """t rounded to float32 (and back to float64): a centre that the float32 exponential pass subtracts exactly."""
    return np.float64(np.float32(t))


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _exp(z):
    """e^z for |z| <= 100 (2^n from a table; f in [-ln2/2, ln2/2], Taylor to degree 8)."""
    y = z * _LOG2E
    n = np.int32(y + 160.5) - np.int32(160)  # round(y): the sum is positive
    f = (y - n) * _LN2
    q = 1 / 120 + f * (1 / 720 + f * (1 / 5040 + f / 40320))
    p = 1.0 + f * (1.0 + f * (0.5 + f * (1 / 6 + f * (1 / 24 + f * q))))
    return p * _POW2[n + 160]


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _phi(fam, z):
    """(clip(φ(z), 0, 1), φ'(z)), with φ' = 0 where the mask is 0 or 1."""
    if fam == SIGMOID:
        y = 1.0 / (1.0 + _exp(-min(max(z, -100.0), 100.0)))
        return y, y * (1.0 - y)
    if fam == LAPLACE:
        e = 0.5 * _exp(-min(abs(z), 100.0))
        return (e if z < 0.0 else 1.0 - e), e
    c = min(max(z, 0.0), 1.0)
    if fam == EUCLIDEAN:
        return c, (1.0 if (z > 0.0 and z < 1.0) else 0.0)
    return c * c * c, (3.0 * c * c if z < 1.0 else 0.0)


@numba.njit(inline="always")
def _phi_inv_half(fam):
    """φ⁻¹(1/2) without a logarithm: 0 for the exponential families, 1/2 for p = 2, 2^(-1/3) for p = 4/3."""
    if fam == SIGMOID or fam == LAPLACE:
        return 0.0
    return 0.5 if fam == EUCLIDEAN else 0.7937005259840998


@numba.njit(inline="always")
def _phi_inv(fam, p):
    if fam == SIGMOID:
        return math.log(p / (1.0 - p))
    if fam == LAPLACE:
        return math.log(2.0 * p) if p < 0.5 else -math.log(2.0 - 2.0 * p)
    if fam == EUCLIDEAN:
        return p
    return p ** (1.0 / 3.0)


@numba.njit(inline="always")
def _key(b):
    """An integer key of a float32's bit pattern b (int32) in the float order (and back: the map is an involution)."""
    return b ^ ((b >> 31) & 0x7FFFFFFF)


@numba.njit(inline="always")
def _unkey(lo, hi):
    """The floats of the keys lo and hi."""
    return np.float64(_float32_of_bits(_key(lo))), np.float64(_float32_of_bits(_key(hi)))


@intrinsic
def _stats32(typingctx, xi, end):
    """(the smallest and largest :func:`_key`, the largest exponent field b & 0x7F800000) over xi[:end] (the int32
    bit patterns of a C-contiguous float32 row, ``end`` a multiple of 32): one loop of 32-lane int32 vectors with
    three vector accumulators, reduced at the end. (Numba widens int32 arithmetic to int64, which halves the lanes
    of the same loop written in Python: 2.x as fast, measured.)"""
    if not (_is_row(xi, types.int32) and isinstance(end, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        i32 = ir.IntType(32)
        vec = ir.VectorType(i32, 32)
        acc = [cgutils.alloca_once_value(builder, _splat(i32, v)) for v in (0x7FFFFFFF, -0x7FFFFFFF, 0)]
        ops = ("llvm.smin.v32i32", "llvm.smax.v32i32", "llvm.smax.v32i32")
        step = ir.Constant(args[1].type, 32)
        with cgutils.for_range_slice(builder, ir.Constant(args[1].type, 0), args[1], step) as (i, _):
            b = builder.load(_vector_at(context, builder, signature.args[0], args[0], i, 32), align=4)
            key = builder.xor(b, builder.and_(builder.ashr(b, _splat(i32, 31)), _splat(i32, 0x7FFFFFFF)))
            for slot, op, v in zip(acc, ops, (key, key, builder.and_(b, _splat(i32, 0x7F800000)))):
                builder.store(builder.call(_llvm(builder, op, vec, vec, vec), [builder.load(slot), v]), slot)
        out = [builder.call(_llvm(builder, f"llvm.vector.reduce.{op[5:9]}.v32i32", i32, vec), [builder.load(slot)])
               for slot, op in zip(acc, ops)]  # fmt: skip
        return context.make_tuple(builder, signature.return_type, out)

    return types.UniTuple(types.int32, 3)(xi, end), codegen


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _stats(x):
    """(min, max, all finite) of a float32 row. Compared as integer keys of the bit patterns, which vectorise
    (a float min/max reduction does not without a no-NaN assumption), 32 at a time (:func:`_stats32`); finite means
    no exponent of all ones."""
    xi = x.view(np.int32)
    whole = x.shape[0] - x.shape[0] % 32
    lo, hi, top = _stats32(xi, whole) if whole else (np.int32(0x7FFFFFFF), np.int32(-0x7FFFFFFF), np.int32(0))
    for i in range(whole, x.shape[0]):
        b = xi[i]
        key = _key(b)
        lo, hi, top = min(lo, key), max(hi, key), max(top, b & 0x7F800000)
    xmin, xmax = _unkey(lo, hi)
    return xmin, xmax, top != 0x7F800000


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _exp_reduced(f):
    """e^f for a float32 f in [-ln2/2, ln2/2]: the degree-6 Taylor polynomial in float32 arithmetic (truncation
    1.2e-7, about the float32 result's own rounding; degree 7 cost DFTopK's sigmoid pass 10% more)."""
    one = np.float32(1.0)
    return one + f * (one + f * (np.float32(0.5) + f * (np.float32(1 / 6) + f * (
        np.float32(1 / 24) + f * (np.float32(1 / 120) + f * np.float32(1 / 720))))))  # fmt: skip


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _exp_pass(fam, x, rt, c, v):
    """v_i = e^(u_i − c) for u = x rt, clipped to e^86 above and 0 below e^-86, as float32 into v; :func:`_stats` of
    x, and (S, Σφ') at τ = c (what the first :func:`_sweep_exp` would give). Returns (min, max, finite, S, Σφ').
    ``c`` a float32 value (:func:`_as_float32`).

    The exponential: 2^m from its bit pattern, times e^f, f in [-ln2/2, ln2/2] (the polynomial in float32:
    :func:`_exp_reduced`). Where |u| and |c| stay within ``_F32_RANGE`` all in float32 (:func:`_exp_f32`), else
    the argument in float64 (1.3x slower). Relative error 2e-7 plus |u − c| · 6e-8 (the float32 rounding of u − c,
    as the torch path has it; 5e-6 at the clip, on values below e^-80). The statistics take a loop of their own:
    inside this one they cost three times as much (measured)."""
    xmin, xmax, finite = _stats(x)
    s = 0.0
    d = 0.0
    f32 = max(abs(xmin), abs(xmax)) * rt <= _F32_RANGE and abs(c) <= _F32_RANGE  # (LLVM unswitches the loop on it)
    rt_hi = np.float32(rt)
    rt_lo = np.float32(rt - np.float64(rt_hi))
    neg_c = np.float32(-c)
    for start in range(0, x.shape[0], _BLOCK):
        xb = x[start : start + _BLOCK]
        vb = v[start : start + _BLOCK]
        sb = db = np.float32(0.0)
        for i in range(xb.shape[0]):
            e = _exp_f32(xb[i], rt_hi, rt_lo, neg_c) if f32 else _exp_f64(xb[i] * rt - c)
            vb[i] = e
            yi, di = _phi_exp(fam, e)
            sb += yi
            db += di
        s += np.float64(sb)
        d += np.float64(db)
    return xmin, xmax, finite, s, d


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _exp_f32(x, rt_hi, rt_lo, neg_c):
    """e^(x rt − c) as :func:`_exp_pass` stores it, in float32: x rt − c as one FMA with rt = rt_hi + rt_lo (exact
    up to the float32 rounding of the result itself while |x rt| <= 2^20), the reduction by Cody and Waite's split
    ln 2."""
    return _exp32(_fma32(x, rt_hi, neg_c) + x * rt_lo)


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _exp32(wx):
    """e^wx of a float32 wx in float32, clipped to e^86 above and 0 below e^-86 (see :func:`_exp_f32`)."""
    w = min(max(wx, np.float32(-_CLIP)), np.float32(_CLIP))
    m = np.int32(w * np.float32(_LOG2E) + np.float32(127.5)) - np.int32(127)  # round(w / ln 2)
    mf = np.float32(m)
    e = _exp_reduced(_fma32(-mf, _LN2_LO, _fma32(-mf, _LN2_HI, w))) * _float32_of_bits((m + 127) << 23)
    return e if wx >= np.float32(-_CLIP) else np.float32(0.0)


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _exp_f64(wx):
    """e^wx as :func:`_exp_pass` stores it, the argument reduced in float64."""
    w = min(max(wx, -_CLIP), _CLIP) * _LOG2E
    m = np.int32(w + 127.5) - np.int32(127)  # round(w): the sum is positive
    e = _exp_reduced(np.float32((w - m) * _LN2)) * _float32_of_bits((m + 127) << 23)  # e^f 2^m
    return e if wx >= -_CLIP else np.float32(0.0)


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _phi_exp(fam, q):
    """(φ(z), φ'(z)) of the exponential families from q = e^z in float32 arithmetic (relative error 1e-7, the
    mask's own rounding; twice as fast as float64, whose division dominates a sweep): the sigmoid q/(1 + q), the
    Laplace CDF q/2 (q < 1) or 1 − 1/(2q)."""
    if fam == SIGMOID:
        q = min(q, np.float32(2.0**100))  # q = v e^(c − τ) overflows float32 beyond e^88.7: inf · 0 would be NaN
        r = np.float32(1.0) / (np.float32(1.0) + q)
        y = q * r
        return y, y * r  # σ' = σ (1 − σ)
    half = np.float32(0.5) / q  # 0 for q = inf: the mask 1, φ' 0
    return (np.float32(0.5) * q, np.float32(0.5) * q) if q < np.float32(1.0) else (np.float32(1.0) - half, half)


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _sweep_exp(fam, v, scale, write):
    """(S, Σφ') at τ from v_i = e^(u_i − c) and scale = e^(c − τ), q = v scale = e^z (see :func:`_phi_exp`; the sums
    by blocks, ``_BLOCK``); the mask is written over v when ``write``. One division per entry and no exponential.
    (In place through the one array: with a second array holding the same memory, LLVM's overlap check fails and
    the loop runs scalar, 4x slower.)"""
    s = 0.0
    d = 0.0
    sc = np.float32(scale)
    for start in range(0, v.shape[0], _BLOCK):
        vb = v[start : start + _BLOCK]
        sb = db = np.float32(0.0)
        if write:
            for i in range(vb.shape[0]):
                yi, di = _phi_exp(fam, vb[i] * sc)
                vb[i] = yi
                sb += yi
                db += di
        else:
            for i in range(vb.shape[0]):
                yi, di = _phi_exp(fam, vb[i] * sc)
                sb += yi
                db += di
        s += np.float64(sb)
        d += np.float64(db)
    return s, d


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _sweep(fam, x, rt, tau, y, write):
    """(S, Σφ') at τ over the row x (u = x rt), with the mask written into y when ``write``."""
    s = 0.0
    d = 0.0
    if write:
        for i in range(x.shape[0]):
            v, dv = _phi(fam, x[i] * rt - tau)
            y[i] = v
            s += v
            d += dv
    else:
        for i in range(x.shape[0]):
            v, dv = _phi(fam, x[i] * rt - tau)
            s += v
            d += dv
    return s, d


@numba.njit(cache=True)
def _top_pair(x, k, buf):
    """The k-th and (k+1)-th largest of x (1 <= k < n, k < ``_SCAN_K``), in the float32 scratch ``buf``
    (``_BUF``): in registers or by ranking in rows of up to 16 entries, by ranking the entries above a bound
    (:func:`_short_pair`) in rows shorter than ``_SHORT`` (k + 1), else through the maxima of blocks
    (:func:`_block_pair`)."""
    if x.shape[0] <= 16:
        return _top4_pair(x, k) if k <= 3 else _tiny_pair(x, k, buf)
    if x.shape[0] < _SHORT * (k + 1):
        return _short_pair(x, k, buf)
    return _block_pair(x, k, buf)


@numba.njit(inline="always")
def _scan_top(a, m, top, lowest):
    """The m largest of a in decreasing order into top[:m] (``lowest`` where a has fewer), by one scan that
    inserts each entry above the m-th largest so far: about m ln(len(a) / m) insertions, each a mispredicted branch
    and m / 2 moves (NaN entries are passed over)."""
    for j in range(m):
        top[j] = lowest
    cut = lowest
    for i in range(a.shape[0]):
        v = a[i]
        if v > cut:
            j = m - 1
            while j > 0 and top[j - 1] < v:
                top[j] = top[j - 1]
                j -= 1
            top[j] = v
            cut = top[m - 1]


@numba.njit(inline="always")
def _key_max(xi):
    """The largest :func:`_key` of the bit patterns xi (int32): a reduction that vectorises (the loop runs over
    a slice from 0, which LLVM vectorises; with offsets into the row it does not)."""
    best = np.int32(-0x7FFFFFFF - 1)
    for i in range(xi.shape[0]):
        best = max(best, _key(xi[i]))
    return best


@numba.njit(inline="always")
def _block_pair(x, k, buf):
    """:func:`_top_pair` in a row of at least ``_SHORT`` (k + 1) entries: see :func:`_block_kept`."""
    a, b, _ = _block_kept(x, k, buf, buf[:0].view(np.int32))
    return a, b


@numba.njit(inline="always")
def _block_kept(x, k, buf, at):
    """(k-th largest, (k+1)-th largest, q) of a row of at least ``_SHORT`` (k + 1) entries: the maxima of blocks
    of ``_WIDTH`` entries (wider in rows of more than ``_BLOCKS`` blocks, see :func:`_peaks`); the (k+1)-th largest
    of them bounds the row's (k+1)-th largest from below, since k + 1 entries reach it; the q entries at or above
    that bound (k + 1 to 2k for Gaussian scores), found in the blocks whose maximum reaches it (listed without a
    branch), are kept in buf[_KEPT_AT:][:q] (their indices in ``at`` when it is not empty), in the row's order, and
    ranked; a block where its maximum alone reaches the bound (counted by vector comparisons) gives that maximum
    and is not scanned (its index in ``at`` is then -1 - the block's number: :func:`_kept_index`). When more than
    ``_KEPT`` entries reach the bound (ties), one scan of the row (:func:`_scan_top`) instead, and q = -1. Faster
    than that scan alone by 1.9x at n = 1000, 3-4x at n = 1e4 and 6x at n = 1.28e5, k from 4 to 10 (measured on one
    Zen 4 core)."""
    n = x.shape[0]
    width, blocks, _, cut = _peaks(x, k, buf)
    peaks = buf[32 : 32 + _BLOCKS].view(np.int32)
    listed = buf[32 + _BLOCKS : _KEPT_AT].view(np.int32)
    low = _float32_of_bits(_key(cut))
    kept = buf[_KEPT_AT:]
    record = at.shape[0] > 0
    m = 0
    for j in range(blocks):  # (a branch per block mispredicts for the k + 1 or so that reach the bound)
        listed[m] = j
        m += peaks[j] >= cut
    q = 0
    for jj in range(m + 1):
        j = listed[jj] if jj < m else blocks  # (then the tail after the last whole block)
        if j < blocks:
            count = 0
            for s in range(j * width, (j + 1) * width, 32):
                count += _count_ge32(x, s, low)
            if count == 1 and peaks[j] <= np.int32(0x7F800000):  # only its maximum (not NaN) reaches the bound
                if q == kept.shape[0]:
                    a, b = _scan_pair(x, k, buf)
                    return a, b, -1
                kept[q] = _float32_of_bits(_key(peaks[j]))
                if record:
                    at[q] = -1 - j  # the block, not the index (see _kept_index)
                q += 1
                continue
        for i in range(j * width, min(n, (j + 1) * width)):
            v = x[i]
            if v >= low:
                if q == kept.shape[0]:
                    a, b = _scan_pair(x, k, buf)
                    return a, b, -1
                kept[q] = v
                if record:
                    at[q] = i
                q += 1
    if q > 64:
        a, b = _scan_pair(kept[:q], k, buf)
        return a, b, q
    end = (q + 15) // 16 * 16  # padded with -inf to whole vectors (see _tiny_pair)
    for i in range(q, end):
        kept[i] = -np.inf
    a, b = _rank_first(kept[:end], q, k)
    return a, b, q


@numba.njit(inline="always")
def _block_width(n):
    """The width of :func:`_peaks`' blocks in a row of n entries: ``_WIDTH``, wider in rows of more than ``_BLOCKS``
    such blocks (a multiple of ``_WIDTH``)."""
    return _WIDTH * ((n + _WIDTH * _BLOCKS - 1) // (_WIDTH * _BLOCKS))


@numba.njit(inline="always")
def _peaks(x, k, buf):
    """(width, blocks, first, second): the maxima of the row's whole blocks of ``width`` entries (``_WIDTH``, wider
    in rows of more than ``_BLOCKS`` blocks) as integer keys (:func:`_key`) in buf[32:][:blocks], 32 entries at a
    time (:func:`_key_max32`), and the k-th and (k+1)-th largest of them (keys): ranked without a branch
    (:func:`_rank32`) among up to 64 blocks, else by one scan (:func:`_scan_top`, into buf[:k + 1])."""
    n = x.shape[0]
    width = _block_width(n)
    blocks = n // width
    xi = x.view(np.int32)
    peaks = buf[32 : 32 + _BLOCKS].view(np.int32)
    for j in range(blocks):
        best = _key_max32(xi, j * width)
        for s in range(j * width + 32, (j + 1) * width, 32):
            best = max(best, _key_max32(xi, s))
        peaks[j] = best
    if blocks <= 64:
        first, second = _rank32(peaks, blocks, k, np.int32(-0x7FFFFFFF - 1))
        return width, blocks, first, second
    top = buf[:32].view(np.int32)
    _scan_top(peaks[:blocks], k + 1, top, np.int32(-0x7FFFFFFF - 1))
    return width, blocks, top[k - 1], top[k]


@numba.njit(inline="always")
def _rank32(a, m, k, lowest):
    """The k-th and (k+1)-th largest of a[:m] (an int32 or float32 array, k < m; a[m:] up to a multiple of 32 is
    overwritten with ``lowest``, at most every entry): for every entry, how many exceed it and how many are at least
    as large, by vector comparisons (:func:`_count_gt32`), 32 at a time, and no branch (4x as fast as
    :func:`_scan_top` over 31 block maxima); ``lowest`` where no entry has the rank (NaN entries have none)."""
    end = (m + 31) // 32 * 32
    for i in range(m, end):
        a[i] = lowest
    first = second = lowest
    for i in range(m):
        v = a[i]
        gt = ge = 0
        for s in range(0, end, 32):
            gt += _count_gt32(a, s, v)
            ge += _count_ge32(a, s, v)
        first = v if gt < k <= ge else first  # v holds every rank in (gt, ge]
        second = v if gt <= k < ge else second
    return first, second


@numba.njit(inline="always")
def _peak_pair(x, k, buf):
    """The k-th and (k+1)-th largest of the block maxima of :func:`_peaks` (a row of at least ``_SHORT`` (k + 1)
    entries): lower bounds on the row's own k-th and (k+1)-th largest, equal to them unless two of the row's k + 1
    largest share a block."""
    _, _, first, second = _peaks(x, k, buf)
    return _float32_of_bits(_key(first)), _float32_of_bits(_key(second))


@numba.njit(inline="always")
def _scan_pair(a, k, buf):
    """The k-th and (k+1)-th largest of a by :func:`_scan_top` into buf[:k + 1]."""
    _scan_top(a, k + 1, buf, -np.inf)
    return buf[k - 1], buf[k]


@numba.njit(inline="always", fastmath={"nsz"})
def _rank_first(a, m, k):
    """The k-th and (k+1)-th largest of a[:m] (k < m), the entries a[m:] (padding, at most a[:m]'s smallest)
    counted in the ranks: for every entry, how many entries exceed it and how many are at least as large, by
    branch-free inner loops that vectorise (m · len(a) comparisons); -inf where no entry has the rank (NaN entries
    have none)."""
    first = second = -np.inf
    for i in range(m):
        v = a[i]
        gt = 0
        ge = 0
        for j in range(a.shape[0]):
            w = a[j]
            gt += w > v
            ge += w >= v
        first = v if gt < k <= ge else first  # v holds every rank in (gt, ge]
        second = v if gt <= k < ge else second
    return first, second


@numba.njit(inline="always")
def _top4_pair(x, k):
    """The k-th and (k+1)-th largest of x for k <= 3: the four largest kept in registers, each entry inserted by
    seven branch-free comparisons (NaN entries are passed over); -inf where no entry has the rank."""
    a = b = c = d = -np.inf  # a >= b >= c >= d
    for i in range(x.shape[0]):
        e = x[i]
        d = max(d, min(c, e)) if e == e else d
        c = max(c, min(b, e)) if e == e else c
        b = max(b, min(a, e)) if e == e else b
        a = max(a, e) if e == e else a
    if k == 1:
        return a, b
    return (b, c) if k == 2 else (c, d)


@numba.njit(inline="always", fastmath={"nsz"})
def _tiny_pair(x, k, buf):
    """:func:`_rank_first` of a row of at most 16 entries, copied into ``buf`` and padded with -inf (below or equal
    to every entry: no rank up to n changes) so that the inner loop has the fixed length 16 and no scalar
    remainder (:func:`_rank_first`): 2.5x faster on rows of 8 (a mixture-of-experts router's)."""
    n = x.shape[0]
    for j in range(16):
        buf[j] = x[j] if j < n else -np.inf
    return _rank_first(buf[:16], n, k)


@numba.njit(inline="always")
def _short_pair(x, k, buf):
    """:func:`_top_pair` in a short float32 row: the row read as columns of 16 (k < 16) or 32 entries, the
    (k+1)-th largest of the column maxima is a lower bound on the row's (k+1)-th largest (k + 1 entries are at
    least it); the entries above it (about 3 k for Gaussian scores), found by vector comparisons, are ranked by
    :func:`_rank32` (1.75x as fast as a scalar compaction and ranking at 64 entries, k = 8; 1.6x at 200, k = 20)."""
    n = x.shape[0]
    cols = 16 if k < 16 else 32
    low = -np.inf
    if n >= 2 * cols:
        cmax = buf[:32]
        for c in range(cols):
            cmax[c] = x[c]
        for i in range(cols, n - n % cols, cols):
            for c in range(cols):
                v = x[i + c]
                cmax[c] = v if v > cmax[c] else cmax[c]
        low = _rank32(cmax, cols, k, -np.inf)[1]
    kept = buf[32:]
    m = 0
    whole = n - n % 32
    for start in range(0, whole, 32):
        bits = _bits_ge32(x, start, low)
        while bits != 0:
            kept[m] = x[start + _lowest_bit(bits)]
            m += 1
            bits &= bits - 1
    for i in range(whole, n):
        v = x[i]
        kept[m] = v
        m += v >= low
    return _rank32(kept, m, k, -np.inf)


@numba.njit(cache=True)
def _select_pair(a, r):
    """The r-th and (r+1)-th largest of a (1 <= r < len(a)), by quickselect in place: cheap to compile, unlike
    ``np.partition``. Each step splits the range at the median of three entries with branch-free partitions (the
    entries above the pivot to the front, then those equal to it: ties end the search), 3.3x as fast as Hoare's
    partition, whose comparisons mispredict half the time (measured at 270 to 4096 entries). NaN entries are never
    above nor equal to a pivot; a NaN pivot stops the search (the callers decline non-finite rows)."""
    lo, hi = 0, a.shape[0]
    while True:  # afterwards a[:r] >= a[r] >= a[r + 1:]
        u, v, w = a[lo], a[(lo + hi) // 2], a[hi - 1]
        pivot = max(min(u, v), min(max(u, v), w))
        above = lo
        for i in range(lo, hi):
            e = a[i]
            a[i] = a[above]
            a[above] = e
            above += e > pivot
        if r < above:
            hi = above
            continue
        ties = above
        for i in range(above, hi):  # (every entry here is at most the pivot)
            e = a[i]
            a[i] = a[ties]
            a[ties] = e
            ties += e >= pivot
        if r < ties or ties == lo:
            break
        lo = ties
    return a[:r].min(), a[r]


@numba.njit(inline="always")
def _step(fam, s, d, k, n, logit_k):
    """The Newton step in τ from S and Σφ' (= −dS/dτ): on logit(S/n) for the exponential families while S is far
    from k (linear in τ in both tails), on S near it (where the two agree, without the logarithm); NaN when S or
    Σφ' leaves no step (the caller bisects)."""
    resid = s - k
    rest = n - s
    if (fam == SIGMOID or fam == LAPLACE) and abs(resid) > 0.1 * min(k, n - k):
        if s > 0 and rest > 0 and d > 0:
            return (math.log(s / rest) - logit_k) * (s * rest) / (d * n)
        return np.nan
    return resid / d if d > 0 else np.nan


@numba.njit(inline="always")
def _next(fam, s, d, k, n, logit_k, tau, lo, hi):
    """One safeguarded step from τ with S(τ) = s: the bracket [lo, hi] shrunk to τ on the residual's side, and the
    Newton step of :func:`_step`, or bisection where it leaves the bracket. Returns (τ', lo, hi)."""
    if s - k > 0:
        lo = tau
    else:
        hi = tau
    new = tau + _step(fam, s, d, k, n, logit_k)
    if not (new > lo and new < hi):
        new = 0.5 * lo + 0.5 * hi
    return new, lo, hi


@numba.njit(cache=True)
def _newton(fam, x, k, rt, tau, lo, hi, tol, max_iter, y, write):
    """Safeguarded Newton on S(τ) = k from τ in the bracket [lo, hi] (S(lo) >= k >= S(hi)), as the reference,
    one :func:`_sweep` per step. Returns (τ, Σφ', ok); y holds the mask at τ when ``write``."""
    n = x.shape[0]
    logit_k = math.log(k / (n - k)) if 0 < k < n else 0.0  # (the exponential families' steps only: k is inside)
    for it in range(max_iter + 1):
        s, d = _sweep(fam, x, rt, tau, y, write)
        resid = s - k
        if abs(resid) <= tol:
            return tau, d, True
        if it == max_iter:
            break
        new, lo, hi = _next(fam, s, d, k, n, logit_k, tau, lo, hi)
        if new == tau:
            break
        tau = new
    return tau, d, False


@numba.njit(inline="always")
def _window(x, rt, a, b, kept):
    """The entries of x that can be strictly inside (0, 1) of a sparse family's mask for some τ in [a, b], copied
    into ``kept`` (in the row's order, found 32 at a time by vector comparisons), and how many entries are at 1 for
    every such τ: (m, above); m = -1 when more than ``len(kept)`` - 32 entries are in the window. The bounds on x
    are float32 numbers with a margin: x < lo_x gives x rt <= a (the mask 0) and x >= hi_x gives x rt >= b + 1 (the
    mask 1) in float64, whatever the roundings; the entries between the margins are kept and computed exactly."""
    n = x.shape[0]
    pad = 1e-5 * max(1.0, abs(a), abs(b + 1.0))
    lo_x = np.float32((a - pad) / rt)
    hi_x = np.float32((b + 1.0 + pad) / rt)
    cap = kept.shape[0] - 32
    m = 0
    above = 0
    whole = n - n % 32
    for start in range(0, whole, 32):
        above += _count_ge32(x, start, hi_x)
        bits = _bits_in32(x, start, lo_x, hi_x)
        while bits != 0:
            kept[m] = x[start + _lowest_bit(bits)]
            m += 1
            bits &= bits - 1
        if m > cap:
            return -1, 0
    for i in range(whole, n):
        v = x[i]
        above += v >= hi_x
        kept[m] = v
        m += (v >= lo_x) & (v < hi_x)
    return m, above


@numba.njit(inline="always")
def _window_sums(fam, kept, rt, tau, above):
    """(S, Σφ') at τ of a row whose entries outside ``kept`` are at 0 or at 1 (``above`` of them)."""
    s, d = _sweep(fam, kept, rt, tau, kept, False)
    return s + above, d


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _write_loop(fam, x, rt, tau, y):
    """:func:`_write_sparse` for one family (a constant once inlined: a loop without a branch on it)."""
    for i in range(x.shape[0]):
        c = min(max(x[i] * rt - tau, 0.0), 1.0)
        y[i] = c if fam == EUCLIDEAN else c * c * c


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _write_sparse(fam, x, rt, tau, y):
    """The mask of a sparse family at τ into y, in float64 as :func:`_sweep` computes it, without the sums (0.22
    against 0.27 ns per entry at n = 1000, p = 4/3)."""
    if fam == EUCLIDEAN:
        _write_loop(EUCLIDEAN, x, rt, tau, y)
    else:
        _write_loop(CUBIC, x, rt, tau, y)


@numba.njit(inline="always")
def _rank_value(a, j):
    """The j-th largest of a (1 <= j <= len(a)), by quickselect in place (:func:`_select_pair`)."""
    m = a.shape[0]
    if j >= m:
        return a.min() if j == m else -np.inf
    return _select_pair(a, j)[0] if j >= 1 else np.inf


_WINDOW_ROW = 256  # rows from this long take the sparse families' windows (shorter ones: the whole row each step)
_WINDOW_SAMPLED = 8192  # ... and with windows from a subsample from this long (two selections in it cost more below)
_WIDE = 4  # ... unless more than 1/_WIDE of the row is in the window (the steps over the row then cost as much)


@numba.njit(cache=True)
def _newton_window(fam, x, k, rt, start, a, b, lo, hi, tol, max_iter, y, buf):
    """:func:`_newton` for the sparse families (φ at 0 below z = 0 and at 1 above z = 1), each step over the entries
    of a window only: S(τ) on τ in [a, b] (:func:`_sparse_start`) is the count of entries at 1 throughout plus the
    sum over the entries that can be inside (0, 1) there (:func:`_window`: a few percent of the row at the usual
    temperatures). S at a and b says whether the root is in the window; if not, the next one, 8x wider, is centred
    at Newton's step from the end it passed (at most that far from it). One pass writes the mask at the end.
    Returns (τ, Σφ', lo, hi, status): status 0 converged, 1 not within ``max_iter``, 2 no window held the root or
    the window was wide (the caller then runs :func:`_newton` from τ on the bracket [lo, hi], narrowed by the
    windows that missed)."""
    n = x.shape[0]
    if not a <= b:  # (NaN: no window)
        return start, 0.0, lo, hi, 2
    kept = buf if n <= _WIDE * (buf.shape[0] - 32) else np.empty(n // _WIDE + 32, dtype=x.dtype)
    tau = start
    for _ in range(3):
        a = max(a, lo)
        b = min(b, hi)
        if not a <= b:
            break
        m, above = _window(x, rt, a, b, kept[: min(kept.shape[0], n // _WIDE + 32)])
        if m < 0:
            break  # a wide window: whole-row steps cost as much
        win = kept[:m]
        sa, da = _window_sums(fam, win, rt, a, above)
        sb, db = _window_sums(fam, win, rt, b, above)
        w = 8.0 * max(b - a, 1.0)
        if sa < k - tol:  # the root is below a: the next window around Newton's step from a, or further down
            hi = tau = a
            g = max(a - (k - sa) / da, a - w) if da > 0 else a - w
            a, b = g - 0.5 * w, g + 0.5 * w
            continue
        if sb > k + tol:  # ... above b
            lo = tau = b
            g = min(b + (sb - k) / db, b + w) if db > 0 else b + w
            a, b = g - 0.5 * w, g + 0.5 * w
            continue
        # the steps of :func:`_newton` on the window alone: its entries, and k less the entries at 1
        t, d, ok = _newton(fam, win, k - above, rt, min(max(start, a), b), a, b, tol, max_iter, win, False)
        # then Newton steps further while they shrink |S − k| (cheap here; exact for p = 2 once the entries inside
        # (0, 1) are the right ones; linear, ratio 2/3, for p = 4/3 where the root is at an entry's z = 0)
        if ok:
            s = _window_sums(fam, win, rt, t, above)[0]
            for _ in range(4):
                if not (d > 0 and abs(s - k) > 1e-3 * tol):
                    break
                t2 = t - (k - s) / d
                s2, d2 = _window_sums(fam, win, rt, t2, above)
                if not (a <= t2 <= b and abs(s2 - k) < abs(s - k)):
                    break
                t, s, d = t2, s2, d2
        _write_sparse(fam, x, rt, t, y)
        return t, d, a, b, 0 if ok else 1
    return tau, 0.0, lo, hi, 2


@numba.njit(inline="always")
def _newton_exp(fam, x, k, rt, tau, c, lo, hi, tol, max_iter, y, logit_k, s, d):
    """:func:`_newton` for the exponential families on the exponentials y = e^(u − c) of :func:`_exp_pass`: each
    step is a :func:`_sweep_exp` (one division per entry), the first one done by the exponential pass itself when τ
    starts at c (its S and Σφ' given). The mask is written at one Newton step past the first τ within tol, or by the
    sweep of a step expected to land far inside it (the exponentials are recomputed should it miss), so that Σy is
    about tol²/Σφ' from k rather than tol. Returns (τ, Σφ', ok, c), c the centre of the exponentials last used."""
    n = x.shape[0]
    write = False
    fresh = True  # y holds the exponentials (not a mask written by a sweep that missed)
    have = tau == c  # s and d are those at τ
    for it in range(max_iter + 1):
        if not fresh or abs(tau - c) > _RECENTRE:
            tau = c = _as_float32(tau)
            s, d = _exp_pass(fam, x, rt, c, y)[3:]
            fresh = have = True
            write = False  # this step's S comes from the exponential pass, which writes no mask
        scale = 1.0 if tau == c else math.exp(c - tau)
        if not have:
            s, d = _sweep_exp(fam, y, scale, write)
        have = False
        resid = s - k
        if abs(resid) <= tol:
            if not write:  # the mask one Newton step further (free: a pass writes it anyway), far inside tol
                step = resid / d if d > 0 else 0.0
                # ... a step within the transition's width only: where every entry is saturated, Σφ' is tiny and
                # the residual is the float32 rounding of the terms, whose quotient would throw τ far away
                if lo < tau + step < hi and abs(step) <= 1.0:
                    tau = tau + step
                _sweep_exp(fam, y, math.exp(c - tau), True)
            return tau, d, True, c
        fresh = not write
        if it == max_iter:
            break
        new, lo, hi = _next(fam, s, d, k, n, logit_k, tau, lo, hi)
        if new == tau:
            break
        # Newton's next residual is about resid² / Σφ': when that is far inside tol, the next sweep writes the mask
        write = resid * resid <= 0.01 * tol * d
        tau = new
    return tau, d, False, c


@numba.njit(cache=True)
def _fix_clipped(fam, x, rt, tau, c, y):
    """The mask at the entries whose exponential fell below e^-86 around c (stored as 0), exactly: below e^-46 (τ is
    within 40 of c), tiny but representable in float32 (or 0 where it underflows); called when τ is more than
    ``_FIX_BELOW`` below c."""
    for i in range(x.shape[0]):
        u = x[i] * rt
        if u - c < -_CLIP + 1e-3:  # a margin over the float32 test of the exponential pass
            e = math.exp(max(u - tau, -800.0))  # φ(z) = e^z / (1 + e^z) or e^z / 2, z < -46
            y[i] = e / (1.0 + e) if fam == SIGMOID else 0.5 * e


@numba.njit(inline="always")
def _order_pair(x, k, buf, pair):
    """(True, the k-th largest, the (k+1)-th) from ``pair`` when the caller has them, or for whole k <
    ``_SCAN_K``: in a long row those of the blocks' maxima (at most the row's own): as good a start (the row's own
    unless two of its top k + 1 share a block) for half the selection's cost; else (False, NaN, NaN)."""
    kk = int(k)
    if pair[0] > pair[1]:
        return True, pair[0], pair[1]
    if kk == k and 1 <= kk < _SCAN_K:
        a, b = _peak_pair(x, kk, buf) if x.shape[0] >= _SHORT * (kk + 1) else _top_pair(x, kk, buf)
        return True, np.float64(a), np.float64(b)
    return False, np.nan, np.nan


@numba.njit(inline="always")
def _sample_start(fam, x, k, rt, sample):
    """(τ, m, stride): the threshold of the same problem on a strided subsample of about ``_SAMPLE`` entries
    (left in sample[:m], in some order), solved loosely from the midpoint of its order statistics around rank k."""
    n = x.shape[0]
    stride = max(1, n // _SAMPLE)
    m = (n + stride - 1) // stride
    sub = sample[:m]
    slo = np.inf
    shi = -np.inf
    for j in range(m):
        v = x[j * stride]
        sub[j] = v
        slo = min(slo, v)
        shi = max(shi, v)
    ks = min(max(k * m / n, 1e-3), m - 1e-3)
    rank = min(max(int(ks), 1), m - 1)
    a, b = _select_pair(sub[:m].copy(), rank)
    tau = 0.5 * (a + b) * rt - _phi_inv_half(fam)
    if stride > 1 and math.isfinite(tau) and math.isfinite(slo) and math.isfinite(shi):
        zs = _phi_inv(fam, ks / m)  # the sample's own bracket, as the row's in _solve_row
        tau = _newton(fam, sub, ks, rt, tau, slo * rt - zs, shi * rt - zs, 1e-3 * max(ks, 1.0), 30, sub, False)[0]
    return tau, m, stride


@numba.njit(inline="always")
def _start(fam, x, k, rt, buf, sample, pair):
    """A first τ: the midpoint of the order statistics around rank k (exact for small k or when the caller has
    them in ``pair``, see :func:`_order_pair`; else :func:`_sample_start`). NaN or ±inf only for a non-finite row."""
    ok, a, b = _order_pair(x, k, buf, pair)
    if ok:
        return 0.5 * (a + b) * rt - _phi_inv_half(fam)
    return _sample_start(fam, x, k, rt, sample)[0]


@numba.njit(cache=True)
def _sparse_start(fam, x, k, rt, buf, sample, pair):
    """(τ0, a, b): :func:`_start`'s τ0 for the sparse families, and a window [a, b] of τ that holds the root surely
    or with high probability. Every sparse φ is in [0, 1], at 0 for z <= 0 and at 1 for z >= 1, so that the root
    of S(τ) = k is in [u_(⌊k⌋+1) − 1, u_(⌈k⌉)] (u = x rt, u_(j) the j-th largest): from the k-th and (k+1)-th
    largest of :func:`_order_pair` (the block maxima's are at or below the row's: b can then fall short), else from
    the subsample's order statistics 4 sqrt(r + 1) + 2 ranks either side of the rank r expected there (exact when
    the subsample is the row; :func:`_sampled_window`). (NaN, NaN) for no window: a row sampled shorter than
    ``_WINDOW_SAMPLED``, or a wide one. NaN or ±inf only for a non-finite row."""
    ok, a, b = _order_pair(x, k, buf, pair)
    if ok:
        return 0.5 * (a + b) * rt - _phi_inv_half(fam), b * rt - 1.0, a * rt
    tau, m, stride = _sample_start(fam, x, k, rt, sample)
    if stride > 1 and x.shape[0] < _WINDOW_SAMPLED:
        return tau, np.nan, np.nan
    a, b = _sampled_window(sample[:m], k * m / x.shape[0], stride == 1, rt)
    return tau, a, b


@numba.njit(cache=True)
def _sampled_window(sub, r, exact, rt):
    """:func:`_sparse_start`'s window from the subsample ``sub`` (the row itself when ``exact``), r the expected rank
    there of the row's k-th largest; (NaN, NaN) when more than 1/``_WIDE`` of the subsample is in its entries."""
    m = sub.shape[0]
    spread = 0.0 if exact else 4.0 * math.sqrt(r + 1.0) + 2.0
    hi_x = _rank_value(sub, math.ceil(r - spread))  # (1-based ranks: one below 1 gives +inf, one past m -inf)
    lo_x = _rank_value(sub, math.floor(r + spread) + 1)
    a, b = lo_x * rt - 1.0, hi_x * rt
    inside = 0
    for j in range(m):
        u = sub[j] * rt
        inside += (u >= a) & (u < b + 1.0)
    return (a, b) if inside * _WIDE < m else (np.nan, np.nan)


@numba.njit(cache=True)
def _solve_row(fam, x, k, rt, tol, max_iter, y, buf, sample, pair):
    """(τ, Σφ', status) of one row, its mask in y; status 0 done, 1 for the reference. ``pair``: the k-th and
    (k+1)-th largest when the caller has them (a straight-through call), else (NaN, NaN)."""
    n = x.shape[0]
    exponential = fam == SIGMOID or fam == LAPLACE
    inner = 0.0 < k < n
    s = d = 0.0
    if exponential and inner and _MAX_START_K <= k < _SCAN_K and n <= 64 * k and not pair[0] > pair[1]:
        # k from 8 to 31 in a short row: selecting the order statistics (:func:`_short_pair`) costs more than the
        # two or three extra Newton steps from a start at the largest score (the smallest for k > n/2), where Newton
        # on log S is exact in the exponential tail (measured again with the ranking selection: still true).
        xmin, xmax, finite = _stats(x)
        tau = _as_float32((xmax if 2.0 * k <= n else xmin) * rt)
        centre = tau if math.isfinite(tau) else 0.0
        if finite:
            s, d = _exp_pass(fam, x, rt, centre, y)[3:]
    else:
        tau = a = b = np.nan  # (NaN or ±inf from a non-finite row, declined below)
        windowed = not exponential and n >= _WINDOW_ROW
        if inner and n >= 2:
            tau, a, b = _sparse_start(fam, x, k, rt, buf, sample, pair) if windowed else (
                _start(fam, x, k, rt, buf, sample, pair), np.nan, np.nan)  # fmt: skip
            tau = _as_float32(tau)
        centre = tau if math.isfinite(tau) else 0.0
        if exponential and inner:
            xmin, xmax, finite, s, d = _exp_pass(fam, x, rt, centre, y)
        else:
            xmin, xmax, finite = _stats(x)
    if not finite or max(abs(xmin), abs(xmax)) * rt > _BIG:
        return 0.0, 0.0, 1
    if not inner:  # k = 0 or n: the exact mask
        fill = 0.0 if k <= 0.0 else 1.0
        for i in range(n):
            y[i] = fill
        return 0.0, 0.0, 0
    logit_k = math.log(k / (n - k))
    # the bracket: φ⁻¹(k/n) from every score (k/n clipped so that the logarithms stay finite)
    zp = logit_k if fam == SIGMOID and 1e-30 < k / n < 1.0 - 1e-7 else _phi_inv(fam, min(max(k / n, 1e-30), 1.0 - 1e-7))
    lo = xmin * rt - zp
    hi = xmax * rt - zp
    start = min(max(tau, lo), hi) if math.isfinite(tau) else 0.5 * lo + 0.5 * hi
    tol = tol * max(k, 1.0)
    if exponential:
        tau, d, ok, centre = _newton_exp(fam, x, k, rt, start, centre, lo, hi, tol, max_iter, y, logit_k, s, d)
        if ok and xmin * rt - centre < -_CLIP and centre - tau > _FIX_BELOW:
            _fix_clipped(fam, x, rt, tau, centre, y)
    elif windowed:
        tau, d, ok = _solve_sparse(fam, x, k, rt, start, a, b, lo, hi, tol, max_iter, y, buf)
    else:
        tau, d, ok = _newton(fam, x, k, rt, start, lo, hi, tol, max_iter, y, True)
    return tau, d, 0 if ok else 1


@numba.njit(cache=True)
def _solve_sparse(fam, x, k, rt, start, a, b, lo, hi, tol, max_iter, y, buf):
    """:func:`_solve_row`'s steps for the sparse families in rows from ``_WINDOW_ROW`` long: on the window [a, b]
    (:func:`_newton_window`), or over the row (:func:`_newton`) where it is not taken. (A function of its own:
    inside :func:`_solve_row`, this code cost every family's rows of 8 entries 20%, measured.)"""
    tau, d, lo, hi, status = _newton_window(fam, x, k, rt, start, a, b, lo, hi, tol, max_iter, y, buf)
    if status != 2:
        return tau, d, status == 0
    return _newton(fam, x, k, rt, min(max(tau, lo), hi), lo, hi, tol, max_iter, y, True)


@numba.njit(parallel=True, cache=True)
def forward(fam, rows, n, x_at, k, rt, tol, max_iter, y_at, tau_at, hard_at, n_lanes):
    """Rows of x (R, n) float32: the mask into y (R, n) and τ (in units of t) into tau (R,). k and rt float64, (R,)
    or (1,) (one value for every row). ``hard`` (R, n): the exact top-k mask as well (the forward of a
    straight-through call, k whole), whose k-th and (k+1)-th largest then start the solve, written after it: ``y``
    may then be ``hard`` itself (scratch for the solve; the backward is then :func:`backward_z`), and the rows with
    k = 0 or n get τ = NaN. 0 for none. x, y, tau and hard are given by address (:func:`_rows_at`). Returns the
    numbers of rows left to the reference: masks, and hard masks (a tie at the k-th value, where the choice of
    entries is ``torch.topk``'s)."""
    x, y, hard = _rows_at(x_at, rows, n), _rows_at(y_at, rows, n), _rows_at(hard_at, rows, n if hard_at else 0)
    tau = _f64s_at(tau_at, (rows,))
    k_step = 1 if k.shape[0] > 1 else 0
    rt_step = 1 if rt.shape[0] > 1 else 0
    want_hard = hard.shape[1] == n
    declined = 0
    declined_hard = 0
    for lane in numba.prange(n_lanes):
        buf = np.empty(_BUF, dtype=x.dtype)
        sample = np.empty(2 * _WINDOW_SAMPLE + 2, dtype=x.dtype)
        pair = np.full(2, np.nan)
        mine = 0
        mine_hard = 0
        for r in range(lane * rows // n_lanes, (lane + 1) * rows // n_lanes):
            kr = k[r * k_step]
            if want_hard:
                mine_hard += _hard_pair(x[r], int(kr), buf, sample, pair)
            tau[r], _, status = _solve_row(fam, x[r], kr, rt[r * rt_step], tol, max_iter, y[r], buf, sample, pair)
            mine += status
            if want_hard:  # (after the solve: a row longer than the cache is then still there for the solve)
                mine_hard += _hard_write(x[r], int(kr), hard[r], pair)
                tau[r] = tau[r] if 0 < kr < n else np.nan
        declined += mine
        declined_hard += mine_hard
    return declined, declined_hard


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _dphi(fam, v):
    """φ' written through the float32 mask value v = φ(z) (0 where v is 0 or 1), in float32 arithmetic (1 − v is
    exact for v in [1/2, 1])."""
    one = np.float32(1.0)
    if fam == SIGMOID:
        return v * (one - v)
    if fam == LAPLACE:
        return min(v, one - v)
    if fam == EUCLIDEAN:
        return one if (v > np.float32(0.0) and v < one) else np.float32(0.0)
    return np.float32(3.0) * v ** np.float32(2.0 / 3.0) if v < one else np.float32(0.0)


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _dphi_z(fam, y, x, rt, tau):
    """φ' at z = x rt − τ: from the mask value y (see :func:`_dphi`), except for p = 4/3, whose φ' = 3 clip(z, 0, 1)²
    is cheaper from z than from y (y^(2/3) is a scalar pow). ``_CUBIC32`` (rows with |τ| <= ``_F32_RANGE``): z in
    float32, one FMA with rt and τ split into float32 pairs (absolute error 1e-7 on the z in (0, 1) that count; twice
    as fast as ``CUBIC``, z in float64)."""
    zero, one = np.float32(0.0), np.float32(1.0)
    if fam == CUBIC:  # 0 where the mask is 0 or 1 (also in the rows with k = 0 or n, whose τ is not solved)
        c = min(max(x * rt - tau, 0.0), 1.0)
        return np.float32(3.0 * c * c) if (y > zero and y < one) else zero
    if fam == _CUBIC32:
        rt_hi, tau_hi = np.float32(rt), np.float32(tau)  # (loop invariants, hoisted)
        rt_lo, tau_lo = np.float32(rt - np.float64(rt_hi)), np.float32(tau - np.float64(tau_hi))
        c = min(max(_fma32(x, rt_hi, -tau_hi) + (x * rt_lo - tau_lo), zero), one)
        return np.float32(3.0) * c * c if (y > zero and y < one) else zero
    return _dphi(fam, y)


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _backward_loops(fam, y, g, rt, x, tau, gx, need_t):
    """:func:`_backward_row` for one family, inlined with ``fam`` a constant, so that the loops have no branch on it
    and vectorise (3x faster than a loop that tests ``fam`` at every entry). The per-entry products in float32 (the
    gradient's own precision), the sums by blocks (``_BLOCK``; Σ g φ' to 7.6e-6 of Σ |g φ'|): three times as fast
    as float64 throughout."""
    n = y.shape[0]
    num = 0.0
    den = 0.0
    for start in range(0, n, _BLOCK):
        yb = y[start : start + _BLOCK]
        gb = g[start : start + _BLOCK]
        xb = x[start : start + _BLOCK]
        nb = db = np.float32(0.0)
        for i in range(yb.shape[0]):
            p = _dphi_z(fam, yb[i], xb[i], rt, tau)
            nb += gb[i] * p
            db += p
        num += np.float64(nb)
        den += np.float64(db)
    gbar = num / den if den > 0.0 else 0.0
    gbar32, rt32 = np.float32(gbar), np.float32(rt)
    for i in range(n):
        gx[i] = _dphi_z(fam, y[i], x[i], rt, tau) * (g[i] - gbar32) * rt32
    return gbar, _z_dot(x, rt, tau, gx) if need_t else 0.0


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _z_dot(x, rt, tau, gx):
    """Σ z gx with z = x rt − τ: −∂L/∂t · t of a row (the backward's temperature gradient)."""
    zg = 0.0
    for i in range(x.shape[0]):
        zg += (x[i] * rt - tau) * gx[i]
    return zg


@numba.njit(inline="always")
def _constant_row(gx):
    """gx = 0 for a straight-through row with k = 0 or n, whose τ :func:`forward` leaves NaN (a constant mask); the
    row's (ḡ, Σ z gx) = (0, 0)."""
    for i in range(gx.shape[0]):
        gx[i] = 0.0
    return 0.0, 0.0


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _backward_row(fam, y, g, rt, x, tau, gx, need_t):
    """One row of :func:`backward`; returns (ḡ, Σ z gx) (the latter 0 unless ``need_t``)."""
    if not math.isfinite(tau):
        return _constant_row(gx)
    if fam == SIGMOID:
        return _backward_loops(SIGMOID, y, g, rt, x, tau, gx, need_t)
    if fam == LAPLACE:
        return _backward_loops(LAPLACE, y, g, rt, x, tau, gx, need_t)
    if fam == EUCLIDEAN:
        return _backward_loops(EUCLIDEAN, y, g, rt, x, tau, gx, need_t)
    if abs(tau) <= _F32_RANGE:
        return _backward_loops(_CUBIC32, y, g, rt, x, tau, gx, need_t)
    return _backward_loops(CUBIC, y, g, rt, x, tau, gx, need_t)


@numba.njit(parallel=True, cache=True)
def backward(fam, rows, n, y_at, g_at, rt, x_at, tau_at, gx_at, gkt_at, need_t, n_lanes):
    """The implicit backward of :func:`forward`, row by row: with d = φ'(z) rt on 0 < y < 1,
    gx = d (g − ḡ), ḡ = Σ g d / Σ d (= gk), and gt = −Σ z gx when ``need_t``. x (R, n) the scores; rt (R,) or
    (1,). A row whose τ is NaN gets gx = 0. y, g, x, gx (R, n), tau (R,) and (gk, gt) (2, R) by address
    (:func:`_rows_at`; gkt_at 0 for none)."""
    y, g, x, gx = _rows_at(y_at, rows, n), _rows_at(g_at, rows, n), _rows_at(x_at, rows, n), _rows_at(gx_at, rows, n)
    tau, gkt = _f64s_at(tau_at, (rows,)), _f64s_at(gkt_at, (2, rows if gkt_at else 0))
    rt_step = 1 if rt.shape[0] > 1 else 0
    for lane in numba.prange(n_lanes):
        for r in range(lane * rows // n_lanes, (lane + 1) * rows // n_lanes):
            gk, zg = _backward_row(fam, y[r], g[r], rt[r * rt_step], x[r], tau[r], gx[r], need_t)
            if gkt_at:
                gkt[0, r], gkt[1, r] = gk, -zg


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _backward_row_z(fam, g, rt, x, tau, gx, need_t):
    """:func:`_backward_row` with φ' from z = x rt − τ alone, no mask kept (a large straight-through call, see
    :func:`backward_z`): one loop for every family, φ' a weighted sum of the sigmoid's e^-|z| / (1 + e^-|z|)², the
    Laplace density's e^-|z| / 2 and the sparse ones' 1 or 3 z² on 0 < z < 1 (a loop per family, as
    :func:`_backward_loops` has, compiled four times as long). z in float32 as ``_CUBIC32`` has it; φ' kept in gx
    between the two loops (its exponential computed once)."""
    n = x.shape[0]
    zero, one = np.float32(0.0), np.float32(1.0)
    if not math.isfinite(tau):
        return _constant_row(gx)
    w_sig = one if fam == SIGMOID else zero
    w_lap = np.float32(0.5) if fam == LAPLACE else zero
    w_one = one if fam == EUCLIDEAN else zero
    w_cub = np.float32(3.0) if fam == CUBIC else zero
    rt_hi, tau_hi = np.float32(rt), np.float32(tau)
    rt_lo, tau_lo = np.float32(rt - np.float64(rt_hi)), np.float32(tau - np.float64(tau_hi))
    num = 0.0
    den = 0.0
    for start in range(0, n, _BLOCK):
        gb = g[start : start + _BLOCK]
        xb = x[start : start + _BLOCK]
        pb = gx[start : start + _BLOCK]
        nb = db = zero
        for i in range(xb.shape[0]):
            z = _fma32(xb[i], rt_hi, -tau_hi) + (xb[i] * rt_lo - tau_lo)
            e = _exp32(-abs(z))  # in (0, 1]: no overflow
            r = one / (one + e)
            p = e * (w_sig * r * r + w_lap) + (w_one + w_cub * z * z if (z > zero and z < one) else zero)
            pb[i] = p
            nb += gb[i] * p
            db += p
        num += np.float64(nb)
        den += np.float64(db)
    gbar = num / den if den > 0.0 else 0.0
    gbar32, rt32 = np.float32(gbar), np.float32(rt)
    for i in range(n):
        gx[i] = gx[i] * (g[i] - gbar32) * rt32
    return gbar, _z_dot(x, rt, tau, gx) if need_t else 0.0


@numba.njit(parallel=True, cache=True)
def backward_z(fam, rows, n, g_at, rt, x_at, tau_at, gx_at, gkt_at, need_t, n_lanes):
    """:func:`backward` with φ' from z (:func:`_backward_row_z`): for a straight-through :func:`forward` whose ``y``
    was its ``hard`` (no soft mask kept). Compiled at its first call (a large straight-through call)."""
    g, x, gx = _rows_at(g_at, rows, n), _rows_at(x_at, rows, n), _rows_at(gx_at, rows, n)
    tau, gkt = _f64s_at(tau_at, (rows,)), _f64s_at(gkt_at, (2, rows if gkt_at else 0))
    rt_step = 1 if rt.shape[0] > 1 else 0
    for lane in numba.prange(n_lanes):
        for r in range(lane * rows // n_lanes, (lane + 1) * rows // n_lanes):
            gk, zg = _backward_row_z(fam, g[r], rt[r * rt_step], x[r], tau[r], gx[r], need_t)
            if gkt_at:
                gkt[0, r], gkt[1, r] = gk, -zg


# ----------------------------------------------------------------------------------------------------------------
# Selection: the hard top-k mask, and DFTopK, y = σ((x − τ)/t) with τ the midpoint of the k-th and (k+1)-th largest.
# ----------------------------------------------------------------------------------------------------------------
@numba.njit(cache=True)
def _window_pair(x, k, sample):
    """The k-th and (k+1)-th largest of a long row x (1 <= k < n): a strided sample of about ``_WINDOW_SAMPLE``
    entries (every ``_WINDOW_STRIDE``-th at least) brackets both in a window [lo, hi] of a few percent of the row
    (the window's ends selected in the sample); one pass counts the entries above hi and copies those inside into a
    scratch array (by vector comparisons, 32 entries at a time); quickselect finishes in the window. The whole row
    is selected instead when the bracket misses (rare). The scratch array is the row's size (only the window is
    touched, unless the bracket misses) and lives for this row only, so that a call holds one per thread at most."""
    n = x.shape[0]
    scratch = np.empty_like(x)
    stride = max(_WINDOW_STRIDE, n // _WINDOW_SAMPLE)
    m = (n + stride - 1) // stride
    for j in range(m):
        sample[j] = x[j * stride]
    r = k * m / n  # the expected rank of x_(k) in the sample
    half = 4.0 * math.sqrt(r + 1.0) + 2.0
    j_lo = math.ceil(r + half)  # 1-based sample ranks of the window's ends
    j_hi = math.floor(r - half)
    hi = _select_pair(sample[:m], j_hi)[0] if j_hi >= 1 else np.inf  # (selection: sorting the sample cost 50 µs)
    lo = (_select_pair(sample[:m], j_lo)[0] if j_lo < m else sample[:m].min()) if j_lo <= m else -np.inf
    above = 0
    w = 0
    whole = n - n % 32
    for start in range(0, whole, 32):  # 32 entries at a time: a vector comparison, then only the window's entries
        if hi < np.inf:
            above += _count_gt32(x, start, hi)
        bits = _bits_ge32(x, start, lo)
        while bits != 0:
            v = x[start + _lowest_bit(bits)]
            scratch[w] = v
            w += v <= hi
            bits &= bits - 1
    for i in range(whole, n):  # (the tail without branches)
        v = x[i]
        above += v > hi
        scratch[w] = v
        w += (v >= lo) & (v <= hi)
    rank = k - above
    if 1 <= rank < w:
        return _select_pair(scratch[:w], rank)
    for i in range(n):
        scratch[i] = x[i]
    return _select_pair(scratch[:n], k)


@numba.njit(cache=True)
def _pair(x, k, buf, sample):
    """The k-th and (k+1)-th largest of x (1 <= k < n): by :func:`_top_pair` (small k), by quickselect on a copy
    (short rows), or in a sampled window (:func:`_window_pair`)."""
    n = x.shape[0]
    if k < _SCAN_K:
        return _top_pair(x, k, buf)
    if n <= _WINDOW_MIN_N:
        return _select_pair(x.copy(), k)
    return _window_pair(x, k, sample)


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _hard_row(x, a, out):
    """out = 1 where x >= a, else 0, 32 entries at a time (:func:`_hard32`); returns how many entries that selects,
    plus ``_NAN_COUNT`` for each block of 32 (and each entry of the tail) that holds a NaN: a row with a NaN then
    never selects k entries, and its callers decline it."""
    n = x.shape[0]
    whole = n - n % 32
    count = 0
    for s in range(0, whole, 32):
        count += _hard32(x, out, s, a)
    for i in range(whole, n):
        v = x[i]
        hit = v >= a
        out[i] = 1.0 if hit else 0.0
        count += hit + (_NAN_COUNT if v != v else 0)
    return count


@numba.njit(cache=True)
def _hard_pair(x, k, buf, sample, pair):
    """The k-th and (k+1)-th largest of the row x into ``pair``: (NaN, NaN) for k = 0 or n, and where they are equal
    (a tie: the mask is then ``torch.topk``'s to choose), which returns 1, else 0."""
    pair[0] = pair[1] = np.nan
    if k <= 0 or k >= x.shape[0]:
        return 0
    a, b = _pair(x, k, buf, sample)
    if not a > b:
        return 1
    pair[0] = a
    pair[1] = b
    return 0


@numba.njit(cache=True)
def _hard_write(x, k, out, pair):
    """The exact top-k mask of the row x into out from :func:`_hard_pair`'s ``pair``; returns 1 where it has none
    (a tie) or the mask does not hold k entries, else 0."""
    n = x.shape[0]
    if k <= 0 or k >= n:
        fill = 0.0 if k <= 0 else 1.0
        for i in range(n):
            out[i] = fill
        return 0
    return 0 if pair[0] > pair[1] and _hard_row(x, pair[0], out) == k else 1


@numba.njit(parallel=True, cache=True)
def hard_forward(rows, n, x_at, k, out_at, n_lanes):
    """The exact top-k mask of each row of x (R, n) float32 into out (both by address, :func:`_rows_at`); k int64
    (R,) or (1,). Returns the number of rows with a tie at the k-th largest value (x_(k) = x_(k+1)), where the
    choice of entries is ``torch.topk``'s, or a NaN (:func:`_hard_row`): the caller then takes torch's mask for the
    call."""
    x, out = _rows_at(x_at, rows, n), _rows_at(out_at, rows, n)
    k_step = 1 if k.shape[0] > 1 else 0
    declined = 0
    for lane in numba.prange(n_lanes):
        buf = np.empty(_BUF, dtype=x.dtype)
        sample = np.empty(2 * _WINDOW_SAMPLE + 2, dtype=x.dtype)
        pair = np.empty(2)
        mine = 0
        for r in range(lane * rows // n_lanes, (lane + 1) * rows // n_lanes):
            kr = k[r * k_step]
            mine += _hard_pair(x[r], kr, buf, sample, pair) or _hard_write(x[r], kr, out[r], pair)
        declined += mine
    return declined


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _sigmoid_row(x, tau, rt, y, va, vb, locate):
    """y = σ((x − τ) rt) in float32 arithmetic, as the torch path computes it (the exponential of −z clipped to ±86,
    by :func:`_exp_reduced`: relative error 2e-7); returns whether the row is finite and, when ``locate``, how
    many entries equal va or vb (2 when neither value is tied) and the first indices of va and vb (n if absent);
    else (0, n, n) for those (LLVM unswitches the loop on ``locate``: the lean loop is 1.5x faster)."""
    n = x.shape[0]
    xi = x.view(np.int32)
    ties = 0
    top = np.int32(0)
    ia = ib = n
    tau32 = np.float32(tau)
    rt32 = np.float32(rt)
    for i in range(n):
        v = x[i]
        if locate:
            ties += (v == va) + (v == vb)
            ia = min(ia, i if v == va else n)
            ib = min(ib, i if v == vb else n)
        top = max(top, xi[i] & 0x7F800000)
        y[i] = _sigmoid32(v, tau32, rt32)
    return top != 0x7F800000, ties, ia, ib


@numba.njit(inline="always", fastmath=_FAST, error_model="numpy")
def _sigmoid32(v, tau32, rt32):
    """σ((v − τ) rt) = 1 / (1 + e^(−z)) in float32 arithmetic (see :func:`_sigmoid_row`)."""
    w = min(max((tau32 - v) * rt32, np.float32(-_CLIP)), np.float32(_CLIP)) * np.float32(_LOG2E)
    m = np.int32(w + np.float32(127.5)) - np.int32(127)
    p = _exp_reduced((w - np.float32(m)) * np.float32(_LN2))
    return np.float32(1.0) / (np.float32(1.0) + _float32_of_bits((m + 127) << 23) * p)


@numba.njit(inline="always")
def _locate(x, va, vb):
    """How many entries of x equal va or vb, and the first index of each (n if absent)."""
    n = x.shape[0]
    ties = 0
    ia = ib = n
    for i in range(n - 1, -1, -1):  # backwards: the first index of each value is the last one seen
        v = x[i]
        ties += (v == va) + (v == vb)
        ia = i if v == va else ia
        ib = i if v == vb else ib
    return ties, ia, ib


@numba.njit(inline="always")
def _dftopk_pair(x, k, buf, sample, at):
    """(va, vb, ties, ia, ib, found) for DFTopK: the k-th and (k+1)-th largest of the row, and, when ``found``,
    how many entries equal either (2 when neither is tied) and the first index of each, read off the few entries
    :func:`_block_kept` keeps (the rows it selects in); else those are left to :func:`_sigmoid_row`."""
    n = x.shape[0]
    if not (k < _SCAN_K and n > 16 and n >= _SHORT * (k + 1)):
        va, vb = _pair(x, k, buf, sample)
        return va, vb, 0, n, n, False
    va, vb, q = _block_kept(x, k, buf, at)
    if q < 0:
        return va, vb, 0, n, n, False
    ties, ja, jb = _locate(buf[_KEPT_AT : _KEPT_AT + q], va, vb)  # kept in the row's order: first is first
    return va, vb, ties, _kept_index(x, at, ja, q, va), _kept_index(x, at, jb, q, vb), True


@numba.njit(inline="always")
def _kept_index(x, at, j, q, v):
    """The row index of the j-th entry :func:`_block_kept` kept (value v; n when j = q: none): ``at[j]``, or the
    position of v in the block -1 - at[j] when only that block's maximum was kept."""
    n = x.shape[0]
    if j >= q:
        return n
    if at[j] >= 0:
        return at[j]
    width = _block_width(n)
    start = (-1 - at[j]) * width
    for i in range(start, start + width):
        if x[i] == v:
            return i
    return n


@numba.njit(parallel=True, cache=True)
def dftopk_forward(rows, n, x_at, k, rt, y_at, tau_at, iab_at, n_lanes):
    """Rows of x (R, n) float32, k int64 in [1, n) and rt = 1/t float64, each (R,) or (1,): the mask σ((x − τ) rt)
    into y, τ into tau (R,) and the indices of the k-th and (k+1)-th largest into (ia, ib) (2, R) int64, all four
    by address (:func:`_rows_at`). Returns the number of rows the reference must do (a non-finite entry, or a tie at
    the k-th or (k+1)-th value, where the choice of index is torch's)."""
    x, y = _rows_at(x_at, rows, n), _rows_at(y_at, rows, n)
    tau, iab = _f64s_at(tau_at, (rows,)), _i64s_at(iab_at, (2, rows))
    ia, ib = iab[0], iab[1]
    k_step = 1 if k.shape[0] > 1 else 0
    rt_step = 1 if rt.shape[0] > 1 else 0
    declined = 0
    for lane in numba.prange(n_lanes):
        buf = np.empty(_BUF, dtype=x.dtype)
        sample = np.empty(2 * _WINDOW_SAMPLE + 2, dtype=x.dtype)
        at = np.empty(_KEPT, dtype=np.int32)
        mine = 0
        first, last = lane * rows // n_lanes, (lane + 1) * rows // n_lanes
        if n <= _TINY_N and rt_step == 0:  # short rows, one temperature: the sigmoid over the lane's rows at once
            for r in range(first, last):
                va, vb = _top_pair(x[r], k[r * k_step], buf)
                ties, ia[r], ib[r] = _locate(x[r], va, vb)
                tau[r] = 0.5 * (np.float64(va) + np.float64(vb))
                y[r, :] = np.float32(tau[r])
                mine += 0 if ties == 2 and math.isfinite(tau[r]) else 1
            mine += 0 if _sigmoid_block(x[first:last].reshape(-1), rt[0], y[first:last].reshape(-1)) else 1
        else:
            for r in range(first, last):
                va, vb, ties, ia[r], ib[r], found = _dftopk_pair(x[r], k[r * k_step], buf, sample, at)
                tau[r] = 0.5 * (np.float64(va) + np.float64(vb))
                finite, t2, i2, j2 = _sigmoid_row(x[r], tau[r], rt[r * rt_step], y[r], va, vb, not found)
                if not found:
                    ties, ia[r], ib[r] = t2, i2, j2
                mine += 0 if finite and ties == 2 and math.isfinite(tau[r]) else 1
        declined += mine
    return declined


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _sigmoid_block(x, rt, y):
    """y = σ((x − τ) rt) over a flat block of rows, y holding each entry's τ (float32) on entry, as
    :func:`_sigmoid_row` computes it; returns whether every entry is finite. One vectorised loop over the block,
    where a loop per row of 8 entries runs scalar (DFTopK's forward kernel at 4096 × 8: 1.9x as fast)."""
    xi = x.view(np.int32)
    top = np.int32(0)
    rt32 = np.float32(rt)
    for i in range(x.shape[0]):
        top = max(top, xi[i] & 0x7F800000)
        y[i] = _sigmoid32(x[i], y[i], rt32)
    return top != 0x7F800000


@numba.njit(cache=True, fastmath=_FAST, error_model="numpy")
def _dftopk_backward_row(y, g, rt, x, tau, gx):
    """gx = s with s = g y (1 − y) rt; returns (Σ s, Σ s z) with z = (x − τ) rt (0 when x is empty)."""
    n = y.shape[0]
    total = 0.0
    for i in range(n):
        v = np.float64(y[i])
        s = g[i] * v * (1.0 - v) * rt
        gx[i] = s
        total += s
    sz = 0.0
    if x.shape[0] == n:
        for i in range(n):
            sz += gx[i] * ((x[i] - tau) * rt)
    return total, sz


@numba.njit(parallel=True, cache=True)
def dftopk_backward(rows, n, y_at, g_at, rt, x_at, tau_at, iab_at, gx_at, gt_at, n_lanes):
    """The backward of :func:`dftopk_forward`: gx = s − (Σ s)(e_a + e_b)/2, s = g σ'(z) rt; gt (R,) = −Σ s z when x
    (R, n) is given (x_at and gt_at 0 otherwise). Arrays by address, as :func:`dftopk_forward` has them. Rows of up
    to ``_TINY_N`` entries with one temperature and no gt get s in one loop over many rows (a loop per row of 8 runs
    scalar: 2.8x as fast at 4096 × 8)."""
    y, g, gx = _rows_at(y_at, rows, n), _rows_at(g_at, rows, n), _rows_at(gx_at, rows, n)
    x = _rows_at(x_at, rows, n if x_at else 0)
    tau, iab, gt = _f64s_at(tau_at, (rows,)), _i64s_at(iab_at, (2, rows)), _f64s_at(gt_at, (rows if gt_at else 0,))
    ia, ib = iab[0], iab[1]
    rt_step = 1 if rt.shape[0] > 1 else 0
    for lane in numba.prange(n_lanes):
        first, last = lane * rows // n_lanes, (lane + 1) * rows // n_lanes
        block = n <= _TINY_N and rt_step == 0 and x.shape[1] == 0  # as in the forward: s of many rows in one loop
        if block:
            flat = gx[first:last].reshape(-1)
            _dftopk_backward_row(y[first:last].reshape(-1), g[first:last].reshape(-1), rt[0], x[0], 0.0, flat)
        for r in range(first, last):
            if block:
                total, sz = 0.0, 0.0
                for j in range(n):
                    total += gx[r, j]
            else:
                total, sz = _dftopk_backward_row(y[r], g[r], rt[r * rt_step], x[r], tau[r], gx[r])
            gx[r, ia[r]] -= 0.5 * total
            gx[r, ib[r]] -= 0.5 * total
            if gt_at:
                gt[r] = -sz
