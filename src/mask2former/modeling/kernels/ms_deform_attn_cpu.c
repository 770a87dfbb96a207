/* Multi-scale deformable attention sampling core for the CPU, forward and backward.
 *
 * Compiled at run time by cpu_ms_deform_attn.py, once per SCALAR (float or double, set on the command line), and
 * called through ctypes. All tensors are contiguous:
 *   value [B, S, H, D]; locations [B, Q, H, L, P, 2] as (x, y) in [0, 1]; weights [B, Q, H, L, P];
 *   output [B, Q, H, D]; levels [L, 3] int64 as (height, width, first token).
 * Sampling is bilinear with align_corners=False and zero padding, as grid_sample does: pixel x = x * width - 0.5.
 *
 * Both passes walk the queries of one (batch, head) pair in turn: neighbouring queries sample neighbouring pixels,
 * and one pair's value slice ([S, D]) stays in cache. Threads are OpenMP's (built with -fopenmp, the library
 * shares PyTorch's libgomp and its thread pool; without it the loops run serially). The forward splits that
 * (batch, head, query) order between threads; the backward splits the B*H pairs, so every thread owns its slice of
 * the value gradient: no atomics, and the result does not depend on the number of threads.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

typedef SCALAR scalar_t;

/* The four corners of one sample: token (-1 where it is padding), bilinear weight, and the weight's slopes
 * d weight / d pixel-x and d weight / d pixel-y. */
typedef struct {
    int64_t token[4];
    scalar_t weight[4], slope_x[4], slope_y[4];
} corners_t;

static void find_corners(scalar_t x, scalar_t y, const int64_t *level, corners_t *c) {
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

void msda_forward(const scalar_t *value, const int64_t *levels, const scalar_t *locations, const scalar_t *weights,
                  scalar_t *output, int64_t batch, int64_t tokens, int64_t queries, int64_t heads, int64_t dim,
                  int64_t num_levels, int64_t num_points, int threads) {
    const int64_t samples = num_levels * num_points, token_stride = heads * dim;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t item = 0; item < batch * heads * queries; ++item) { /* item = (b * H + h) * Q + q */
        const int64_t q = item % queries, h = item / queries % heads, b = item / (queries * heads);
        const int64_t row = (b * queries + q) * heads + h;
        const scalar_t *pair_value = value + b * tokens * token_stride + h * dim;
        const scalar_t *row_locations = locations + row * samples * 2, *row_weights = weights + row * samples;
        scalar_t *restrict out = output + row * dim;
        memset(out, 0, (size_t)dim * sizeof(scalar_t));
        for (int64_t s = 0; s < samples; ++s) {
            corners_t c;
            find_corners(row_locations[2 * s], row_locations[2 * s + 1], levels + 3 * (s / num_points), &c);
            for (int k = 0; k < 4; ++k) {
                if (c.token[k] < 0) continue;
                const scalar_t coefficient = row_weights[s] * c.weight[k];
                const scalar_t *restrict v = pair_value + c.token[k] * token_stride;
                for (int64_t d = 0; d < dim; ++d) out[d] += coefficient * v[d];
            }
        }
    }
}

/* grad_value must be zeroed by the caller; grad_locations and grad_weights are fully written. */
void msda_backward(const scalar_t *value, const int64_t *levels, const scalar_t *locations, const scalar_t *weights,
                   const scalar_t *grad_output, scalar_t *grad_value, scalar_t *grad_locations,
                   scalar_t *grad_weights, int64_t batch, int64_t tokens, int64_t queries, int64_t heads, int64_t dim,
                   int64_t num_levels, int64_t num_points, int threads) {
    const int64_t samples = num_levels * num_points, token_stride = heads * dim;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t pair = 0; pair < batch * heads; ++pair) { /* pair = b * H + h */
        const int64_t b = pair / heads, h = pair % heads;
        const int64_t offset = b * tokens * token_stride + h * dim;
        const scalar_t *pair_value = value + offset;
        scalar_t *pair_grad_value = grad_value + offset;
        for (int64_t q = 0; q < queries; ++q) {
            const int64_t row = (b * queries + q) * heads + h;
            const scalar_t *row_locations = locations + row * samples * 2, *row_weights = weights + row * samples;
            const scalar_t *restrict g = grad_output + row * dim;
            for (int64_t s = 0; s < samples; ++s) {
                const int64_t *level = levels + 3 * (s / num_points);
                corners_t c;
                find_corners(row_locations[2 * s], row_locations[2 * s + 1], level, &c);
                scalar_t grad_weight = 0, grad_x = 0, grad_y = 0;
                for (int k = 0; k < 4; ++k) {
                    if (c.token[k] < 0) continue;
                    const scalar_t *restrict v = pair_value + c.token[k] * token_stride;
                    scalar_t *restrict gv = pair_grad_value + c.token[k] * token_stride;
                    const scalar_t coefficient = row_weights[s] * c.weight[k];
                    scalar_t dot = 0;
                    /* simd reduction: lets the compiler vectorise the dot product (it may reorder the sum) */
#pragma omp simd reduction(+ : dot)
                    for (int64_t d = 0; d < dim; ++d) {
                        dot += v[d] * g[d];
                        gv[d] += coefficient * g[d];
                    }
                    grad_weight += c.weight[k] * dot;
                    grad_x += c.slope_x[k] * dot;
                    grad_y += c.slope_y[k] * dot;
                }
                /* d pixel-x / d x = width, d pixel-y / d y = height */
                grad_weights[row * samples + s] = grad_weight;
                grad_locations[(row * samples + s) * 2] = row_weights[s] * grad_x * (scalar_t)level[1];
                grad_locations[(row * samples + s) * 2 + 1] = row_weights[s] * grad_y * (scalar_t)level[0];
            }
        }
    }
}
