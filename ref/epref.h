/*
 * epref: the CPU reference for epcomm.
 *
 * Plain C11, written from ../shared/SPEC.md and independent of the CUDA kernels (it shares no code with
 * src/). It simulates R ranks in one process and is the oracle for every test: a GPU test draws the inputs
 * of all R ranks from (seed, rank), runs the reference for its own rank and compares.
 *
 * Conventions
 * - bf16 values are uint16_t bit patterns, e4m3 (float8_e4m3fn) values are uint8_t bit patterns.
 * - Token rows in normal mode are opaque bytes (dispatch only moves them); a row is `row_bytes` long and rows
 *   are `stride_bytes` apart. Scale rows are opaque 4-byte words (float32 scales or packed UE8M0 int32).
 * - Every function that can fail returns an epref_status_t and leaves outputs untouched on error.
 * - Results that the reference allocates are freed with the matching *_free function.
 *
 * Numeric definitions (the kernels must reproduce these bit for bit where SPEC.md says deterministic):
 * - bf16 from float: round to nearest even; NaN stays NaN (quiet, sign kept: (bits >> 16) | 0x0040);
 *   +-Inf stays +-Inf; overflow rounds to +-Inf as IEEE says.
 * - e4m3 from float: round to nearest even, saturating: |x| >= 448 (after rounding) gives +-448 (0x7E/0xFE);
 *   +-Inf saturates to +-448; NaN gives 0x7F (sign kept: 0xFF for negative NaN). Subnormals (2^-9 steps)
 *   are kept. This matches CUDA's __nv_cvt_float_to_fp8(x, __NV_SATFINITE, __NV_E4M3).
 * - FP8 cast of a 128-channel group (low-latency dispatch): amax = max |float(x)| over the group (NaN
 *   ignored), clamped to >= 1e-4f. Plain: scale_inv = amax * (1.0f / 448.0f), scale = 448.0f / amax (IEEE
 *   division). round_scale: e = ceil(log2(amax * (1.0f / 448.0f))) taken exactly from the float's bits,
 *   scale_inv = 2^e, scale = 2^-e. Values: e4m3(float(x) * scale). UE8M0: the biased exponent byte of
 *   scale_inv ((bits >> 23) & 0xFF); group g goes to byte (g % 4) of int32 word g / 4 (byte 0 = least
 *   significant).
 * - Normal combine: acc = 0.0f; for each destination rank d in ascending order that the token went to:
 *   acc += float(row_d); then acc += float(bias0), then acc += float(bias1) (when given); out = bf16(acc).
 *   Weights: wacc = 0.0f; wacc += w_d for d ascending; no rounding.
 * - Low-latency combine: acc = 0.0f; for k = 0..K-1 with topk_idx[t,k] >= 0: acc = fmaf(w[t,k], v, acc)
 *   where v = float(row) (or the LogFMT-decoded value); out = bf16(acc).
 * - NaN/Inf policy: dispatch moves bytes unchanged; casts and sums follow IEEE float32 (a NaN or Inf in a
 *   token propagates into the sums it takes part in); the FP8 cast ignores NaN for amax, and an Inf makes
 *   amax Inf, so scale_inv = Inf, scale = 0 and every finite value of the group casts to +-0 (0x00/0x80)
 *   while the Inf casts to NaN (0 * Inf) -> 0x7F. In the group cast every NaN product gives 0x7F whatever
 *   its sign, because the sign of a NaN made by arithmetic is not portable (a GPU's is always positive).
 *   Likewise the bits of a NaN in a bf16 sum are not portable: compare NaN outputs as "is NaN", never by
 *   bits. LogFMT keeps a group with a NaN or Inf as raw bf16. The tests document this with explicit cases.
 */
#ifndef EPREF_H
#define EPREF_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
    EPREF_OK = 0,
    EPREF_BAD_ARGUMENT = 1, /* a size, pointer or count is invalid (message says which) */
    EPREF_BAD_EXPERT = 2,   /* an expert id outside [-1, E) */
    EPREF_NO_MEMORY = 3,
    EPREF_TOO_MANY = 4, /* a count exceeds a given capacity (e.g. num_worst_tokens, T) */
} epref_status_t;

/* The message of the last failure in this thread ("" if none). */
const char *epref_last_error(void);

/* ---- number formats ---- */
float epref_bf16_to_float(uint16_t v);
uint16_t epref_float_to_bf16(float f);
float epref_e4m3_to_float(uint8_t v);
uint8_t epref_float_to_e4m3(float f);

/* FP8 cast of one group of `n` (normally 128) bf16 values, as defined above.
 * Writes n e4m3 values to q and returns scale_inv through *scale_inv. */
void epref_cast_fp8_group(const uint16_t *x, int n, int round_scale, uint8_t *q, float *scale_inv);
/* The UE8M0 byte of a power-of-two scale_inv. */
uint8_t epref_ue8m0_byte(float scale_inv);

