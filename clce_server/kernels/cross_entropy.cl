/* ============================================================================================
 * cross_entropy.cl — fused cross-entropy forward + backward, one launch, no softmax tensor.
 *
 * Rows: the input (N, C, d1..dk) is seen as R = N * S rows of C classes, S = d1*...*dk. Row r =
 * n*S + s starts at n*C*S + s and its classes are S apart (S == 1: contiguous rows, (N, C) input).
 * Every offset is 64-bit, so N*C beyond 2^31 works.
 *
 * For each row the kernel makes two passes over the logits:
 *   pass 1  softmax statistics: max m and s = sum_j exp(z_j - m), one exp per element, each
 *           exp parked (in the gradient row or a scratch row) for pass 2; soft targets also
 *           accumulate A = sum_j w_j y'_j here.
 *   pass 2  p_j from the parked exp (else exp(z_j - lse)), writes the gradient and accumulates
 *           the loss terms that need lse (the smoothing term, the soft-target term) without
 *           cancellation.
 * The second pass reads the row again, which on a CPU comes from cache for any realistic C.
 *
 * In place (ce_rows_item): `grad` may be `x` itself (the engine passes one buffer for both, and a
 * scratch row, so pass 1 parks its exps there). Every element is read before it is written:
 * pass 1 only reads, pass 2 reads z_j before it writes g_j, the true-class logit is read before
 * pass 2, an ignored row's lse before its zeros.
 *
 * Math (z = logits after the optional soft-cap, lse = log sum_j exp z_j, p = softmax(z),
 * eps = label smoothing, w = class weights (all ones when absent), W = sum_j w_j):
 *
 *   hard target t (aten LossNLL: (1-eps) * nll + eps/C * smooth):
 *     loss = (1-eps) w_t (lse - z_t) + eps/C * sum_j w_j (lse - z_j)
 *     dloss/dz_j = p_j [(1-eps) w_t + eps/C W] - (1-eps) w_t [j == t] - eps/C w_j
 *   soft target y (y' = (1-eps) y + eps/C):
 *     loss = sum_j w_j y'_j (lse - z_j)
 *     dloss/dz_j = p_j A - w_j y'_j,        A = sum_j w_j y'_j
 *   z-loss (PaLM, Liger-Kernel), for rows that are not ignored:
 *     zloss = c lse^2,   dzloss/dz_j = 2 c lse p_j
 *   soft-cap (Gemma): z = cap tanh(x / cap),   dz/dx = 1 - (z / cap)^2
 *
 * The reduction enters as two scales set by the host: loss_scale (1 / sum of w_t over the
 * non-ignored rows for 'mean', 1 otherwise) and z_scale (1 / number of non-ignored rows for
 * 'mean'). So the gradient is exactly d(reduced loss)/dx for grad_output = 1. Per-row losses go
 * to row_loss / row_zloss and are summed by reduce_rows.cl in a fixed order (deterministic).
 *
 * The true-class term of the gradient, p_t K - (1-eps) w_t - ..., is formed in full precision
 * and rounded once. Types, loads, stores and exp come from common.cl (prepended at build time).
 *
 * Kernel shapes (the engine picks one per launch from the device's LaunchShape):
 *   ce_rows_item   one work-item per row, CE_VW-wide vectors, blocked softmax (CPU devices;
 *                  PoCL measured ~6x faster than a work-group striding a row)
 *   ce_spatial8/16 eight or sixteen spatial rows per work-item, lanes are rows (CPU, (N, C, d..)
 *                  input): ce_spatial.cl, instantiated at both widths after this file
 *   ce_rows_group  one work-group of CE_WG_SIZE work-items per row (GPUs, contiguous rows)
 *   ce_rows_strided one work-item per row, classes S apart (spatial input that no ce_spatial
 *                  width divides, and spatial input on GPUs: neighbouring work-items then read
 *                  neighbouring positions, one coalesced line per class, where ce_rows_group
 *                  would have a whole group read one row's classes S elements apart)
 * ============================================================================================ */

#ifndef CE_WG_SIZE
#define CE_WG_SIZE 256      // ce_rows_group: work-items per row (power of two; the launch's local size)
#endif
#ifndef CE_MAX_BLOCKS
#define CE_MAX_BLOCKS 256   // ce_rows_item: at most this many softmax blocks per row (a private array)
#endif
#ifndef CE_MIN_BLOCK
#define CE_MIN_BLOCK 256    // ce_rows_item: classes per block, at least (L1-resident blocks)
#endif
#ifndef CE_VW
#define CE_VW 8             // ce_rows_item: vector width along a row, 8 or 16 (one AVX-512 register)
#endif
#ifndef CE_NT_STORE
#define CE_NT_STORE 0       // ce_rows_item: 1 writes bf16 gradient rows with non-temporal stores (ROW_NT)
#endif
#ifndef CE_SOFTCAP
#define CE_SOFTCAP 0        // 1 compiles soft-capping in (its code slows the common case ~1.5x on PoCL)
#endif

