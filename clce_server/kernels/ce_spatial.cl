/* ============================================================================================
 * ce_spatial.cl — spatial rows, SPW (8 or 16) per work-item: CPU devices, (N, C, d1..dk) input
 * with S = d1*...*dk a multiple of SPW. A template: clce_server/device.py appends it to
 * common.cl + cross_entropy.cl once per width, after `#define SPW 8` and `#define SPW 16`, which
 * gives the kernels ce_spatial8 and ce_spatial16.
 *
 * For such input the rows s, s+1, ... of one sample sit next to each other for every class (class
 * stride S), so SPW adjacent rows load as one vector per class: the lanes are rows. Same math as
 * ce_rows_item, vectorised across rows instead of across classes (one work-item per row had to run
 * it scalar, two scalar exps per element). Sixteen lanes on AVX-512 (CE_VW 16): one register and a
 * whole 64-byte line per class; each work-item walks C lines S apart, and a strided copy at that
 * shape measured 1.45x faster at 16 lanes than at 8 (PoCL, 8x21x256x256).
 * ============================================================================================ */

#ifndef CE_SP_TILE
#define CE_SP_TILE 32       // rows of at most this many classes keep their tile (SPW lanes x C) in
#endif                      // private arrays, read from memory once (see pass 1a); 0: never
#ifndef CE_SP_NT_STORE
#define CE_SP_NT_STORE 0    // 1: a tile's gradient lines written with non-temporal stores (x86; see SP_NT)
#endif
#ifndef CE_SP_PREFETCH
#define CE_SP_PREFETCH 0    // x86: pass 1a prefetches each class's line this many work-items ahead
#endif                      // (SPW rows each); 0: off. See SP_NT below for why the lines miss.
#if CE_SP_TILE > 0
#define SP_TILE_N CE_SP_TILE
#else
#define SP_TILE_N 1
#endif

#define SP_CAT_(a, b) a##b
#define SP_CAT(a, b) SP_CAT_(a, b)
#define SP_NAME SP_CAT(ce_spatial, SPW)
/* SP_NT: a tiled row's gradient goes out with non-temporal stores, a whole 64-byte line per
 * store (fp32 gradients at 16 lanes, fp64 at 8 or 16, in the accumulation type). An ordinary
 * store first reads its line (C lines S apart per work-item, which no prefetcher follows): at
 * 8x21x256x256 a strided read + write kernel took 6.4 ms with ordinary stores and 3.2 ms with
 * these (PoCL, copy 1.8 ms). x86 only (an sfence orders them before the kernel ends), and only
 * where the gradient row is 64-byte aligned (checked per work-item). The loads miss for the same
 * reason, and pass 1a then waits on C of them at once: CE_SP_PREFETCH asks for each class's line
 * of a later work-item (the next positions) while this one's arrive, ~8% less CPU time at
 * 8x21x256x256 (PoCL, interleaved A/B, distances 4-16 alike). */
#if CE_SP_NT_STORE && defined(__x86_64__) && \
    ((GRAD_DTYPE == 0 && IN_DTYPE != 3 && SPW == 16) || (GRAD_DTYPE == 3 && IN_DTYPE == 3))
#define SP_NT 1
#else
#define SP_NT 0
#endif
#define accS_t SP_CAT(acc, SP_CAT(SPW, _t))
#define SP_LOAD SP_CAT(LOAD, SPW)
#define SP_STORE SP_CAT(STORE, SPW)
#define SP_VLOAD SP_CAT(vload, SPW)
#define SP_VSTORE SP_CAT(vstore, SPW)
#define SP_CONVERT_FLOAT SP_CAT(convert_float, SPW)
#define SP_CONVERT_INT SP_CAT(convert_int, SPW)
#if IN_DTYPE == 3
#define maskS_t SP_CAT(long, SPW)
#define SP_CONVERT_MASK SP_CAT(convert_long, SPW)
#else
#define maskS_t SP_CAT(int, SPW)
#define SP_CONVERT_MASK SP_CAT(convert_int, SPW)
#endif

