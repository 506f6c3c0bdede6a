/* ============================================================================================
 * common.cl — the preamble shared by clce's fused kernels: element types, the accumulation type,
 * exp/log, and the vector loads and stores of every input and gradient dtype. Prepended to
 * cross_entropy.cl by clce_server/device.py; kernel shapes live there, not here.
 *
 * Half types: fp16 is read by hand-widening its bits (see LOAD8) and written with
 * vstore_half_rte; bf16 travels as ushort bits. All math is in float (double for fp64 input).
 * ============================================================================================ */

#ifndef IN_DTYPE
#define IN_DTYPE 0          // logits / soft targets: 0 float32, 1 float16, 2 bfloat16, 3 float64
#endif
#ifndef GRAD_DTYPE
#define GRAD_DTYPE IN_DTYPE // gradient, same codes
#endif
#ifndef CE_NATIVE_EXP
#define CE_NATIVE_EXP 0     // 1: native_exp / native_log (faster on some GPUs, less exact)
#endif
#ifndef CE_WIDE_STORE
#define CE_WIDE_STORE 0     // 1: 16-wide stores as one unaligned vector store (see VSTORE16_U)
#endif
#ifndef CE_EXP2
#define CE_EXP2 0           // 1: exp(x) as exp2(x log2 e) (cheaper in PoCL's vector math)
#endif
#ifndef CE_FAST_EXP
#define CE_FAST_EXP 0       // 1: float exp inline, Cody-Waite + degree-6 polynomial (see fast_exp)
#endif

#ifndef CE_FMA
#define CE_FMA 0            // 1: fast_exp's polynomial in fma (the device has it in hardware: CL_FP_FMA)
#endif

#if IN_DTYPE == 3 || GRAD_DTYPE == 3
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif

/* ---- accumulation type ---- */
#if IN_DTYPE == 3
typedef double acc_t;
typedef double8 acc8_t;
typedef double16 acc16_t;
#define ACC_INF ((double)INFINITY)
#else
typedef float acc_t;
typedef float8 acc8_t;
typedef float16 acc16_t;
#define ACC_INF INFINITY
#endif

/* ---- exp and log ---- */
/* fast_exp: exp(x) = 2^n 2^f with y = x log2 e, n = y rounded to nearest, f = y - n in [-1/2, 1/2].
 * Adding 1.5 * 2^23 + 127 rounds y and leaves n + 127 in the float's low mantissa bits, so a
 * shift builds 2^n; 2^f is a degree-5 polynomial fitted for relative error (1.8e-7, ~1.5 ulp,
 * measured in fp32 Horner). Only multiply-adds, compares and integer ops, so it stays in
 * registers and vectorises at any width. The Horner steps are mad(), which PoCL compiles as a
 * multiply and an add, or with CE_FMA fma(), one instruction each (device.py sets it where the
 * device's fp32 has a fused multiply-add: ~4-7% off ce_rows_item at 2048x32000 on PoCL; the tests
 * check both); PoCL's exp2 cost 1.4x as much, measured alone on PoCL 3.1. Domain: the
 * kernels only exponentiate differences <= 0 (y <= 127 suffices): NaN -> NaN, y < -127 -> 0
 * (-inf included; no subnormals). Rounding y costs up to |x| 1.3e-7 relative, as exp2(x log2 e)
 * did; near 0, where the kernels need it, ~2 ulp (tests/cross_entropy/test_kernels_common.py). */
#if CE_FMA
#define EXP_MAD fma
#else
#define EXP_MAD mad
#endif
#define FAST_EXP(F, AS_I, AS_F, x)                                                              \
    const F y = (x) * (F)M_LOG2E_F;                                                             \
    const F t = y + (F)12583039.0f;                 /* 1.5 * 2^23 + 127 */                      \
    const F f = y - (t - (F)12583039.0f);                                                       \
    F p = EXP_MAD((F)1.3218673411756754e-3f, f, (F)9.671699255704880e-3f);                      \
    p = EXP_MAD(p, f, (F)5.550893023610115e-2f);                                                \
    p = EXP_MAD(p, f, (F)2.402223795652390e-1f);                                                \
    p = EXP_MAD(p, f, (F)6.931468844413757e-1f);                                                \
    p = EXP_MAD(p, f, (F)1.0f);                                                                 \
    const F r = p * AS_F(AS_I(t) << 23);
