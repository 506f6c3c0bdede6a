/* ============================================================================================
 * gemm.cl — register-tiled general matrix multiply for the fused linear cross-entropy
 *
 *     C = alpha * A . B + beta * C        A (M x K), B (K x N), C (M x N), fp32 accumulation
 *
 * Layouts: B is row-major with its N elements contiguous (row stride ldb); A and C take any
 * strides (sam/sak, scm/scn), so one kernel serves the three products of clce_server/linear.py:
 *
 *   forward    logits^T (V x n) = W (V x H) . h^T (H x n)     A = W, B = the chunk's hidden
 *              transposed (small), C strides (1, V): stored into the (n x V) logits chunk
 *   backward   dh (n x H)  = dlogits (n x V) . W (V x H)       A = dlogits, B = W
 *              dW (V x H) += dlogits^T (V x n) . h (n x H)     A strides (1, V), B = h
 *
 * Each work-item owns a macro-tile of GEMM_MB micro-tiles of GEMM_MR rows by one micro-tile of
 * GEMM_NV vectors of GEMM_VW columns (the BLIS micro-kernel: an outer product per k, the
 * accumulators in registers, A broadcast one scalar at a time, B read one vector at a time). K
 * is walked in blocks of GEMM_KC: within a block the work-item's B panel (GEMM_KC x GEMM_NV *
 * GEMM_VW) stays in L1 while its GEMM_MB micro-tiles pass over it; between blocks the partial
 * sums go through C (a bf16 C takes all of K in one block: its partial sums are not rounded).
 * The order of additions is fixed by the tunables alone, so results are the same bits run to run.
 *
 * Edges: rows past M load row M-1 and are not stored; columns past N load zeros (a guarded
 * path, taken only by the last column tile).
 *
 * Types (build defines): GEMM_A_DTYPE, GEMM_B_DTYPE, GEMM_C_DTYPE, 0 float32 or 2 bfloat16
 * (bf16 travels as ushort bits; stores round to nearest even). Tunables are set per device in
 * clce_server/device.py's GEMM_TUNING; the defaults were measured on PoCL's CPU device
 * (bench/bench_linear_ce.py --gemm).
 * ============================================================================================ */

#ifndef GEMM_MR
#define GEMM_MR 6           // rows of a micro-tile (A scalars broadcast per k)
#endif
#ifndef GEMM_NV
#define GEMM_NV 2           // vectors per micro-tile row (accumulators: GEMM_MR * GEMM_NV vectors)
#endif
#ifndef GEMM_VW
#define GEMM_VW 16          // vector width: 8 or 16 (16: one AVX-512 register)
#endif
#ifndef GEMM_MB
#define GEMM_MB 64          // micro-tiles per work-item along M, sharing one B panel per K block
#endif
#ifndef GEMM_KC
#define GEMM_KC 256         // K block
#endif
#ifndef GEMM_A_DTYPE
#define GEMM_A_DTYPE 0
#endif
#ifndef GEMM_B_DTYPE
#define GEMM_B_DTYPE 0
#endif
#ifndef GEMM_C_DTYPE
#define GEMM_C_DTYPE 0
#endif

#define GEMM_CAT_(a, b) a##b
#define GEMM_CAT(a, b) GEMM_CAT_(a, b)
typedef GEMM_CAT(float, GEMM_VW) vec_t;
#define VLOADW GEMM_CAT(vload, GEMM_VW)
#define VSTOREW GEMM_CAT(vstore, GEMM_VW)
#define NR (GEMM_NV * GEMM_VW)

#if GEMM_A_DTYPE == 2
typedef ushort a_t;
#define LOAD_A(p, i) as_float(((uint)(p)[(i)]) << 16)
#else
typedef float a_t;
#define LOAD_A(p, i) ((p)[(i)])
#endif

#if GEMM_B_DTYPE == 2
typedef ushort b_t;
#define LOAD_B1(p, i) as_float(((uint)(p)[(i)]) << 16)
#define LOAD_BV(p, i) as_float16(convert_uint16(vload16(0, (p) + (i))) << 16)
#if GEMM_VW == 8
#undef LOAD_BV
#define LOAD_BV(p, i) as_float8(convert_uint8(vload8(0, (p) + (i))) << 16)
#endif
#else
typedef float b_t;
#define LOAD_B1(p, i) ((p)[(i)])
#define LOAD_BV(p, i) VLOADW(0, (p) + (i))
#endif

