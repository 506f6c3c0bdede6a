/* ============================================================================================
 * gemm.cl — register-tiled general matrix multiply for the fused linear cross-entropy
 *
 *     C = alpha * A . B + beta * C        A (M x K), B (K x N), C (M x N) float32, fp32 accumulation
 *
 * Layouts: B is row-major with its N elements contiguous (row stride ldb); A and C take any
 * strides (sam/sak, scm/scn), so one kernel serves the three products of clce_server/linear.py:
 *
 *   forward    logits^T (V x n) = W (V x H) . h^T (H x n)     A = W, B = the chunk's hidden
 *              transposed (small), C strides (1, V): stored into the (n x V) logits chunk
 *   backward   dh (n x H)  = dlogits (n x V) . W (V x H)       A = dlogits, B = W
 *              dW (V x H) += dlogits^T (V x n) . h (n x H)     A strides (1, V), B = h
 *
 * Each work-item owns a macro-tile of GEMM_MB x GEMM_NB micro-tiles; a micro-tile is GEMM_MR
 * rows by GEMM_NV vectors of GEMM_VW columns (the BLIS micro-kernel: an outer product per k, the
 * accumulators in registers, A broadcast one scalar at a time, B read one vector at a time). K
 * is walked in blocks of GEMM_KC. Per block the work-item packs its B panel (GEMM_KC x GEMM_NB
 * micro-tile columns) into private memory: contiguous, converted to fp32 once, columns past N
 * zero. Read in place, the panel's rows sit ldb apart, and at linear.py's ldb (H, a multiple of
 * 1024 floats) all of them fall into one L1 set: the panel never stayed in L1 (BLIS packs B for
 * the same reason). Then, micro-tile row by micro-tile row, the GEMM_NB micro-tiles reuse the
 * row's A sliver (GEMM_MR x GEMM_KC) from L1. Between K blocks the partial sums go through C.
 * The order of additions is fixed by the tunables alone, so results are the same bits run to run.
 *
 * Edges: rows past M are handled by a last micro-tile shifted up to end at row M (its rows
 * before the tile's own are not stored); columns past N are zero in the panel and not stored.
 *
 * Types (build defines): GEMM_A_DTYPE, GEMM_B_DTYPE, 0 float32, 1 float16 or 2 bfloat16 (bf16
 * travels as ushort bits; fp16 is read with vload_half, core OpenCL: no cl_khr_fp16 needed). Tunables are set per device and per product in clce_server/gemm.py's
 * GEMM_TUNING; the defaults were measured on PoCL's CPU device (bench/bench_gemm.py).
 * ============================================================================================ */

#ifndef GEMM_MR
#define GEMM_MR 12          // rows of a micro-tile (A scalars broadcast per k)
#endif
#ifndef GEMM_NV
#define GEMM_NV 2           // vectors per micro-tile row (accumulators: GEMM_MR * GEMM_NV vectors)
#endif
#ifndef GEMM_VW
#define GEMM_VW 16          // vector width: 8 or 16 (16: one AVX-512 register)
#endif
#ifndef GEMM_MB
#define GEMM_MB 32          // micro-tiles per work-item along M, sharing its B panel per K block
#endif
#ifndef GEMM_NB
#define GEMM_NB 4           // micro-tiles per work-item along N, sharing a row's A sliver in L1
                            // (private panel: GEMM_KC * GEMM_NB * GEMM_NV * GEMM_VW floats)
#endif
#ifndef GEMM_ROWS_FIRST
#define GEMM_ROWS_FIRST 0   // 1: launch dimension 0 walks row tiles (PoCL hands out consecutive
#endif                      //    work-groups along dimension 0 to a thread)
#ifndef GEMM_KC
#define GEMM_KC 512         // K block
#endif
#ifndef GEMM_A_DTYPE
#define GEMM_A_DTYPE 0
#endif
#ifndef GEMM_B_DTYPE
#define GEMM_B_DTYPE 0
#endif

