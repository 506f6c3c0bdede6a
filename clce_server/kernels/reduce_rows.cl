/* ============================================================================================
 * reduce_rows.cl — deterministic sums of the per-row results of cross_entropy.cl.
 *
 * One work-group per segment (a segment is one request's rows; a single request is one segment).
 * Work-item l sums rows l, l + WG, l + 2 WG, ... in that order, then the work-group combines the
 * partial sums by a fixed binary tree in local memory. No atomics and an order that depends only
 * on (rows, RED_WG_SIZE): the same input gives bit-identical sums on every run.
 *
 * Outputs per segment g (out[4 g + k]):
 *   k = 0  sum of row_loss                     k = 1  sum of row_zloss
 *   k = 2  rows whose argmax equals the target  k = 3  unused (alignment)
 * Sums are in double where the device has it (RED_FP64), else float.
 * ============================================================================================ */

#ifndef RED_WG_SIZE
#define RED_WG_SIZE 64      // work-items per segment (power of two; the launch's local size)
#endif
#ifndef IN_DTYPE
#define IN_DTYPE 0          // 3: the per-row results are double (fp64 input), else float
#endif
#ifndef RED_FP64
#define RED_FP64 0          // 1: sum in double (the device has fp64)
#endif

#if RED_FP64 || IN_DTYPE == 3
#pragma OPENCL EXTENSION cl_khr_fp64 : enable
typedef double red_t;
#else
typedef float red_t;
#endif
#if IN_DTYPE == 3
typedef double row_t;
#else
typedef float row_t;
#endif

__kernel __attribute__((reqd_work_group_size(RED_WG_SIZE, 1, 1)))
void reduce_rows(__global const row_t *row_loss, __global const row_t *row_zloss,
                 __global const int *row_amax,      /* or NULL */
                 __global const int *tgt,           /* or NULL (soft targets) */
                 __global const ulong *seg_start,   /* n_segments + 1 offsets */
                 __global red_t *out) {
    __local red_t l0[RED_WG_SIZE], l1[RED_WG_SIZE], l2[RED_WG_SIZE];
    const uint lid = get_local_id(0), g = get_group_id(0);
    const ulong a = seg_start[g], b = seg_start[g + 1];
    red_t s0 = 0, s1 = 0, s2 = 0;
    for (ulong r = a + lid; r < b; r += RED_WG_SIZE) {
        s0 += (red_t)row_loss[r];
        s1 += (red_t)row_zloss[r];
        if (row_amax && tgt) s2 += (tgt[r] >= 0 && row_amax[r] == tgt[r]) ? (red_t)1 : (red_t)0;
    }
    l0[lid] = s0; l1[lid] = s1; l2[lid] = s2;
    barrier(CLK_LOCAL_MEM_FENCE);
    for (uint h = RED_WG_SIZE / 2; h > 0; h >>= 1) {
        if (lid < h) { l0[lid] += l0[lid + h]; l1[lid] += l1[lid + h]; l2[lid] += l2[lid + h]; }
        barrier(CLK_LOCAL_MEM_FENCE);
    }
    if (lid == 0) { out[4 * g] = l0[0]; out[4 * g + 1] = l1[0]; out[4 * g + 2] = l2[0]; out[4 * g + 3] = 0; }
}