/* Online-softmax update of (m, s) with one element. -inf contributes nothing (and would give
 * NaN against m == -inf); NaN and +inf poison the row, as in PyTorch (x - max = inf - inf). */
#define ONLINE1(m, s, v)                                                      \
    do {                                                                      \
        acc_t d_ = (v) - (m);                                                 \
        acc_t e_ = ((v) == -ACC_INF) ? (acc_t)0 : EXP(-fabs(d_));             \
        if (d_ > (acc_t)0) { (s) = fma((s), e_, (acc_t)1); (m) = (v); }       \
        else { (s) += e_; }                                                   \
        if ((v) == ACC_INF) (s) = (acc_t)NAN;                                 \
    } while (0)


#if CE_SOFTCAP
inline acc_t cap1(acc_t v, acc_t cap) { return cap > (acc_t)0 ? cap * tanh(v / cap) : v; }
/* d softcap / dx expressed through the capped value z */
inline acc_t dcap1(acc_t z, acc_t cap) { return cap > (acc_t)0 ? (acc_t)1 - (z / cap) * (z / cap) : (acc_t)1; }
#define CAP_VEC(V)                                                                              \
    inline V __attribute__((overloadable)) capv(V v, acc_t cap) {                               \
        return cap > (acc_t)0 ? (V)cap * tanh(v / (V)cap) : v;                                  \
    }                                                                                           \
    inline V __attribute__((overloadable)) dcapv(V z, acc_t cap) {                              \
        return cap > (acc_t)0 ? (V)1 - (z / (V)cap) * (z / (V)cap) : (V)1;                      \
    }
CAP_VEC(acc8_t)
CAP_VEC(acc16_t)
#else
#define cap1(v, c) (v)
#define capv(v, c) (v)
#define dcap1(z, c) ((acc_t)1)
#define dcapv(z, c) ((acc_t)1)
#endif

/* merge two online-softmax states */
inline void merge_state(acc_t *m, acc_t *s, acc_t m2, acc_t s2) {
    if (s2 == (acc_t)0 && !isnan(s2)) return;          /* an empty or all -inf part */
    if (*s == (acc_t)0) { *m = m2; *s = s2; return; }
    acc_t M = fmax(*m, m2);
    acc_t a = (*m == M) ? (acc_t)1 : EXP(*m - M);      /* == avoids inf - inf */
    acc_t b = (m2 == M) ? (acc_t)1 : EXP(m2 - M);
    *s = *s * a + s2 * b;
    *m = M;
}

/* Per-row outputs shared by both kernel shapes. */
/* lse as an output follows torch.logsumexp: +inf for a row holding +inf (the loss and gradient of
 * such a row are NaN, as in F.cross_entropy, which is why s was poisoned) */
#define LSE_OUT(m, lse) ((m) == ACC_INF ? (m) : (lse))

inline void write_row(__global acc_t *row_loss, __global acc_t *row_zloss, __global float *row_lse,
                      ulong r, acc_t loss, acc_t m, acc_t lse, int valid, acc_t zcoef) {
    row_loss[r] = valid ? loss : (acc_t)0;
    row_zloss[r] = (valid && zcoef != (acc_t)0) ? zcoef * lse * lse : (acc_t)0;
    if (row_lse) row_lse[r] = (float)LSE_OUT(m, lse);
}

/* Row r's first logit, soft target and gradient element; its classes lie S apart. */
#define ROW_POINTERS(r)                                                                         \
    const ulong n = (r) / S, s_ = (r) - n * S;                                                  \
    const ulong base = n * (ulong)C * S + s_;                                                   \
    __global const in_t *xr = x + base;                                                         \
    __global const in_t *yr = ysoft ? ysoft + base : 0;                                         \
    __global grad_t *gr = grad ? grad + base : 0;

/* Pass 2 for one class j (scalar): adds the terms that need lse to *sum2 (soft: the loss;
 * hard with smoothing: w_j (lse - z_j)) and returns b_j, the part of the gradient that does not
 * scale with p_j (the true class's term excepted). */