#if GEMM_C_DTYPE == 2
typedef ushort c_t;
#define LOAD_C1(p, i) as_float(((uint)(p)[(i)]) << 16)
inline ushort gemm_f32_to_bf16(float f) {
    uint b = as_uint(f);
    return isnan(f) ? (ushort)0x7FC0 : (ushort)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
#define STORE_C1(p, i, v) ((p)[(i)] = gemm_f32_to_bf16(v))
#else
typedef float c_t;
#define LOAD_C1(p, i) ((p)[(i)])
#define STORE_C1(p, i, v) ((p)[(i)] = (v))
#endif

/* One micro-tile over one K block: acc[r][v] = sum_k A[m0 + r, k] B[k, n0 + v*VW ..]. `full`:
 * every column of the tile is inside N (a compile-time constant after inlining). */
inline __attribute__((always_inline)) void micro_tile(vec_t acc[GEMM_MR][GEMM_NV], __global const a_t *A,
                                                      const long rs, const long sak, __global const b_t *B,
                                                      const long ldb, const uint N, const uint n0,
                                                      const uint k0, const uint k1, const bool full) {
    _Pragma("unroll") for (int r = 0; r < GEMM_MR; r++)
        _Pragma("unroll") for (int v = 0; v < GEMM_NV; v++)
            acc[r][v] = (vec_t)0.0f;
    /* One pointer stepping along k, the rows at multiples of rs from it: a pointer per row
     * spilled out of the sixteen general registers (measured: half the speed at GEMM_MR = 6). */
    __global const a_t *ap = A + (long)k0 * sak;
    __global const b_t *brow = B + (long)k0 * ldb + n0;
    for (uint k = k0; k < k1; k++) {
        vec_t b[GEMM_NV];
        if (full) {
            _Pragma("unroll") for (int v = 0; v < GEMM_NV; v++)
                b[v] = LOAD_BV(brow, v * GEMM_VW);
        } else {
            _Pragma("unroll") for (int v = 0; v < GEMM_NV; v++) {
                float t[GEMM_VW];
                for (int j = 0; j < GEMM_VW; j++)
                    t[j] = n0 + v * GEMM_VW + j < N ? LOAD_B1(brow, v * GEMM_VW + j) : 0.0f;
                b[v] = VLOADW(0, t);
            }
        }
        _Pragma("unroll") for (int r = 0; r < GEMM_MR; r++) {
            const vec_t a = (vec_t)LOAD_A(ap, r * rs);
            _Pragma("unroll") for (int v = 0; v < GEMM_NV; v++)
                acc[r][v] = fma(a, b[v], acc[r][v]);
        }
        brow += ldb;
        ap += sak;
    }
}

/* Rows [m0 + r0, m0 + r1) of the tile into C: C = alpha * acc + (first ? beta * C : C); a zero
 * factor never reads C (NaN in C stays out). */
inline __attribute__((always_inline)) void store_tile(vec_t acc[GEMM_MR][GEMM_NV], __global c_t *C,
                                                      const long scm, const long scn, const uint N,
                                                      const uint m0, const int r0, const int r1, const uint n0,
                                                      const float alpha, const float beta, const bool first) {
    const float keep = first ? beta : 1.0f;
    _Pragma("unroll") for (int r = 0; r < GEMM_MR; r++) {
        if (r < r0 || r >= r1)
            continue;
        _Pragma("unroll") for (int v = 0; v < GEMM_NV; v++) {
            float t[GEMM_VW];
            VSTOREW(acc[r][v] * alpha, 0, t);
            __global c_t *row = C + (long)(m0 + r) * scm;
            for (int j = 0; j < GEMM_VW; j++) {
                const uint n = n0 + v * GEMM_VW + j;
                if (n < N) {
                    const float old = keep != 0.0f ? keep * LOAD_C1(row, (long)n * scn) : 0.0f;
                    STORE_C1(row, (long)n * scn, old + t[j]);
                }
            }
        }
    }
}

/* One work-item: GEMM_MB micro-tiles from row mt0, one column tile from n0, over all of K.
 * A tile that would run past M starts at M - GEMM_MR instead (its rows all inside A) and stores
 * only its rows from mt0 on; with M < GEMM_MR each row runs alone (stride 0: the tile's rows
 * all read that row). */
inline __attribute__((always_inline)) void macro_tile(const uint M, const uint N, const uint K,
                                                      const float alpha, const float beta,
                                                      __global const a_t *A, const long sam, const long sak,
                                                      __global const b_t *B, const long ldb,
                                                      __global c_t *C, const long scm, const long scn,
                                                      const uint mt0, const uint n0, const bool full) {
    vec_t acc[GEMM_MR][GEMM_NV];
    /* a bf16 C would round the partial sums between K blocks: one block then */
    const uint kc = GEMM_C_DTYPE == 2 ? max(K, 1u) : GEMM_KC;
    for (uint k0 = 0; k0 < max(K, 1u); k0 += kc) {
        const uint k1 = min(K, k0 + kc);
        if (M < GEMM_MR) {
            for (uint m = mt0; m < M && m < mt0 + GEMM_MR * GEMM_MB; m++) {
                micro_tile(acc, A + (long)m * sam, 0, sak, B, ldb, N, n0, k0, k1, full);
                store_tile(acc, C, scm, scn, N, m, 0, 1, n0, alpha, beta, k0 == 0);
            }
            continue;
        }
        for (int mb = 0; mb < GEMM_MB; mb++) {
            const uint m0 = mt0 + mb * GEMM_MR;
            if (m0 >= M)
                break;
            const uint start = min(m0, M - GEMM_MR);
            micro_tile(acc, A + (long)start * sam, sam, sak, B, ldb, N, n0, k0, k1, full);
            store_tile(acc, C, scm, scn, N, start, m0 - start, GEMM_MR, n0, alpha, beta, k0 == 0);
        }
    }
}

__kernel void gemm(const uint M, const uint N, const uint K, const float alpha, const float beta,
                   __global const a_t *A, const ulong a_off, const long sam, const long sak,
                   __global const b_t *B, const ulong b_off, const long ldb,
                   __global c_t *C, const ulong c_off, const long scm, const long scn) {
    const uint n0 = get_global_id(0) * NR;
    const uint mt0 = get_global_id(1) * (GEMM_MR * GEMM_MB);
    if (n0 >= N || mt0 >= M)
        return;
    if (n0 + NR <= N)
        macro_tile(M, N, K, alpha, beta, A + a_off, sam, sak, B + b_off, ldb, C + c_off, scm, scn, mt0, n0, true);
    else
        macro_tile(M, N, K, alpha, beta, A + a_off, sam, sak, B + b_off, ldb, C + c_off, scm, scn, mt0, n0, false);
}