#define GEMM_CAT_(a, b) a##b
#define GEMM_CAT(a, b) GEMM_CAT_(a, b)
typedef GEMM_CAT(float, GEMM_VW) vec_t;
#define VLOADW GEMM_CAT(vload, GEMM_VW)
#define VSTOREW GEMM_CAT(vstore, GEMM_VW)
#define NR (GEMM_NV * GEMM_VW)
#define NT (GEMM_NB * NR)    // columns of a work-item's tile
#define AG ((GEMM_MR + 2) / 3)   // A row pointers of a micro-tile (micro_tile)

#if GEMM_A_DTYPE == 2
typedef ushort a_t;
#define LOAD_A(p, i) as_float(((uint)(p)[(i)]) << 16)
#elif GEMM_A_DTYPE == 1
typedef half a_t;
#define LOAD_A(p, i) vload_half((i), (p))
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
#elif GEMM_B_DTYPE == 1
typedef half b_t;
#define LOAD_B1(p, i) vload_half((i), (p))
#define LOAD_BV(p, i) GEMM_CAT(vload_half, GEMM_VW)(0, (p) + (i))
#else
typedef float b_t;
#define LOAD_B1(p, i) ((p)[(i)])
#define LOAD_BV(p, i) VLOADW(0, (p) + (i))
#endif


/* The work-item's B panel for one K block: panel[k][v] = B[k0 + k, n0 + v * VW ..] as fp32,
 * columns past N zero (`full`: none are). */
inline __attribute__((always_inline)) void load_panel(vec_t panel[GEMM_KC][GEMM_NB * GEMM_NV], __global const b_t *B,
                                                      const long ldb, const uint N, const uint n0,
                                                      const uint k0, const uint k1, const bool full) {
    __global const b_t *brow = B + (long)k0 * ldb + n0;
    for (uint k = 0; k < k1 - k0; k++) {
        if (full) {
            _Pragma("unroll") for (int v = 0; v < GEMM_NB * GEMM_NV; v++)
                panel[k][v] = LOAD_BV(brow, v * GEMM_VW);
        } else {
            for (int v = 0; v < GEMM_NB * GEMM_NV; v++) {
                float t[GEMM_VW];
                for (int j = 0; j < GEMM_VW; j++)
                    t[j] = n0 + v * GEMM_VW + j < N ? LOAD_B1(brow, v * GEMM_VW + j) : 0.0f;
                panel[k][v] = VLOADW(0, t);
            }
        }
        brow += ldb;
    }
}

/* One micro-tile over one K block: acc[r][v] = sum_k A[m0 + r, k0 + k] panel[k][nb * NV + v]. */
inline __attribute__((always_inline)) void micro_tile(vec_t acc[GEMM_MR][GEMM_NV], __global const a_t *A,
                                                      const long rs, const long sak,
                                                      vec_t panel[GEMM_KC][GEMM_NB * GEMM_NV], const int nb,
                                                      const uint k0, const uint k1) {
    _Pragma("unroll") for (int r = 0; r < GEMM_MR; r++)
        _Pragma("unroll") for (int v = 0; v < GEMM_NV; v++)
            acc[r][v] = (vec_t)0.0f;
    /* A pointer per three rows stepping along k, the rows at 0, rs, 2 rs from it (x86 reaches
     * those with one scaled index register). A pointer per row spilled out of the sixteen
     * general registers (measured: half the speed at GEMM_MR = 6); a single pointer with the rows
     * at r * rs became a chain of GEMM_MR dependent adds carried from k to k (slightly slower). */
    __global const a_t *ap[AG];
    _Pragma("unroll") for (int g = 0; g < AG; g++)
        ap[g] = A + (long)k0 * sak + 3 * g * rs;
    for (uint k = 0; k < k1 - k0; k++) {
        _Pragma("unroll") for (int r = 0; r < GEMM_MR; r++) {
            const vec_t a = (vec_t)LOAD_A(ap[r / 3], (r % 3) * rs);
            _Pragma("unroll") for (int v = 0; v < GEMM_NV; v++)
                acc[r][v] = fma(a, panel[k][nb * GEMM_NV + v], acc[r][v]);
        }
        _Pragma("unroll") for (int g = 0; g < AG; g++)
            ap[g] += sak;
    }
}