/* LogFMT (low-latency combine, use_logfmt): encode one group of n (normally 128) bf16 values and decode it
 * back to float. The exact algorithm (ranges, rounding, when raw bf16 is kept) is documented in ref/logfmt.c.
 * Returns 1 if the group was encoded in log format, 0 if it was sent as raw bf16 (then out = float(x)). */
int epref_logfmt_roundtrip(const uint16_t *x, int n, float *out);
/* The relative error bound of one group's round trip (0 for a raw group): |out - x| <= bound * |x| for every
 * normal x that is not flushed to zero. Never above EPREF_LOGFMT_MAX_REL_ERROR. See ref/logfmt.c. */
double epref_logfmt_error_bound(const uint16_t *x, int n);
#define EPREF_LOGFMT_MAX_REL_ERROR 0.0324

/* ---- layout (one rank's tokens) ----
 * topk_idx: [N, K] int64 with row stride K. Outputs (any may be NULL):
 * tokens_per_rank[R], tokens_per_expert[E], is_token_in_rank[N, R] (0/1).
 * Fails with EPREF_BAD_EXPERT (message names token, k and value) for ids outside [-1, E).
 * Requires E % R == 0. */
epref_status_t epref_dispatch_layout(const int64_t *topk_idx, int num_tokens, int topk, int num_ranks, int num_experts,
                                     int32_t *tokens_per_rank, int32_t *tokens_per_expert, uint8_t *is_token_in_rank);

/* ---- the inputs of one simulated rank ---- */
typedef struct {
    int num_tokens;            /* N (may be 0) */
    const uint8_t *x;          /* [N] rows of row_bytes, stride_bytes apart */
    size_t row_bytes;          /* same on every rank */
    size_t stride_bytes;       /* >= row_bytes */
    const uint32_t *scales;    /* [N, num_scales] 4-byte words, or NULL */
    int num_scales;            /* words per row (0 when scales == NULL) */
    size_t scales_stride;      /* in words, >= num_scales */
    int topk;                  /* K >= 1, same on every rank */
    const int64_t *topk_idx;   /* [N, K], row stride K */
    const float *topk_weights; /* [N, K], row stride K, or NULL (then NULL on every rank with tokens) */
} epref_rank_input_t;

/* ---- high-throughput (normal) dispatch: what destination rank `rank` receives ---- */
typedef struct {
    int num_recv; /* Nr: real received tokens */
    int num_rows; /* rows in the arrays: Nr, or num_worst_tokens when that was given */
    size_t row_bytes;
    int num_scales; /* words per row, 0 if no scales */
    int topk;       /* K */
    int num_local_experts;
    uint8_t *x;                   /* [num_rows, row_bytes] packed; rows past Nr are zero */
    uint32_t *scales;             /* [num_rows, num_scales] or NULL; rows past Nr zero */
    int64_t *topk_idx;            /* [num_rows, K]: local expert ids, -1 for experts elsewhere; -1 past Nr */
    float *topk_weights;          /* [num_rows, K]: 0 where idx is -1; NULL when inputs had no weights */
    int32_t *src_rank;            /* [num_rows]: source rank of each row (-1 past Nr) */
    int32_t *src_token;           /* [num_rows]: token index at the source (-1 past Nr) */
    int32_t *num_recv_per_expert; /* [L]: per local expert, rounded up to expert_alignment; NULL (and
                                     per_expert_valid = 0) in worst-token mode */
    int per_expert_valid;
} epref_dispatch_result_t;

/* Simulates normal dispatch for all R ranks' inputs `in[0..R-1]` and returns what `rank` receives:
 * each token goes once to every rank that holds at least one of its experts; rows ordered by
 * (source rank, source token). expert_alignment >= 1. num_worst_tokens > 0: the result has exactly that many
 * rows (EPREF_TOO_MANY if Nr exceeds it) and no per-expert list. */
epref_status_t epref_dispatch(const epref_rank_input_t *in, int num_ranks, int num_experts, int rank,
                              int expert_alignment, int num_worst_tokens, epref_dispatch_result_t *out);
void epref_dispatch_result_free(epref_dispatch_result_t *r);

/* ---- high-throughput combine: what source rank `rank` gets back ----
 * recv[d]: the dispatch result of destination rank d (as returned by epref_dispatch for rank d);
 * x[d]: [Nr_d, H] bf16 rows that rank d sends back, row stride x_stride[d] elements;
 * weights: NULL (no weights are combined), or weights[d] = [Nr_d, K] float for every d that received rows.
 * topk_idx of `rank` (from in[rank]) says where each token went (via is_token_in_rank semantics).
 * bias0/bias1: [N, H] bf16 of `rank`, row stride H, or NULL.
 * out: [N, H] bf16 (row stride H); out_weights: [N, K] or NULL. Fails with EPREF_BAD_ARGUMENT if recv does
 * not hold exactly the rows that in[rank]'s routing sends (checked via src_rank / src_token). */
epref_status_t epref_combine(const epref_rank_input_t *in, const epref_dispatch_result_t *recv,
                             const uint16_t *const *x, const size_t *x_stride, const float *const *weights,
                             int num_ranks, int num_experts, int rank, int hidden, const uint16_t *bias0,
                             const uint16_t *bias1, uint16_t *out, float *out_weights);