inline float __attribute__((overloadable)) fast_exp(float x) {
    FAST_EXP(float, as_int, as_float, x)
    return y < -127.0f ? 0.0f : r;
}
inline float8 __attribute__((overloadable)) fast_exp(float8 x) {
    FAST_EXP(float8, as_int8, as_float8, x)
    return select(r, (float8)0.0f, y < (float8)-127.0f);
}
inline float16 __attribute__((overloadable)) fast_exp(float16 x) {
    FAST_EXP(float16, as_int16, as_float16, x)
    return select(r, (float16)0.0f, y < (float16)-127.0f);
}

#if CE_NATIVE_EXP && IN_DTYPE != 3
#define EXP(x) native_exp(x)
#define LOG(x) native_log(x)
#elif CE_FAST_EXP && IN_DTYPE != 3
#define EXP(x) fast_exp(x)
#define LOG(x) log(x)
#elif CE_EXP2 && IN_DTYPE != 3
/* exp(x) = exp2(x log2 e): about 30% cheaper in PoCL's vector math; relative error ~|x| 6e-8 */
#define EXP(x) exp2((x) * (acc_t)M_LOG2E_F)
#define LOG(x) log(x)
#else
#define EXP(x) exp(x)
#define LOG(x) log(x)
#endif

/* ---- loads (input and soft targets share the input's storage type) ---- */
#if IN_DTYPE == 0
typedef float in_t;
#define LOAD1(p, i) ((acc_t)(p)[(i)])
#define LOAD8(p, i) vload8(0, (p) + (i))
#elif IN_DTYPE == 1
/* PoCL 3.1's vload_half8 faults on addresses that are not 16-byte aligned (rows of an odd number
 * of classes), so eight halves are read as ushort8 and widened by hand: shifting the exponent and
 * mantissa into place and scaling by 2^112 rebiases normals and subnormals alike; Inf/NaN keep an
 * all-ones exponent. */
typedef half in_t;
inline float8 half8_to_float8(ushort8 h) {
    uint8 u = convert_uint8(h);
    uint8 em = u & (uint8)0x7fffu;
    float8 f = as_float8(em << 13) * (float8)0x1p112f;
    f = select(f, as_float8((em << 13) | (uint8)0x7f800000u), em >= (uint8)0x7c00u);
    return as_float8(as_uint8(f) | ((u & (uint8)0x8000u) << 16));
}
inline float16 half16_to_float16(ushort16 h) {
    uint16 u = convert_uint16(h);
    uint16 em = u & (uint16)0x7fffu;
    float16 f = as_float16(em << 13) * (float16)0x1p112f;
    f = select(f, as_float16((em << 13) | (uint16)0x7f800000u), em >= (uint16)0x7c00u);
    return as_float16(as_uint16(f) | ((u & (uint16)0x8000u) << 16));
}
#define LOAD1(p, i) vload_half(0, (p) + (i))
#define LOAD8(p, i) half8_to_float8(vload8(0, (__global const ushort *)((p) + (i))))
#define LOAD16_(p, i) half16_to_float16(vload16(0, (__global const ushort *)((p) + (i))))
#elif IN_DTYPE == 2
typedef ushort in_t;
#define LOAD1(p, i) as_float(((uint)(p)[(i)]) << 16)
#define LOAD8(p, i) as_float8(convert_uint8(vload8(0, (p) + (i))) << 16)
#elif IN_DTYPE == 3
typedef double in_t;
#define LOAD1(p, i) ((p)[(i)])
#define LOAD8(p, i) vload8(0, (p) + (i))
#endif