/* Rows [m0 + r0, m0 + r1) of the tile into C: C = alpha * acc + (first ? beta * C : C); a zero
 * factor never reads C (NaN in C stays out). Rows of C contiguous (scn = 1) and the tile inside
 * N: whole vectors, the same arithmetic. */
inline __attribute__((always_inline)) void store_tile(vec_t acc[GEMM_MR][GEMM_NV], __global float *C,
                                                      const long scm, const long scn, const uint N,
                                                      const uint m0, const int r0, const int r1, const uint n0,
                                                      const float alpha, const float beta, const bool first,
                                                      const bool full) {
    const float keep = first ? beta : 1.0f;
    if (full && scn == 1) {
        _Pragma("unroll") for (int r = 0; r < GEMM_MR; r++) {
            if (r < r0 || r >= r1)
                continue;
            __global float *row = C + (long)(m0 + r) * scm + n0;
            _Pragma("unroll") for (int v = 0; v < GEMM_NV; v++) {
                const vec_t old = keep != 0.0f ? keep * VLOADW(v, row) : (vec_t)0.0f;
                VSTOREW(old + acc[r][v] * alpha, v, row);
            }
        }
        return;
    }
    _Pragma("unroll") for (int r = 0; r < GEMM_MR; r++) {
        if (r < r0 || r >= r1)
            continue;
        _Pragma("unroll") for (int v = 0; v < GEMM_NV; v++) {
            float t[GEMM_VW];
            VSTOREW(acc[r][v] * alpha, 0, t);
            __global float *row = C + (long)(m0 + r) * scm;
            for (int j = 0; j < GEMM_VW; j++) {
                const uint n = n0 + v * GEMM_VW + j;
                if (n < N) {
                    const float old = keep != 0.0f ? keep * row[(long)n * scn] : 0.0f;
                    row[(long)n * scn] = old + t[j];
                }
            }
        }
    }
}

/* One work-item: GEMM_MB x GEMM_NB micro-tiles from row mt0 and column n0, over all of K, one
 * K block at a time (the partial sums go through C between blocks). The panel is on the stack:
 * gemm.py launches work-groups of one work-item, since PoCL lays out one copy of every private
 * array per work-item of a group. A tile that would run past
 * M starts at M - GEMM_MR instead (its rows all inside A) and stores only its rows from mt0 on;
 * with M < GEMM_MR each row runs alone (stride 0: the tile's rows all read that row). */
inline __attribute__((always_inline)) void macro_tile(const uint M, const uint N, const uint K,
                                                      const float alpha, const float beta,
                                                      __global const a_t *A, const long sam, const long sak,
                                                      __global const b_t *B, const long ldb,
                                                      __global float *C, const long scm, const long scn,
                                                      const uint mt0, const uint n0, const bool full) {
    vec_t acc[GEMM_MR][GEMM_NV];
    vec_t panel[GEMM_KC][GEMM_NB * GEMM_NV];
    for (uint k0 = 0; k0 < max(K, 1u); k0 += GEMM_KC) {
        const uint k1 = min(K, k0 + GEMM_KC);
        load_panel(panel, B, ldb, N, n0, k0, k1, full);
        if (M < GEMM_MR) {
            for (uint m = mt0; m < M && m < mt0 + GEMM_MR * GEMM_MB; m++)
                for (int nb = 0; nb < GEMM_NB && n0 + nb * NR < N; nb++) {
                    micro_tile(acc, A + (long)m * sam, 0, sak, panel, nb, k0, k1);
                    store_tile(acc, C, scm, scn, N, m, 0, 1, n0 + nb * NR, alpha, beta, k0 == 0, full);
                }
            continue;
        }
        for (int mb = 0; mb < GEMM_MB; mb++) {
            const uint m0 = mt0 + mb * GEMM_MR;
            if (m0 >= M)
                break;
            const uint start = min(m0, M - GEMM_MR);
            for (int nb = 0; nb < GEMM_NB && n0 + nb * NR < N; nb++) {
                micro_tile(acc, A + (long)start * sam, sam, sak, panel, nb, k0, k1);
                store_tile(acc, C, scm, scn, N, start, m0 - start, GEMM_MR, n0 + nb * NR, alpha, beta, k0 == 0, full);
            }
        }
    }
}