inline acc_t pass2_one(acc_t v, __global const acc_t *weight, __global const in_t *yr, uint j, ulong S,
                       acc_t m, acc_t lsum, acc_t soft_hi, acc_t soft_lo, acc_t loss_scale, acc_t b_smooth,
                       bool smooth, acc_t *sum2) {
    const acc_t w = weight ? weight[j] : (acc_t)1;
    if (yr) {
        const acc_t wy = w * (LOAD1(yr, j * S) * soft_hi + soft_lo);
        *sum2 += wy * ((m - v) + lsum);
        return loss_scale * wy;
    }
    if (smooth) *sum2 += w * ((m - v) + lsum);
    return b_smooth * w;
}

/* First index of the raw maximum; NaN counts as the maximum, as torch.argmax does. */
inline int row_argmax(__global const in_t *xr, ulong stride, uint C) {
    acc_t best = -ACC_INF;
    int idx = 0;
    for (uint j = 0; j < C; ++j) {
        acc_t v = LOAD1(xr, j * stride);
        if (isnan(v)) return (int)j;
        if (v > best) { best = v; idx = (int)j; }
    }
    return idx;
}

/* ============================== one work-item per row (CPU) ==============================
 * Contiguous rows use a blocked online softmax, CE_VW-wide: per block of BS classes (L1-resident)
 * e_j = exp(z_j - bm) is summed against the block's reference bm and stashed; the running sum
 * is rescaled once per block. Pass 2 then needs no exp per element: p_j = e_j * exp(bm - lse).
 * That halves the exps (the cost that dominates on a CPU); the stash is re-read from cache. The
 * stash is the gradient row itself when the gradient has the accumulation type, else the
 * work-item's scratch row (fp16/bf16 gradients); without either (no scratch could be had),
 * p_j = exp(z_j - lse) is recomputed from the logits. */
/* the row's vector type and accesses at width CE_VW */
#if CE_VW == 16
typedef acc16_t accv_t;
#define LOADV LOAD16
#define STOREV STORE16
#define hmaxv hmax16
#define hsumv hsum16
#define VLOADA(p) vload16(0, p)
#if IN_DTYPE == 3
#define VSTOREA(v, o, p) VSTORE16_U(double16, v, (p) + 16 * (o))
#else
#define VSTOREA(v, o, p) VSTORE16_U(float16, v, (p) + 16 * (o))
#endif
#else
typedef acc8_t accv_t;
#define LOADV LOAD8
#define STOREV STORE8
#define hmaxv hmax8
#define hsumv hsum8
#define VLOADA(p) vload8(0, p)
#define VSTOREA(v, o, p) vstore8(v, o, p)
#endif

#define CAN_STASH ((GRAD_DTYPE == 0 && IN_DTYPE != 3) || (GRAD_DTYPE == 3 && IN_DTYPE == 3))


/* the running max of a block: v where v > a, else a. fmax's NaN rule (the other operand) cost
 * three more instructions per vector on x86 (PoCL); here a NaN v is no max either (the compare is
 * false), and a never holds one, so the result is fmax's; +-0 ties do not matter (exps of them
 * are equal). One vmaxps on x86. */
#define VMAX(a, v) select((a), (v), isgreater((v), (a)))
/* pass 1, exps of one block: e_j = exp(z_j - bm), summed, optionally stashed / soft-target A */
#define P1_LOOP(STASH, SOFT)                                                                    \
    for (uint j = b0; j < b1; j += CE_VW) {                                                         \
        accv_t e = EXP(capv(LOADV(xr, j), cap) - (accv_t)bm);                                   \
        es += e;                                                                                \
        if (STASH) VSTOREA(e, 0, stash + j);                                                    \
        if (SOFT) a8 += (weight ? VLOADA(weight + j) : (accv_t)1) * (LOADV(yr, j) * soft_hi + soft_lo); \
    }
/* pass 1 in one sweep, for a block after the first: exps against the reference bm (the running
 * max) while finding the block's own max mx */
#define P1_SPEC_LOOP(STASH)                                                                     \
    for (uint j = b0; j < b1; j += CE_VW) {                                                     \
        const accv_t v = capv(LOADV(xr, j), cap);                                               \
        mx = VMAX(mx, v);                                                                       \
        const accv_t e = EXP(v - (accv_t)bm);                                                   \
        es += e;                                                                                \
        if (STASH) VSTOREA(e, 0, stash + j);                                                    \
    }
