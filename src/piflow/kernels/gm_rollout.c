/* piflow: a whole GMFlow policy rollout, fused per pixel (CPU, C with GCC/Clang vector extensions).
 *
 * Every GM chunk (one C-vector per latent pixel) evolves on its own: a substep of pixel p needs only its K means,
 * Σ_c means², K logits, x_src and the sample's per-substep scalars. So each block of 8 pixels is loaded once, and
 * all of its substeps run on data held in L1; the posterior softmax over K is exact (max-subtracted). Lanes
 * may belong to different samples (2-D policies have one pixel per sample).
 *
 *   ν = a·x − b·x_src,  a'_k = logit_k + d·(μ_k·ν) − q·Σ_c μ_k,c²,  x̂0 = d·Σ_k softmax(a')_k μ_k + w·ν,
 *   x ← x + (x − x̂0)·h      with per-(substep, sample) scalars (a, b, d, q, w, h); h = 0 skips the substep.
 *
 * Layouts (float32, contiguous): means (B, K, C, S), means_sq (B, K, S), logits (B, K, S), x_src (B, C, S),
 * x (B, C, S) updated in place, coef (N, B, 6): substep j of sample b uses coef[j, b]. Runs the pixels
 * [pixel_start, pixel_end) of the flattened (B, S) range, so that threads can split the work.
 */
#include <stdint.h>

#define LANES 8
typedef float vf __attribute__((vector_size(4 * LANES)));
typedef int32_t vi __attribute__((vector_size(4 * LANES)));

static inline vf splat(float value) { return (vf){0} + value; }

static inline vf select_gt(vf a, vf b) {          /* elementwise max(a, b); a NaN in a propagates as in max */
    vi take_b = b > a;
    return (vf)(((vi)a & ~take_b) | ((vi)b & take_b));
}

/* exp(x) for x <= 0 (a max-subtracted logit), exactly 0 below -87 (and for -inf); relative error ~2e-7
 * (Cody-Waite reduction by ln 2, degree-6 polynomial of the Cephes expf). */
static inline vf exp_nonpositive(vf x) {
    vi keep = x >= splat(-87.0f);
    vf clamped = (vf)(((vi)x & keep) | ((vi)splat(-87.0f) & ~keep));
    vf n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;     /* round to nearest */
    vf r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
    vf p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
    return (vf)((vi)(p * (vf)bits) & keep);
}

static inline __attribute__((always_inline)) void
rollout_blocks(const int64_t batch, const int64_t K, const int64_t C, const int64_t S, const float *means,
               const float *means_sq, const float *logits, const float *x_src, float *x, const float *coef,
               const int64_t num_substeps, const int64_t pixel_start, const int64_t pixel_end) {
    vf mu[K][C], msq[K], lg[K], post[K], xs[C], xv[C], nu[C], acc[C];
    int64_t lane_b[LANES], lane_s[LANES];
    for (int64_t flat = pixel_start; flat < pixel_end; flat += LANES) {
        /* Lane i holds flat pixel (b, s) = flat + i (a block may span samples); a short last block repeats its
         * last pixel in the spare lanes, which are never stored. */
        const int64_t width = pixel_end - flat < LANES ? pixel_end - flat : LANES;
        for (int64_t i = 0; i < LANES; ++i) {
            const int64_t f = flat + (i < width ? i : width - 1), b = f / S, s = f % S;
            lane_b[i] = b;
            lane_s[i] = s;
            for (int64_t k = 0; k < K; ++k) {
                for (int64_t c = 0; c < C; ++c) mu[k][c][i] = means[((b * K + k) * C + c) * S + s];
                msq[k][i] = means_sq[(b * K + k) * S + s];
                lg[k][i] = logits[(b * K + k) * S + s];
            }
            for (int64_t c = 0; c < C; ++c) {
                xs[c][i] = x_src[(b * C + c) * S + s];
                xv[c][i] = x[(b * C + c) * S + s];
            }
        }
        const int same_sample = lane_b[0] == lane_b[LANES - 1];
        for (int64_t j = 0; j < num_substeps; ++j) {
            vf ca, cb, cd, cq, cw, ch;
            if (same_sample) {
                const float *q = coef + (j * batch + lane_b[0]) * 6;
                if (q[5] == 0.0f) continue;                         /* a zero-length substep: nothing to do */
                ca = splat(q[0]); cb = splat(q[1]); cd = splat(q[2]); cq = splat(q[3]); cw = splat(q[4]);
                ch = splat(q[5]);
            } else {
                int any = 0;
                for (int64_t i = 0; i < LANES; ++i) {
                    const float *q = coef + (j * batch + lane_b[i]) * 6;
                    ca[i] = q[0]; cb[i] = q[1]; cd[i] = q[2]; cq[i] = q[3]; cw[i] = q[4]; ch[i] = q[5];
                    any |= q[5] != 0.0f;
                }
                if (!any) continue;
            }
            for (int64_t c = 0; c < C; ++c) nu[c] = ca * xv[c] - cb * xs[c];
            vf best = splat(-__builtin_inff());
            for (int64_t k = 0; k < K; ++k) {
                vf dot = mu[k][0] * nu[0];
                for (int64_t c = 1; c < C; ++c) dot += mu[k][c] * nu[c];
                post[k] = lg[k] + cd * dot - cq * msq[k];
                best = select_gt(best, post[k]);
            }
            vf total = splat(0.0f);
            for (int64_t c = 0; c < C; ++c) acc[c] = splat(0.0f);
            for (int64_t k = 0; k < K; ++k) {
                const vf weight = exp_nonpositive(post[k] - best);
                total += weight;
                for (int64_t c = 0; c < C; ++c) acc[c] += weight * mu[k][c];
            }
            const vf scale = cd / total;
            const vi moving = ch != splat(0.0f);                    /* lanes whose substep has length */
            for (int64_t c = 0; c < C; ++c) {
                const vf step = (xv[c] - (scale * acc[c] + cw * nu[c])) * ch;
                xv[c] += (vf)((vi)step & moving);
            }
        }
        for (int64_t i = 0; i < width; ++i)
            for (int64_t c = 0; c < C; ++c) x[(lane_b[i] * C + c) * S + lane_s[i]] = xv[c][i];
    }
}

/* The entry point: common channel counts get their own copy of the loop (a compile-time C keeps the per-channel
 * accumulators in registers); any other count runs the generic copy. */
void gm_rollout(int64_t batch, int64_t num_components, int64_t channels, int64_t pixels,
                const float *means, const float *means_sq, const float *logits, const float *x_src, float *x,
                const float *coef, int64_t num_substeps, int64_t pixel_start, int64_t pixel_end) {
#define PIFLOW_ROLLOUT(C) rollout_blocks(batch, num_components, C, pixels, means, means_sq, logits, x_src, x, \
                                         coef, num_substeps, pixel_start, pixel_end)
    switch (channels) {
        case 1: PIFLOW_ROLLOUT(1); break;
        case 2: PIFLOW_ROLLOUT(2); break;
        case 3: PIFLOW_ROLLOUT(3); break;
        case 4: PIFLOW_ROLLOUT(4); break;
        case 8: PIFLOW_ROLLOUT(8); break;
        case 16: PIFLOW_ROLLOUT(16); break;
        default: PIFLOW_ROLLOUT(channels); break;
    }
#undef PIFLOW_ROLLOUT
}