/* ---- low-latency dispatch: what destination rank `rank` receives ----
 * Inputs: in[s].x holds bf16 rows (row_bytes = 2*H); scales ignored. N_s <= T on every rank.
 * Output arrays are logical row-major; the caller maps them to the kernels' layouts. */
typedef struct {
    int num_local_experts; /* L */
    int max_tokens;        /* T */
    int num_ranks;         /* R */
    int hidden;            /* H */
    int use_fp8, round_scale, use_ue8m0;
    int32_t *recv_count; /* [L] */
    /* [L, R*T, H]: bf16 (uint16_t) when !use_fp8, else e4m3 bytes. Rows past recv_count are zero. */
    void *x;
    /* FP8 only: [L, R*T, H/128] float scale_inv (use_ue8m0 == 0), or [L, R*T, H/512] packed int32 words
     * (use_ue8m0 == 1); NULL otherwise. Row-major here (the kernel's column-major layout is the test's
     * business). */
    void *scales;
    int32_t *src_info;     /* [L, R*T]: source token index; -1 past recv_count */
    int64_t *layout_range; /* [L, R]: (begin << 32) | count of the rows from each source rank; begin = rows
                              from lower source ranks, also when count is 0 */
} epref_ll_dispatch_result_t;

/* A (token, expert) pair counts once even if the expert appears twice in a token's top-k.
 * Fails with EPREF_TOO_MANY if some N_s > T, EPREF_BAD_ARGUMENT if use_ue8m0 without round_scale or
 * H % 128 (H % 512 for UE8M0) != 0. Without use_fp8, round_scale and use_ue8m0 are ignored (stored as 0). */
epref_status_t epref_ll_dispatch(const epref_rank_input_t *in, int num_ranks, int num_experts, int max_tokens,
                                 int hidden, int rank, int use_fp8, int round_scale, int use_ue8m0,
                                 epref_ll_dispatch_result_t *out);
void epref_ll_dispatch_result_free(epref_ll_dispatch_result_t *r);

/* ---- low-latency combine: what source rank `rank` gets back ----
 * expert_out[d]: [L, R*T, H] bf16 of destination rank d (the rows each expert produced, in the order of
 * d's ll dispatch result); recv[d]: d's ll dispatch result (for src_info / layout_range).
 * topk_idx / topk_weights: `rank`'s [N, K]. out: [N, H] bf16. use_logfmt: each row passes through
 * epref_logfmt_roundtrip per 128-channel group before weighting. */
epref_status_t epref_ll_combine(const uint16_t *const *expert_out, const epref_ll_dispatch_result_t *recv,
                                int num_ranks, int num_experts, int rank, int num_tokens, int topk,
                                const int64_t *topk_idx, const float *topk_weights, int use_logfmt, uint16_t *out);

/* Per-rank sums (the experimental EPCOMM_LL_COMBINE_PER_RANK combine): for each rank d that token t reached, in
 * the order of the first k naming d: part = 0.0f; for the k naming d, in k order: part = fmaf(w[t,k], v, part);
 * acc += float(bf16(part)). out = bf16(acc). Two roundings instead of one: out is within (2^-7 + float32's
 * error) of the sum of |w * v| over the token's k from the exact sum (each part's rounding and the total's, 2^-8
 * each; the one-rounding combine: 2^-8 of |sum|), not bit-exact with epref_ll_combine. Same arguments and errors
 * as epref_ll_combine (bf16 rows only). */
epref_status_t epref_ll_combine_per_rank(const uint16_t *const *expert_out, const epref_ll_dispatch_result_t *recv,
                                         int num_ranks, int num_experts, int rank, int num_tokens, int topk,
                                         const int64_t *topk_idx, const float *topk_weights, uint16_t *out);

/* ---- deterministic random inputs, so every process draws the same data ---- */
typedef struct {
    uint64_t s[2];
} epref_rng_t;
void epref_rng_seed(epref_rng_t *r, uint64_t seed, uint64_t stream);
uint64_t epref_rng_next(epref_rng_t *r);
float epref_rng_uniform(epref_rng_t *r); /* [0, 1) */
float epref_rng_normal(epref_rng_t *r);

/* Routing as PERF.md describes: for each token, top-K of (|randn| + 1) scores over E experts (distinct
 * experts), written to topk_idx [N, K]; weights (if not NULL) uniform in [0.5, 1.5). mask_prob in [0,1]:
 * each entry is independently replaced by -1 with that probability. Experts are listed by descending score.
 * The draws per token and their order are listed in ref/routing.c (the experts do not depend on whether
 * weights are asked for). Fails (EPREF_BAD_ARGUMENT) unless 1 <= topk <= num_experts. */
epref_status_t epref_random_routing(epref_rng_t *r, int num_tokens, int topk, int num_experts, float mask_prob,
                                    int64_t *topk_idx, float *topk_weights);

#ifdef __cplusplus
}
#endif
#endif