/* pass 2 for class targets from stashed exps: g_j = e_j exp(bm - lse) K - eps/C w_j */
#define P2_HARD_STASH(SMOOTH, WEIGHTED, STORE)                                                  \
    for (uint j = b0; j < b1; j += CE_VW) {                                                     \
        accv_t w = WEIGHTED ? VLOADA(weight + j) : (accv_t)1;                                   \
        if (SMOOTH) sum8 += w * (((accv_t)m - LOADV(xr, j)) + (accv_t)lsum);                    \
        STORE(gr, j, VLOADA(stash + j) * (accv_t)fK - (accv_t)b_smooth * w);                    \
    }
#define P2_HARD_STASH_VERSIONS(STORE)                                                           \
    if (smooth && weight) { P2_HARD_STASH(1, 1, STORE) }                                        \
    else if (smooth) { P2_HARD_STASH(1, 0, STORE) }                                             \
    else if (weight) { P2_HARD_STASH(0, 1, STORE) }                                             \
    else { P2_HARD_STASH(0, 0, STORE) }
/* ROW_NT: pass 2 writes a bf16 gradient row (its exps in a scratch row) with non-temporal
 * stores where the row is 64-byte aligned: an ordinary store first reads its line for ownership,
 * and in pass 2 those reads were the stalls (perf) of a loop that does little else. x86 only; an
 * sfence orders them before the row's true-class store. */
#if CE_NT_STORE && defined(__x86_64__) && CE_VW == 16 && GRAD_DTYPE == 2
#define ROW_NT 1
/* Pass 2 of a ROW_NT row: 32 classes per step, so each non-temporal store is a whole 64-byte
 * line (two rounded 16-vectors joined; one 32-byte store per step measured ~6% slower); a
 * block that starts or ends on a half line takes one 16-wide store there. */
typedef ushort ushort32_nt __attribute__((ext_vector_type(32)));
#define NT32_STORE(CONV, g0, g1, p)                                                             \
    __builtin_nontemporal_store(__builtin_shufflevector(CONV(g0), CONV(g1), 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \
        10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31), \
        (__global ushort32_nt *)(p))
#define P2_ONE(SMOOTH, WEIGHTED, j, out)                                                        \
    {   const accv_t w = WEIGHTED ? VLOADA(weight + (j)) : (accv_t)1;                           \
        if (SMOOTH) sum8 += w * (((accv_t)m - LOADV(xr, (j))) + (accv_t)lsum);                  \
        out = VLOADA(stash + (j)) * (accv_t)fK - (accv_t)b_smooth * w; }
#define P2_HARD_STASH_NT(SMOOTH, WEIGHTED, CONV)                                                \
    {   uint j = b0;                                                                            \
        if (j & 31) { accv_t g; P2_ONE(SMOOTH, WEIGHTED, j, g)                                  \
            __builtin_nontemporal_store(CONV(g), (__global ushort16 *)(gr + j)); j += 16; }     \
        for (; j + 32 <= b1; j += 32) {                                                         \
            accv_t g0, g1; P2_ONE(SMOOTH, WEIGHTED, j, g0) P2_ONE(SMOOTH, WEIGHTED, j + 16, g1) \
            NT32_STORE(CONV, g0, g1, gr + j); }                                                 \
        if (j < b1) { accv_t g; P2_ONE(SMOOTH, WEIGHTED, j, g)                                  \
            __builtin_nontemporal_store(CONV(g), (__global ushort16 *)(gr + j)); } }
#define P2_NT_VERSIONS(CONV)                                                                    \
    if (smooth && weight) { P2_HARD_STASH_NT(1, 1, CONV) }                                      \
    else if (smooth) { P2_HARD_STASH_NT(1, 0, CONV) }                                           \
    else if (weight) { P2_HARD_STASH_NT(0, 1, CONV) }                                           \
    else { P2_HARD_STASH_NT(0, 0, CONV) }
#else
#define ROW_NT 0
#endif
/* bf16 gradients: the NaN test of the rounding is needed only in rows that can hold a NaN */
#if GRAD_DTYPE == 2 && CE_VW == 16
#define STOREV_NONAN STORE16_NONAN
#else
#define STOREV_NONAN STOREV
#endif

/* The parameters of every kernel shape (ce_rows_item, ce_rows_group, ce_spatial*), in the order
 * engine.py's CE_PARAMS names them; one list, so the shapes cannot drift apart.
 *   x: logits; tgt: class per row, -1 = ignored, NULL for soft targets; ysoft: soft targets (x's
 *   layout) or NULL; weight: class weights or NULL; grad: gradient or NULL; row_lse, row_amax: or
 *   NULL; scratch: global size x C accumulators or NULL (only ce_rows_item uses it). */