__kernel void SP_NAME(CE_KERNEL_PARAMS) {   /* cross_entropy.cl: the three shapes' parameters */
    const ulong r = row0 + SPW * get_global_id(0);
    if (r >= row0 + nrows) return;
    ROW_POINTERS(r)
    int tl[SPW];
    for (int l = 0; l < SPW; ++l) tl[l] = tgt ? tgt[r + l] : 0;
    const maskS_t t8 = SP_CONVERT_MASK(SP_VLOAD(0, tl));
    const maskS_t valid = tgt ? t8 >= (maskS_t)0 : (maskS_t)(-1);
    const acc_t soft_lo = eps / (acc_t)C, soft_hi = (acc_t)1 - eps;
    const bool smooth = eps > (acc_t)0;

    /* pass 1a: the max per lane, and the argmax of the raw logits. A NaN is not the max (fmax),
     * but it makes its exp NaN below and so poisons the row, as in PyTorch; +inf makes m = +inf
     * and (inf - inf) poisons it too. */
    /* A row of few classes keeps its (capped) logits and then its exps in private arrays: the
     * logits are read from memory once, and the gradient written once. The alternative, three
     * reads of C lines S apart per work-item (max, exps, stash), measured ~3.5x slower per element
     * than the contiguous kernel on PoCL: those lines did not stay in cache between the passes
     * (at S = 65536 all C of them share one L1 and one L2 set). */
    const bool tile = C <= (uint)CE_SP_TILE;
    accS_t xa[SP_TILE_N], ea[SP_TILE_N];
    accS_t m = (accS_t)(-ACC_INF), best = (accS_t)(-ACC_INF);
    maskS_t amax = (maskS_t)0, nan_seen = (maskS_t)0;
    for (uint j = 0; j < C; ++j) {
        const accS_t raw = SP_LOAD(xr, (ulong)j * S);
#if CE_SP_PREFETCH > 0 && defined(__x86_64__)
        __builtin_prefetch(xr + (ulong)j * S + CE_SP_PREFETCH * SPW, 0, 3);   /* never faults */
#endif
        const accS_t v = capv(raw, cap);
        if (tile) xa[j] = v;
        m = fmax(m, v);
        if (row_amax) {
            const maskS_t isn = isnan(raw) & ~nan_seen;
            amax = select(amax, (maskS_t)j, isn);
            nan_seen |= isn;
            const maskS_t gt = (raw > best) & ~nan_seen;
            amax = select(amax, (maskS_t)j, gt);
            best = select(best, raw, gt);
        }
    }
    /* pass 1b: s = sum_j exp(z_j - m), one exp per element, each parked in the gradient when it
     * has the accumulation type (pass 2 then needs none); soft targets' A. The second read of
     * the logits comes from cache (C lines per work-item). -inf contributes exp(-inf) = 0 (an
     * all -inf row then has s = 0 and lse = -inf, as torch.logsumexp). */
#if CAN_STASH
    __global acc_t *stash = tile ? 0 : (__global acc_t *)gr;
#else
    __global acc_t *stash = 0;
#endif
    accS_t s = (accS_t)0, A = (accS_t)0;
    const accS_t m0 = select(m, (accS_t)0, m == (accS_t)(-ACC_INF));   /* -inf - m0 = -inf, not NaN */
    for (uint j = 0; j < C; ++j) {
        const accS_t v = tile ? xa[j] : capv(SP_LOAD(xr, (ulong)j * S), cap);
        const accS_t e = EXP(v - m0);
        s += e;
        if (tile) ea[j] = e;
        else if (stash) SP_VSTORE(e, 0, stash + (ulong)j * S);
        if (yr) A += (weight ? weight[j] : (acc_t)1) * (SP_LOAD(yr, (ulong)j * S) * soft_hi + soft_lo);
    }
    const accS_t lsum = LOG(s), lse = m + lsum;

    /* per-lane constants: the target's weight and capped logit */
    acc_t wtl[SPW], ztl[SPW];
    for (int l = 0; l < SPW; ++l) {
        const int t = tl[l];
        wtl[l] = (yr || t < 0) ? (acc_t)0 : (weight ? weight[t] : (acc_t)1);
        ztl[l] = (yr || t < 0) ? (acc_t)0 : cap1(LOAD1(xr, (ulong)t * S + l), cap);
    }
    const accS_t wt = SP_VLOAD(0, wtl), zt = SP_VLOAD(0, ztl);
    const accS_t zterm = zcoef != (acc_t)0 ? (accS_t)(z_scale * (acc_t)2 * zcoef) * lse : (accS_t)0;
    const accS_t K = yr ? (accS_t)loss_scale * A + zterm
                        : (accS_t)loss_scale * (soft_hi * wt + (accS_t)(soft_lo * wsum)) + zterm;
    const accS_t b_true = (accS_t)(loss_scale * soft_hi) * wt;

    /* pass 2: g_j = p_j K - b_j, p_j = e_j / s from the stash, else exp(z_j - lse) */
    accS_t sum2 = (accS_t)0;
    const accS_t Ks = K / s;
    const bool need_x = yr || smooth || cap > (acc_t)0 || !(stash || tile);
#if SP_NT
    /* every gr + j S is then aligned too: S is a multiple of SPW, SPW elements are 64 bytes */
    const bool nt = tile && gr && ((ulong)gr & 63) == 0;
#endif
    if (gr || yr || smooth) {
        for (uint j = 0; j < C; ++j) {
            const accS_t v = !need_x ? (accS_t)0 : tile ? xa[j] : capv(SP_LOAD(xr, (ulong)j * S), cap);
            const acc_t w = weight ? weight[j] : (acc_t)1;
            accS_t bj;
            if (yr) {
                const accS_t wy = w * (SP_LOAD(yr, (ulong)j * S) * soft_hi + soft_lo);
                sum2 += wy * ((m - v) + lsum);
                bj = (accS_t)loss_scale * wy;
            } else {
                if (smooth) sum2 += w * ((m - v) + lsum);
                /* the true class's term in full precision; the smoothing term when there is one */
                bj = select((accS_t)0, b_true, t8 == (maskS_t)j);
                if (smooth) bj += (accS_t)(loss_scale * soft_lo * w);
            }
            if (gr) {
                const accS_t pK = tile ? ea[j] * Ks
                                  : stash ? SP_VLOAD(0, stash + (ulong)j * S) * Ks : EXP((v - m) - lsum) * K;
                accS_t g = pK - bj;
                if (cap > (acc_t)0) g *= dcapv(v, cap);
#if SP_NT
                if (nt) __builtin_nontemporal_store(select((accS_t)0, g, valid), (__global accS_t *)(gr + (ulong)j * S));
                else
#endif
                SP_STORE(gr, (ulong)j * S, select((accS_t)0, g, valid));
            }
        }
    }
    const accS_t loss = yr ? sum2 : soft_hi * wt * ((m - zt) + lsum) + (smooth ? (accS_t)soft_lo * sum2 : (accS_t)0);
    acc_t ll[SPW], lz[SPW];
    SP_VSTORE(select((accS_t)0, loss, valid), 0, ll);
    SP_VSTORE(select((accS_t)0, (accS_t)zcoef * lse * lse, valid & (maskS_t)(zcoef != (acc_t)0 ? -1 : 0)), 0, lz);
    for (int l = 0; l < SPW; ++l) { row_loss[r + l] = ll[l]; row_zloss[r + l] = lz[l]; }
    if (row_lse) SP_VSTORE(SP_CONVERT_FLOAT(select(lse, m, m == (accS_t)ACC_INF)), 0, row_lse + r);
    if (row_amax) SP_VSTORE(SP_CONVERT_INT(amax), 0, row_amax + r);
#if SP_NT
    if (nt) __builtin_ia32_sfence();   /* the non-temporal stores, before the kernel's end */
#endif
}

#undef SP_NAME
#undef SP_TILE_N
#undef SP_NT
#undef accS_t
#undef SP_LOAD
#undef SP_STORE
#undef SP_VLOAD
#undef SP_VSTORE
#undef SP_CONVERT_FLOAT
#undef SP_CONVERT_INT
#undef maskS_t
#undef SP_CONVERT_MASK
