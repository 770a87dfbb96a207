/* Multi-scale deformable attention sampling core for the CPU, forward and backward.
 *
 * Compiled at run time by cpu_ms_deform_attn.py, once per SCALAR (float or double, set on the command line; float
 * with VALUE_BF16 for the bfloat16 inference forward), and called through ctypes. All tensors are contiguous:
 *   value [B, H, S, D], head-major (the caller transposes it: one (batch, head) pair's slice is then contiguous and
 *   stays in cache, 15-20 % faster backward than [B, S, H, D]); locations [B, Q, H, L, P, 2] as (x, y) in [0, 1];
 *   weights [B, Q, H, L, P];
 *   output [B, Q, H, D]; levels [L, 3] int64 as (height, width, first token).
 * Sampling is bilinear with align_corners=False and zero padding, as grid_sample does: pixel x = x * width - 0.5.
 *
 * Both passes walk the queries of one (batch, head) pair in turn: neighbouring queries sample neighbouring pixels,
 * and one pair's value slice ([S, D]) stays in cache. Threads are OpenMP's (built with -fopenmp, the library
 * shares PyTorch's libgomp and its thread pool; without it the loops run serially). The forward splits blocks of
 * queries between threads; the backward splits the B*H pairs, so every thread owns its slice of the value gradient:
 * no atomics, and the result does not depend on the number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef SCALAR scalar_t;

/* VALUE_BF16 (inference only, with SCALAR=float): value and output are bfloat16 (raw uint16 bits), locations and
 * weights float; each output row is summed in float and rounded to bfloat16 once, at the end. No backward. */
#ifdef VALUE_BF16
typedef uint16_t value_t;
static inline float load_value(value_t v) {
    union { uint32_t u; float f; } c = {.u = (uint32_t)v << 16};
    return c.f;
}
static inline value_t store_value(float f) { /* round to nearest even, NaN stays NaN */
    union { uint32_t u; float f; } c = {.f = f};
    if (f != f) return 0x7fc0;
    return (value_t)((c.u + 0x7fffu + ((c.u >> 16) & 1u)) >> 16);
}
#else
typedef scalar_t value_t;
#define load_value(v) (v)
#define store_value(v) (v)
#endif

/* The four corners of one sample: token (-1 where it is padding), bilinear weight, and the weight's slopes
 * d weight / d pixel-x and d weight / d pixel-y. */
typedef struct {
    int64_t token[4];
    scalar_t weight[4], slope_x[4], slope_y[4];
} corners_t;

static inline void find_corners(scalar_t x, scalar_t y, const int64_t *level, corners_t *c) {
    const int64_t height = level[0], width = level[1], start = level[2];
    scalar_t px = x * (scalar_t)width - (scalar_t)0.5, py = y * (scalar_t)height - (scalar_t)0.5;
    /* Far-out points (and NaN) move to just outside the map, where every corner is padding: the sample is zero,
     * as in grid_sample, and the conversion to an integer stays defined. */
    if (!(px > -2)) px = -2;
    if (!(px < (scalar_t)width + 1)) px = (scalar_t)width + 1;
    if (!(py > -2)) py = -2;
    if (!(py < (scalar_t)height + 1)) py = (scalar_t)height + 1;
    const scalar_t x0 = floor(px), y0 = floor(py);
    const scalar_t fx = px - x0, fy = py - y0;
    for (int k = 0; k < 4; ++k) {
        const int dx = k & 1, dy = k >> 1;
        const int64_t cx = (int64_t)x0 + dx, cy = (int64_t)y0 + dy;
        const scalar_t wx = dx ? fx : 1 - fx, wy = dy ? fy : 1 - fy;
        c->weight[k] = wx * wy;
        c->slope_x[k] = dx ? wy : -wy;
        c->slope_y[k] = dy ? wx : -wx;
        c->token[k] = (cx >= 0 && cx < width && cy >= 0 && cy < height) ? start + cy * width + cx : -1;
    }
}

/* Queries per forward task: tasks are (batch, head, block of queries), so that a batch of one still spreads over
 * many threads while each task walks neighbouring queries of one pair. */
#define QUERY_BLOCK 64