#define CE_KERNEL_PARAMS                                                                        \
    __global const in_t *x, __global const int *tgt, __global const in_t *ysoft,               \
    __global const acc_t *weight, __global grad_t *grad,                                        \
    __global acc_t *row_loss, __global acc_t *row_zloss,                                        \
    __global float *row_lse, __global int *row_amax,                                            \
    __global acc_t *scratch,                                                                    \
    const ulong row0, const ulong nrows, const uint C, const ulong S,                           \
    const acc_t eps, const acc_t wsum, const acc_t loss_scale,                                  \
    const acc_t z_scale, const acc_t zcoef, const acc_t cap

/* One row r. `stash`: C accumulators where pass 1 parks e_j (the gradient row itself when the
 * gradient has the accumulation type, else the work-item's scratch row), or NULL: two exps. */
inline void ce_row_item(const ulong r, __global acc_t *stash, const bool strided,
                        __global const in_t *x, __global const int *tgt, __global const in_t *ysoft,
                        __global const acc_t *weight, __global grad_t *grad,
                        __global acc_t *row_loss, __global acc_t *row_zloss, __global float *row_lse,
                        __global int *row_amax, const uint C, const ulong S,
                        const acc_t eps, const acc_t wsum, const acc_t loss_scale,
                        const acc_t z_scale, const acc_t zcoef, const acc_t cap) {
    ROW_POINTERS(r)
    const int t = tgt ? tgt[r] : 0;
    const int valid = !tgt || t >= 0;
    /* `strided`: a literal at each call; true compiles the blocked (contiguous) code and its
     * private bmax array out of ce_rows_strided, which GPU registers would pay for */
    const bool contig = !strided && (S == 1);

    if (row_amax) row_amax[r] = row_argmax(xr, S, C);
    if (!valid) {                               /* ignored row: zero loss and gradient */
        acc_t lse = 0, m = 0;
        if (row_lse) {                          /* lse still asked for: one pass (before the zeros) */
            acc_t s = 0;
            m = -ACC_INF;
            for (uint j = 0; j < C; ++j) { acc_t v = cap1(LOAD1(xr, j * S), cap); ONLINE1(m, s, v); }
            lse = m + LOG(s);
        }
        if (gr) for (uint j = 0; j < C; ++j) STORE1(gr, j * S, 0);
        write_row(row_loss, row_zloss, row_lse, r, 0, m, lse, 0, zcoef);
        return;
    }
    const acc_t inv_c = (acc_t)1 / (acc_t)C;
    const acc_t soft_lo = eps * inv_c, soft_hi = (acc_t)1 - eps;

    /* ---- pass 1: online softmax (+ A for soft targets) ---- */
    acc_t m = -ACC_INF, s = 0, A = 0;
    const uint CV = contig ? (C & ~(uint)(CE_VW - 1)) : 0u;   /* classes done CE_VW-wide, in blocks */
    uint bs = ((CV + CE_MAX_BLOCKS - 1) / CE_MAX_BLOCKS + CE_VW - 1) & ~(uint)(CE_VW - 1);
    bs = max(bs, (uint)CE_MIN_BLOCK);
    acc_t bmax[CE_MAX_BLOCKS];
    uint nb = 0;
    for (uint b0 = 0; b0 < CV; b0 += bs, ++nb) {
        const uint b1 = min(b0 + bs, CV);
        accv_t es = (accv_t)0, a8 = (accv_t)0;
        /* After the first block, one sweep instead of two: exps against the running max m while
         * the block's max is found, kept when the block holds no new max (most blocks: a new max
         * appears in block k with odds ~1/k), else the block is redone against its own max. So m
         * stays the row's max and the numerics are the two-sweep ones (a reference below the
         * max, tried first, cost ~gap * 6e-8 relative in p near the max). */
        if (!yr && isfinite(m)) {
            const acc_t bm = m;
            accv_t mx = (accv_t)(-ACC_INF);
            if (stash) { P1_SPEC_LOOP(1) } else { P1_SPEC_LOOP(0) }
            if (!(hmaxv(mx) > m)) {   /* a NaN is no max (fmax): its e poisons s */
                bmax[nb] = m;
                s += hsumv(es);
                continue;
            }
            es = (accv_t)0;
        }
        accv_t mx = (accv_t)(-ACC_INF);
        for (uint j = b0; j < b1; j += CE_VW) mx = VMAX(mx, capv(LOADV(xr, j), cap));
        const acc_t bm = hmaxv(mx);
        bmax[nb] = bm;
        /* Loop versions with constant flags: a run-time test inside the loop let the compiler
         * if-convert and pay for both sides. bm == -inf: the whole block is -inf and contributes
         * nothing (exp would give NaN); bm == +inf or a NaN: e is NaN and poisons the row, as in
         * PyTorch. */
        if (bm == -ACC_INF) {
            for (uint j = b0; j < b1; j += CE_VW) {
                if (stash) VSTOREA((accv_t)0, 0, stash + j);
                if (yr) a8 += (weight ? VLOADA(weight + j) : (accv_t)1) * (LOADV(yr, j) * soft_hi + soft_lo);
            }
        } else if (stash && !yr) {
            P1_LOOP(1, 0)
        } else if (stash) {
            P1_LOOP(1, 1)
        } else if (yr) {
            P1_LOOP(0, 1)
        } else {
            P1_LOOP(0, 0)
        }
        A += hsumv(a8);
        if (bm != -ACC_INF) {
            const acc_t M = fmax(m, bm);
            s = (m == -ACC_INF ? (acc_t)0 : s * EXP(m - M)) + hsumv(es) * EXP(bm - M);
            m = M;
        }
    }
    for (uint j = CV; j < C; ++j) {
        acc_t v = cap1(LOAD1(xr, j * S), cap);
        ONLINE1(m, s, v);
        if (yr) A += (weight ? weight[j] : (acc_t)1) * (LOAD1(yr, j * S) * soft_hi + soft_lo);
    }
    /* lse = m + lsum; differences use (x - m) and lsum separately, as PyTorch's log_softmax
     * does, so logits of 1e4 lose nothing to the rounding of lse */
    const acc_t lsum = LOG(s), lse = m + lsum;
    const acc_t zt = yr ? (acc_t)0 : cap1(LOAD1(xr, (ulong)t * S), cap);   /* before pass 2 writes it */

    /* ---- per-row constants of the gradient: g_j = p_j K - b_j ---- */
    const acc_t wt = yr ? (acc_t)0 : (weight ? weight[t] : (acc_t)1);
    const acc_t zterm = zcoef != (acc_t)0 ? z_scale * (acc_t)2 * zcoef * lse : (acc_t)0;
    const acc_t K = yr ? loss_scale * A + zterm
                       : loss_scale * (soft_hi * wt + soft_lo * wsum) + zterm;
    const acc_t b_smooth = loss_scale * soft_lo;   /* hard targets: b_j = b_smooth w_j (+ true class) */
    const bool smooth = eps > (acc_t)0;
    const bool need_x = yr || smooth || cap > (acc_t)0 || !stash;

    /* ---- pass 2: gradient + terms that need lse ---- */
    acc_t sum2 = 0;                               /* hard: sum_j w_j (lse - z_j); soft: the loss */
    if (gr || yr || smooth) {
        accv_t sum8 = (accv_t)0;
        uint b = 0;
#if CE_SOFTCAP
        const bool hot = gr && stash && !yr && !(cap > (acc_t)0);
#else
        const bool hot = gr && stash && !yr;
#endif
        /* finite s, K and weights: no gradient of this row can be NaN (every exp is at most 1) */
        const bool row_finite = isfinite(s) && isfinite(K) && isfinite(b_smooth * wsum);
#if ROW_NT
        const bool nt = contig && stash && ((ulong)gr & 63) == 0;   /* stash: a scratch row here */
#endif
        for (uint b0 = 0; b0 < CV; b0 += bs, ++b) {
            const uint b1 = min(b0 + bs, CV);
            const acc_t fK = stash ? EXP((bmax[b] - m) - lsum) * K : (acc_t)0;
            if (hot) {                 /* class targets, stashed exps: no exp per element */
#if ROW_NT
                if (nt && row_finite) { P2_NT_VERSIONS(f32_to_bf16_16_nonan) }
                else if (nt) { P2_NT_VERSIONS(f32_to_bf16_16) }
                else
#endif
#if GRAD_DTYPE == 2 && CE_VW == 16
                if (row_finite) { P2_HARD_STASH_VERSIONS(STOREV_NONAN) }
                else { P2_HARD_STASH_VERSIONS(STOREV) }
#else
                P2_HARD_STASH_VERSIONS(STOREV)
#endif
                continue;
            }
            for (uint j = b0; j < b1; j += CE_VW) {
                accv_t v = need_x ? capv(LOADV(xr, j), cap) : (accv_t)0;
                accv_t w = weight ? VLOADA(weight + j) : (accv_t)1;
                accv_t bj;
                if (yr) {
                    accv_t wy = w * (LOADV(yr, j) * soft_hi + soft_lo);
                    sum8 += wy * (((accv_t)m - v) + (accv_t)lsum);
                    bj = (accv_t)loss_scale * wy;
                } else {
                    if (smooth) sum8 += w * (((accv_t)m - v) + (accv_t)lsum);
                    bj = (accv_t)b_smooth * w;
                }
                if (gr) {
                    accv_t pK = stash ? VLOADA(stash + j) * (accv_t)fK : EXP((v - (accv_t)m) - (accv_t)lsum) * (accv_t)K;
                    accv_t g = pK - bj;
                    if (cap > (acc_t)0) g *= dcapv(v, cap);
                    STOREV(gr, j, g);
                }
            }
        }
        if (CV) sum2 = hsumv(sum8);
#if ROW_NT
        if (nt) __builtin_ia32_sfence();   /* the row's non-temporal stores before its true class */
#endif   /* (Oclgrind 21.10 crashes on a vector element read under
                                          * --uninitialized: none in ce_rows_strided, its GPU shape) */
        for (uint j = CV; j < C; ++j) {
            acc_t v = cap1(LOAD1(xr, j * S), cap);
            acc_t bj = pass2_one(v, weight, yr, j, S, m, lsum, soft_hi, soft_lo, loss_scale, b_smooth, smooth, &sum2);
            if (gr) STORE1(gr, j * S, (EXP((v - m) - lsum) * K - bj) * dcap1(v, cap));
        }
    }

    acc_t loss;
    if (yr) {
        loss = sum2;
    } else {
        loss = soft_hi * wt * ((m - zt) + lsum);
        if (smooth) loss += soft_lo * sum2;
        if (gr) {   /* true class, formed in full precision and rounded once */
            acc_t g = EXP((zt - m) - lsum) * K - b_smooth * wt - loss_scale * soft_hi * wt;
            STORE1(gr, (ulong)t * S, g * dcap1(zt, cap));
        }
    }
    write_row(row_loss, row_zloss, row_lse, r, loss, m, lse, 1, zcoef);
}