__kernel void gemm(const uint M, const uint N, const uint K, const float alpha, const float beta,
                   __global const a_t *A, const ulong a_off, const long sam, const long sak,
                   __global const b_t *B, const ulong b_off, const long ldb,
                   __global float *C, const ulong c_off, const long scm, const long scn) {
    const uint n0 = get_global_id(GEMM_ROWS_FIRST ? 1 : 0) * NT;
    const uint mt0 = get_global_id(GEMM_ROWS_FIRST ? 0 : 1) * (GEMM_MR * GEMM_MB);
    if (n0 >= N || mt0 >= M)
        return;
    if (n0 + NT <= N)
        macro_tile(M, N, K, alpha, beta, A + a_off, sam, sak, B + b_off, ldb, C + c_off, scm, scn, mt0, n0, true);
    else
        macro_tile(M, N, K, alpha, beta, A + a_off, sam, sak, B + b_off, ldb, C + c_off, scm, scn, mt0, n0, false);
}

/* ---- the linear cross-entropy's two small helpers on devices with memory of their own ----
 * (on host-memory devices linear.py does both on the host arrays the kernels share) */

/* C[i, j] = bias[j] (bias of A's element type, e.g. the weight's), i < n, j < V: the forward
 * product then adds onto it (beta 1). One work-item per element, j fastest: coalesced. */
__kernel void bias_rows(const uint n, const uint V, __global const a_t *bias, __global float *C, const long ldc) {
    const uint j = get_global_id(0), i = get_global_id(1);
    if (j < V && i < n)
        C[(ulong)i * ldc + j] = LOAD_A(bias, j);
}

/* C[i, j] *= s[i], i < n, j < V: a per-row grad_output ('none') applied to a chunk's logit
 * gradient before the three products read it (so dh, dW and db are all scaled). */
__kernel void scale_rows(const uint n, const uint V, __global const float *s, __global float *C, const long ldc) {
    const uint j = get_global_id(0), i = get_global_id(1);
    if (j < V && i < n)
        C[(ulong)i * ldc + j] *= s[i];
}

#if defined(cl_khr_fp64)
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
/* out[j] += sum over i < n of (double)G[i * ldg + j], the rows added in order from 0: the same
 * bits as numpy's G.sum(axis=0, dtype=float64) added into out (linear.py's host path). One
 * work-item per column, j fastest: each row's read is coalesced. */
__kernel void column_sums(const uint n, const uint V, __global const float *G, const long ldg,
                          __global double *out) {
    const uint j = get_global_id(0);
    if (j >= V)
        return;
    double s = 0.0;
    for (uint i = 0; i < n; ++i)
        s += (double)G[(ulong)i * ldg + j];
    out[j] += s;
}
#endif

/* ---- gemm_local: work-group tiles in local memory, for GPUs ----------------------------------
 * The same product and arguments as `gemm` (a_off, strides, alpha, beta, bf16 A or B), shaped
 * for a GPU: a work-group of GEMM_WGN x GEMM_WGM work-items computes an LTM x LTN tile of C, each
 * work-item GEMM_WPM x GEMM_WPN of its outputs in registers, strided by the group's size (so
 * neighbouring work-items touch neighbouring columns: coalesced stores, no bank conflicts on
 * the local reads). K is walked in steps of GEMM_TK: the group copies the A (LTM x TK) and B
 * (TK x LTN) tiles into local memory cooperatively, converted to fp32 once, each global read
 * coalesced (B's rows are contiguous; A is read along whichever of its strides is 1), and the
 * outputs past M, N and K are zero. Every output is one fp32 sum over k in order: the same bits
 * run to run. Chosen by gemm.py's GEMM_TUNING (GEMM_LOCAL 1) on GPU rows; checked under Oclgrind
 * at GPU work-group sizes (tests/linear/test_gemm.py). */