void msda_forward(const value_t *value, const int64_t *levels, const scalar_t *locations, const scalar_t *weights,
                  value_t *output, int64_t batch, int64_t tokens, int64_t queries, int64_t heads, int64_t dim,
                  int64_t num_levels, int64_t num_points, int threads) {
    const int64_t samples = num_levels * num_points;
    const int64_t blocks = (queries + QUERY_BLOCK - 1) / QUERY_BLOCK;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t task = 0; task < batch * heads * blocks; ++task) {
        const int64_t pair = task / blocks, b = pair / heads, h = pair % heads;
        const int64_t first = task % blocks * QUERY_BLOCK;
        const int64_t last = first + QUERY_BLOCK < queries ? first + QUERY_BLOCK : queries;
        const value_t *pair_value = value + pair * tokens * dim;
        /* Padding corners read this zero row: the four corners then add up in one pass over D, branch-free. */
        value_t zero_row[dim];
        memset(zero_row, 0, sizeof(zero_row));
        scalar_t sum[dim];
        for (int64_t q = first; q < last; ++q) {
            const int64_t row = (b * queries + q) * heads + h;
            const scalar_t *row_locations = locations + row * samples * 2, *row_weights = weights + row * samples;
            scalar_t *restrict out = sum;
            memset(out, 0, sizeof(sum));
            for (int64_t l = 0, s = 0; l < num_levels; ++l) {
                for (int64_t p = 0; p < num_points; ++p, ++s) {
                    corners_t c;
                    find_corners(row_locations[2 * s], row_locations[2 * s + 1], levels + 3 * l, &c);
                    const value_t *restrict v[4];
                    scalar_t coefficient[4];
                    for (int k = 0; k < 4; ++k) {
                        v[k] = c.token[k] < 0 ? zero_row : pair_value + c.token[k] * dim;
                        coefficient[k] = row_weights[s] * c.weight[k];
                    }
                    for (int64_t d = 0; d < dim; ++d)
                        out[d] += coefficient[0] * load_value(v[0][d]) + coefficient[1] * load_value(v[1][d]) +
                                  coefficient[2] * load_value(v[2][d]) + coefficient[3] * load_value(v[3][d]);
                }
            }
            value_t *restrict destination = output + row * dim;
            for (int64_t d = 0; d < dim; ++d) destination[d] = store_value(sum[d]);
        }
    }
}

#ifndef VALUE_BF16
/* grad_value must be zeroed by the caller; grad_locations and grad_weights are fully written. */
void msda_backward(const scalar_t *value, const int64_t *levels, const scalar_t *locations, const scalar_t *weights,
                   const scalar_t *grad_output, scalar_t *grad_value, scalar_t *grad_locations,
                   scalar_t *grad_weights, int64_t batch, int64_t tokens, int64_t queries, int64_t heads, int64_t dim,
                   int64_t num_levels, int64_t num_points, int threads) {
    const int64_t samples = num_levels * num_points;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t pair = 0; pair < batch * heads; ++pair) { /* pair = b * H + h */
        const int64_t b = pair / heads, h = pair % heads;
        const int64_t offset = pair * tokens * dim;
        const scalar_t *pair_value = value + offset;
        scalar_t *pair_grad_value = grad_value + offset;
        /* Padding corners read the zero row and write their (unused) value gradient into the sink row, so the four
         * corners share one branch-free pass over D. */
        scalar_t zero_row[dim], sink_row[dim];
        memset(zero_row, 0, sizeof(zero_row));
        for (int64_t q = 0; q < queries; ++q) {
            const int64_t row = (b * queries + q) * heads + h;
            const scalar_t *row_locations = locations + row * samples * 2, *row_weights = weights + row * samples;
            const scalar_t *restrict g = grad_output + row * dim;
            scalar_t *row_grad_locations = grad_locations + row * samples * 2;
            scalar_t *row_grad_weights = grad_weights + row * samples;
            for (int64_t l = 0, s = 0; l < num_levels; ++l) {
                const int64_t *level = levels + 3 * l;
                for (int64_t p = 0; p < num_points; ++p, ++s) {
                    corners_t c;
                    find_corners(row_locations[2 * s], row_locations[2 * s + 1], level, &c);
                    const scalar_t *restrict v[4];
                    scalar_t *restrict gv[4];
                    scalar_t coefficient[4];
                    for (int k = 0; k < 4; ++k) {
                        v[k] = c.token[k] < 0 ? zero_row : pair_value + c.token[k] * dim;
                        gv[k] = c.token[k] < 0 ? sink_row : pair_grad_value + c.token[k] * dim;
                        coefficient[k] = row_weights[s] * c.weight[k];
                    }
                    /* grad_weight = sum_k weight_k <v_k, g> and likewise for the slopes: three dot products of g
                     * with corner mixes, not four with the corners (simd reductions: the sum may be reordered). */
                    scalar_t grad_weight = 0, grad_x = 0, grad_y = 0;
#pragma omp simd reduction(+ : grad_weight, grad_x, grad_y)
                    for (int64_t d = 0; d < dim; ++d) {
                        const scalar_t gd = g[d];
                        grad_weight += gd * (c.weight[0] * v[0][d] + c.weight[1] * v[1][d] + c.weight[2] * v[2][d] +
                                             c.weight[3] * v[3][d]);
                        grad_x += gd * (c.slope_x[0] * v[0][d] + c.slope_x[1] * v[1][d] + c.slope_x[2] * v[2][d] +
                                        c.slope_x[3] * v[3][d]);
                        grad_y += gd * (c.slope_y[0] * v[0][d] + c.slope_y[1] * v[1][d] + c.slope_y[2] * v[2][d] +
                                        c.slope_y[3] * v[3][d]);
                        gv[0][d] += coefficient[0] * gd;
                        gv[1][d] += coefficient[1] * gd;
                        gv[2][d] += coefficient[2] * gd;
                        gv[3][d] += coefficient[3] * gd;
                    }
                    /* d pixel-x / d x = width, d pixel-y / d y = height */
                    row_grad_weights[s] = grad_weight;
                    row_grad_locations[2 * s] = row_weights[s] * grad_x * (scalar_t)level[1];
                    row_grad_locations[2 * s + 1] = row_weights[s] * grad_y * (scalar_t)level[0];
                }
            }
        }
    }
}
#endif /* VALUE_BF16 */