/* Rows row0 + gid, + the global size, ...: one row per work-item when the gradient row holds
 * the stash (launched with a work-item per row); a few rows each when the stash is the
 * work-item's own scratch row of C accumulators (launched with as many work-items as scratch
 * rows: persistent work-items, the only way a work-item may own memory in OpenCL). */
__kernel void ce_rows_item(CE_KERNEL_PARAMS) {
    const ulong gid = get_global_id(0), items = get_global_size(0);
    for (ulong r = row0 + gid; r < row0 + nrows; r += items) {
#if CAN_STASH   /* the gradient row, unless the engine gave scratch rows (in place: grad == x) */
        __global acc_t *stash = (grad && S == 1) ? (scratch ? scratch + gid * (ulong)C : (__global acc_t *)grad + r * C) : 0;
#else
        __global acc_t *stash = (grad && scratch && S == 1) ? scratch + gid * (ulong)C : 0;
#endif
        ce_row_item(r, stash, false, x, tgt, ysoft, weight, grad, row_loss, row_zloss, row_lse, row_amax,
                    C, S, eps, wsum, loss_scale, z_scale, zcoef, cap);
    }
}

/* Spatial rows (S > 1), one per work-item, rows row0 + gid, + the global size, ...: the global
 * size may be rounded up to the work-group size, the surplus work-items find no row. Row r + 1
 * is the position next to row r's for every class, so a warp's loads of one class are one
 * contiguous run (coalesced on a GPU). No stash (a row's classes are S apart in the gradient
 * too): p_j = exp(z_j - lse), two exps per element, which a memory-bound GPU affords. */