/* ---- gradient stores ---- */
/* VSTORE16_U(v, p): v (a 16-vector) to p, which need only be aligned to its element. PoCL 3.1's
 * vstore16 and vstore8 write in 16- and 32-byte pieces (three stores for one AVX-512 register,
 * measured in ce_rows_item's hot loops); a pointer to an under-aligned vector type lets the
 * compiler emit one unaligned store. CE_WIDE_STORE 0 keeps vstore16 (other compilers). */
#if CE_WIDE_STORE
typedef float float16_u __attribute__((ext_vector_type(16), aligned(4)));
typedef ushort ushort16_u __attribute__((ext_vector_type(16), aligned(2)));
#if IN_DTYPE == 3 || GRAD_DTYPE == 3
typedef double double16_u __attribute__((ext_vector_type(16), aligned(8)));
#define VSTORE16_U_double16(v, p) (*(__global double16_u *)(p) = (v))
#endif
#define VSTORE16_U_float16(v, p) (*(__global float16_u *)(p) = (v))
#define VSTORE16_U_ushort16(v, p) (*(__global ushort16_u *)(p) = (v))
#define VSTORE16_U(T, v, p) VSTORE16_U_##T(v, p)
#else
#define VSTORE16_U(T, v, p) vstore16(v, 0, p)
#endif

