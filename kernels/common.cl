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
#ifndef CE_EXP2
#define CE_EXP2 0           // 1: exp(x) as exp2(x log2 e) (cheaper in PoCL's vector math)
#endif

#if IN_DTYPE == 3 || GRAD_DTYPE == 3
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif

#if IN_DTYPE == 3 || GRAD_DTYPE == 3
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
#endif

/* ---- accumulation type ---- */
#if IN_DTYPE == 3
typedef double acc_t;
typedef double8 acc8_t;
#define ACC_INF ((double)INFINITY)
#else
typedef float acc_t;
typedef float8 acc8_t;
#define ACC_INF INFINITY
#endif

/* ---- exp and log ---- */
#if CE_NATIVE_EXP && IN_DTYPE != 3
#define EXP(x) native_exp(x)
#define LOG(x) native_log(x)
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
#define LOAD1(p, i) vload_half(0, (p) + (i))
#define LOAD8(p, i) half8_to_float8(vload8(0, (__global const ushort *)((p) + (i))))
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
/* element-wise: vstore_half8 shares vload_half8's alignment fault on PoCL */
inline void store_half8(__global half *p, float8 v) {
    vstore_half_rte(v.s0, 0, p); vstore_half_rte(v.s1, 1, p); vstore_half_rte(v.s2, 2, p);
    vstore_half_rte(v.s3, 3, p); vstore_half_rte(v.s4, 4, p); vstore_half_rte(v.s5, 5, p);
    vstore_half_rte(v.s6, 6, p); vstore_half_rte(v.s7, 7, p);
}
#define STORE8(p, i, v) store_half8((p) + (i), convert_float8(v))
#elif GRAD_DTYPE == 2
typedef ushort grad_t;
#define STORE1(p, i, v) ((p)[(i)] = f32_to_bf16((float)(v)))
#define STORE8(p, i, v) vstore8(f32_to_bf16_8(convert_float8(v)), 0, (p) + (i))
#elif GRAD_DTYPE == 3
typedef double grad_t;
#define STORE1(p, i, v) ((p)[(i)] = (double)(v))
#define STORE8(p, i, v) vstore8(convert_double8(v), 0, (p) + (i))
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