__kernel void ce_rows_strided(CE_KERNEL_PARAMS) {
    const ulong gid = get_global_id(0), items = get_global_size(0);
    for (ulong r = row0 + gid; r < row0 + nrows; r += items)
        ce_row_item(r, 0, true, x, tgt, ysoft, weight, grad, row_loss, row_zloss, row_lse, row_amax,
                    C, S, eps, wsum, loss_scale, z_scale, zcoef, cap);
}

/* ============================== one work-group per row (GPU) ============================== */
/* Work-item l handles classes l, l + WG, ...: coalesced loads. States are combined in local
 * memory by a tree; the true class is written by the work-item that owns it, in pass 2. */
__kernel __attribute__((reqd_work_group_size(CE_WG_SIZE, 1, 1)))
void ce_rows_group(CE_KERNEL_PARAMS) {
    __local acc_t lm[CE_WG_SIZE], ls[CE_WG_SIZE], la[CE_WG_SIZE], lb[CE_WG_SIZE];
    __local int li[CE_WG_SIZE], ln[CE_WG_SIZE];
    const uint lid = get_local_id(0);
    const ulong r = row0 + get_group_id(0);
    if (r >= row0 + nrows) return;                 /* uniform across the group */
    ROW_POINTERS(r)
    const int t = tgt ? tgt[r] : 0;
    const int valid = !tgt || t >= 0;
    const acc_t inv_c = (acc_t)1 / (acc_t)C;
    const acc_t soft_lo = eps * inv_c, soft_hi = (acc_t)1 - eps;

    /* pass 1, with the argmax: first NaN, else first maximum (as torch.argmax) */
    acc_t pm = -ACC_INF, ps = 0, A = 0, best = -ACC_INF;
    int bidx = -1, nidx = INT_MAX;
    for (uint j = lid; j < C; j += CE_WG_SIZE) {
        acc_t raw = LOAD1(xr, j * S);
        acc_t v = cap1(raw, cap);
        ONLINE1(pm, ps, v);
        if (yr) A += (weight ? weight[j] : (acc_t)1) * (LOAD1(yr, j * S) * soft_hi + soft_lo);
        if (row_amax) {
            if (isnan(raw)) nidx = min(nidx, (int)j);
            else if (raw > best) { best = raw; bidx = (int)j; }
        }
    }
    lm[lid] = pm; ls[lid] = ps; la[lid] = A; lb[lid] = best; li[lid] = bidx; ln[lid] = nidx;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint h = CE_WG_SIZE / 2; h > 0; h >>= 1) {
        if (lid < h) {
            acc_t m1 = lm[lid], s1 = ls[lid];
            merge_state(&m1, &s1, lm[lid + h], ls[lid + h]);
            lm[lid] = m1; ls[lid] = s1; la[lid] += la[lid + h];
            ln[lid] = min(ln[lid], ln[lid + h]);
            int i2 = li[lid + h];
            if (i2 >= 0 && (li[lid] < 0 || lb[lid + h] > lb[lid] || (lb[lid + h] == lb[lid] && i2 < li[lid]))) {
                lb[lid] = lb[lid + h]; li[lid] = i2;
            }
        }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    const acc_t m = lm[0], lsum = LOG(ls[0]), lse = m + lsum;
    A = la[0];
    if (row_amax && lid == 0) row_amax[r] = ln[0] != INT_MAX ? ln[0] : max(li[0], 0);
    barrier(CLK_LOCAL_MEM_FENCE);

    if (!valid) {
        if (gr) for (uint j = lid; j < C; j += CE_WG_SIZE) STORE1(gr, j * S, 0);
        if (lid == 0) write_row(row_loss, row_zloss, row_lse, r, 0, m, lse, 0, zcoef);
        return;
    }
    const acc_t wt = yr ? (acc_t)0 : (weight ? weight[t] : (acc_t)1);
    const acc_t zterm = zcoef != (acc_t)0 ? z_scale * (acc_t)2 * zcoef * lse : (acc_t)0;
    const acc_t K = yr ? loss_scale * A + zterm : loss_scale * (soft_hi * wt + soft_lo * wsum) + zterm;
    const acc_t b_smooth = loss_scale * soft_lo;
    const bool smooth = eps > (acc_t)0;

    acc_t sum2 = 0;
    for (uint j = lid; j < C; j += CE_WG_SIZE) {
        acc_t v = cap1(LOAD1(xr, j * S), cap);
        acc_t bj = pass2_one(v, weight, yr, j, S, m, lsum, soft_hi, soft_lo, loss_scale, b_smooth, smooth, &sum2);
        if (!yr && (int)j == t) bj += loss_scale * soft_hi * wt;   /* the true class, in full precision */
        if (gr) STORE1(gr, j * S, (EXP((v - m) - lsum) * K - bj) * dcap1(v, cap));
    }
    la[lid] = sum2;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint h = CE_WG_SIZE / 2; h > 0; h >>= 1) {
        if (lid < h) la[lid] += la[lid + h];
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) {
        acc_t loss;
        if (yr) loss = la[0];
        else {
            const acc_t zt = cap1(LOAD1(xr, (ulong)t * S), cap);
            loss = soft_hi * wt * ((m - zt) + lsum);
            if (smooth) loss += soft_lo * la[0];
        }
        write_row(row_loss, row_zloss, row_lse, r, loss, m, lse, 1, zcoef);
    }
}