inline ushort f32_to_bf16(float f) {
    uint b = as_uint(f);
    /* round to nearest even; NaN stays a quiet NaN instead of rounding into Inf */
    return isnan(f) ? (ushort)0x7FC0 : (ushort)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
inline ushort8 f32_to_bf16_8(float8 f) {
    uint8 b = as_uint8(f);
    uint8 r = (b + (uint8)0x7FFFu + ((b >> 16) & (uint8)1u)) >> 16;
    return convert_ushort8(select(r, (uint8)0x7FC0u, as_uint8(isnan(f))));
}

#if GRAD_DTYPE == 0
typedef float grad_t;
#define STORE1(p, i, v) ((p)[(i)] = (float)(v))
#define STORE8(p, i, v) vstore8(convert_float8(v), 0, (p) + (i))
#elif GRAD_DTYPE == 1
typedef half grad_t;
#define STORE1(p, i, v) vstore_half_rte((float)(v), 0, (p) + (i))
/* vstore_half8 shares vload_half8's alignment fault on PoCL, and element-wise vstore_half_rte
 * costs a call per element, so vectors are rounded to half bits by hand, to nearest even:
 * normals rebias the exponent (127 -> 15) and round the 13 dropped bits; subnormals add 0.5,
 * whose ulp (2^-24) is the half subnormal quantum, so the float adder rounds them; past 65504
 * is inf; NaN stays a quiet NaN. Bit-exact against numpy (tests/cross_entropy/test_kernels_common.py). */
#define F32_TO_HALF(N)                                                                          \
    inline ushort##N f32_to_half##N(float##N f) {                                               \
        const uint##N b = as_uint##N(f), a = b & (uint##N)0x7fffffffu;                          \
        uint##N h = (a - (uint##N)0x38000000u + (uint##N)0xfffu + ((a >> 13) & (uint##N)1u)) >> 13; \
        const uint##N sub = as_uint##N(as_float##N(a) + (float##N)0.5f) - (uint##N)0x3f000000u; \
        h = select(h, sub, a < (uint##N)0x38800000u);                                           \
        h = select(h, (uint##N)0x7c00u, a >= (uint##N)0x477ff000u);                             \
        h = select(h, (uint##N)0x7e00u, a > (uint##N)0x7f800000u);                              \
        return convert_ushort##N(h | ((b >> 16) & (uint##N)0x8000u));                           \
    }
F32_TO_HALF(8)
F32_TO_HALF(16)
#define STORE8(p, i, v) vstore8(f32_to_half8(convert_float8(v)), 0, (__global ushort *)((p) + (i)))
#define STORE16_(p, i, v) vstore16(f32_to_half16(convert_float16(v)), 0, (__global ushort *)((p) + (i)))
#elif GRAD_DTYPE == 2
typedef ushort grad_t;
#define STORE1(p, i, v) ((p)[(i)] = f32_to_bf16((float)(v)))
#define STORE8(p, i, v) vstore8(f32_to_bf16_8(convert_float8(v)), 0, (p) + (i))
#elif GRAD_DTYPE == 3
typedef double grad_t;
#define STORE1(p, i, v) ((p)[(i)] = (double)(v))
#define STORE8(p, i, v) vstore8(convert_double8(v), 0, (p) + (i))
#endif

/* sixteen-wide: one access for float and bf16, two eight-wide halves otherwise */
#if IN_DTYPE == 0
#define LOAD16(p, i) vload16(0, (p) + (i))
#elif IN_DTYPE == 2
#define LOAD16(p, i) as_float16(convert_uint16(vload16(0, (p) + (i))) << 16)
#elif IN_DTYPE == 1
#define LOAD16(p, i) LOAD16_(p, i)
#else
#define LOAD16(p, i) ((acc16_t)(LOAD8(p, i), LOAD8(p, (i) + 8)))
#endif
#if GRAD_DTYPE == 2
/* the high halves of sixteen words, by one word shuffle rather than a shift and a narrowing
 * pack (~13% of a bf16 gradient's kernel time at 2048x32000) */
#ifdef __ENDIAN_LITTLE__
#define HIGH_HALVES16(r) ((ushort16)(as_ushort16((r).lo).odd, as_ushort16((r).hi).odd))
#else
#define HIGH_HALVES16(r) ((ushort16)(as_ushort16((r).lo).even, as_ushort16((r).hi).even))
#endif
inline ushort16 f32_to_bf16_16(float16 f) {
    uint16 b = as_uint16(f);
    uint16 r = b + (uint16)0x7FFFu + ((b >> 16) & (uint16)1u);
    return HIGH_HALVES16(select(r, (uint16)0x7FC00000u, as_uint16(isnan(f))));
}
#define STORE16(p, i, v) VSTORE16_U(ushort16, f32_to_bf16_16(convert_float16(v)), (p) + (i))
/* for values known not to be NaN (then the rounding alone is right, infinities included) */
inline ushort16 f32_to_bf16_16_nonan(float16 f) {
    uint16 b = as_uint16(f);
    return HIGH_HALVES16(b + (uint16)0x7FFFu + ((b >> 16) & (uint16)1u));
}
#define STORE16_NONAN(p, i, v) VSTORE16_U(ushort16, f32_to_bf16_16_nonan(convert_float16(v)), (p) + (i))
#elif GRAD_DTYPE == 1
#define STORE16 STORE16_
#elif GRAD_DTYPE == 0
#define STORE16(p, i, v) VSTORE16_U(float16, convert_float16(v), (p) + (i))
#else
#define STORE16(p, i, v) do { acc16_t v16_ = (v); STORE8(p, i, v16_.lo); STORE8(p, (i) + 8, v16_.hi); } while (0)
#endif

/* ---- horizontal reductions of a vector ---- */
inline acc_t hmax8(acc8_t v) {
#if IN_DTYPE == 3
    double4 a = fmax(v.lo, v.hi); double2 b = fmax(a.lo, a.hi); return fmax(b.lo, b.hi);
#else
    float4 a = fmax(v.lo, v.hi); float2 b = fmax(a.lo, a.hi); return fmax(b.lo, b.hi);
#endif
}
inline acc_t hsum8(acc8_t v) {
#if IN_DTYPE == 3
    double4 a = v.lo + v.hi; double2 b = a.lo + a.hi; return b.lo + b.hi;
#else
    float4 a = v.lo + v.hi; float2 b = a.lo + a.hi; return b.lo + b.hi;
#endif
}
inline acc_t hmax16(acc16_t v) { return hmax8(fmax(v.lo, v.hi)); }
inline acc_t hsum16(acc16_t v) { return hsum8(v.lo + v.hi); }