#ifndef GEMM_LOCAL
#define GEMM_LOCAL 0        // 1: gemm.py launches gemm_local (a host-side choice; named here for the table)
#endif
#ifndef GEMM_WGM
#define GEMM_WGM 16         // work-items of a group along M
#endif
#ifndef GEMM_WGN
#define GEMM_WGN 16         // work-items of a group along N (launch dimension 0: the fast one)
#endif
#ifndef GEMM_WPM
#define GEMM_WPM 4          // outputs per work-item along M (registers: GEMM_WPM * GEMM_WPN)
#endif
#ifndef GEMM_WPN
#define GEMM_WPN 4          // outputs per work-item along N
#endif
#ifndef GEMM_TK
#define GEMM_TK 16          // K step: local memory GEMM_TK * (LTM + LTN) floats
#endif
#define LTM (GEMM_WGM * GEMM_WPM)
#define LTN (GEMM_WGN * GEMM_WPN)
#define LWG (GEMM_WGM * GEMM_WGN)

__kernel __attribute__((reqd_work_group_size(GEMM_WGN, GEMM_WGM, 1)))
void gemm_local(const uint M, const uint N, const uint K, const float alpha, const float beta,
                __global const a_t *A, const ulong a_off, const long sam, const long sak,
                __global const b_t *B, const ulong b_off, const long ldb,
                __global float *C, const ulong c_off, const long scm, const long scn) {
    __local float As[GEMM_TK][LTM];
    __local float Bs[GEMM_TK][LTN];
    const uint tn = get_local_id(0), tm = get_local_id(1);
    const uint lid = tm * GEMM_WGN + tn;
    const uint n0 = get_group_id(0) * LTN, m0 = get_group_id(1) * LTM;
    A += a_off;
    B += b_off;
    C += c_off;
    float acc[GEMM_WPM][GEMM_WPN];
    for (int i = 0; i < GEMM_WPM; i++)
        for (int j = 0; j < GEMM_WPN; j++)
            acc[i][j] = 0.0f;
    for (uint k0 = 0; k0 < K; k0 += GEMM_TK) {
        if (sak == 1) {            /* A's rows contiguous (W in the forward product): k fastest */
            for (uint i = lid; i < LTM * GEMM_TK; i += LWG) {
                const uint k = i % GEMM_TK, m = i / GEMM_TK;
                As[k][m] = (m0 + m < M && k0 + k < K) ? LOAD_A(A, (long)(m0 + m) * sam + (long)(k0 + k)) : 0.0f;
            }
        } else {                   /* A read transposed (dW: the logits' gradient): m fastest */
            for (uint i = lid; i < LTM * GEMM_TK; i += LWG) {
                const uint m = i % LTM, k = i / LTM;
                As[k][m] = (m0 + m < M && k0 + k < K) ? LOAD_A(A, (long)(m0 + m) * sam + (long)(k0 + k) * sak) : 0.0f;
            }
        }
        for (uint i = lid; i < LTN * GEMM_TK; i += LWG) {
            const uint n = i % LTN, k = i / LTN;
            Bs[k][n] = (n0 + n < N && k0 + k < K) ? LOAD_B1(B, (long)(k0 + k) * ldb + (n0 + n)) : 0.0f;
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        for (uint k = 0; k < GEMM_TK; k++) {
            float a[GEMM_WPM], b[GEMM_WPN];
            for (int i = 0; i < GEMM_WPM; i++)
                a[i] = As[k][tm + i * GEMM_WGM];
            for (int j = 0; j < GEMM_WPN; j++)
                b[j] = Bs[k][tn + j * GEMM_WGN];
            for (int i = 0; i < GEMM_WPM; i++)
                for (int j = 0; j < GEMM_WPN; j++)
                    acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
        barrier(CLK_LOCAL_MEM_FENCE);   /* the tiles are overwritten next step */
    }
    for (int i = 0; i < GEMM_WPM; i++) {
        const uint m = m0 + tm + i * GEMM_WGM;
        if (m >= M)
            continue;
        for (int j = 0; j < GEMM_WPN; j++) {
            const uint n = n0 + tn + j * GEMM_WGN;
            if (n < N) {
                __global float *c = C + (long)m * scm + (long)n * scn;
                *c = alpha * acc[i][j] + (beta != 0.0f ? beta * *c : 0.0f);   /* beta 0 never reads C */
            }
        }
    }
}
