/* Helpers shared by the reference's files; not part of the public epref.h. */
#ifndef EPREF_INTERNAL_H
#define EPREF_INTERNAL_H

#include "epref.h"

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define EPREF_PRINTF(f, a) __attribute__((format(printf, f, a)))
#else
#define EPREF_PRINTF(f, a)
#endif

/* error.c: records a message for epref_last_error() and returns `status`, so callers write
 * `return epref_fail(EPREF_BAD_ARGUMENT, "...")`. */
epref_status_t epref_fail(epref_status_t status, const char *fmt, ...) EPREF_PRINTF(2, 3);

/* alloc.c: zeroed arrays whose byte size is checked for overflow; a zero count still returns a valid
 * pointer, so a NULL result always means "out of memory". */
void *epref_zalloc(size_t count, size_t elem_bytes);
/* a * b * c without overflow; returns 0 (and leaves *out alone) if it would overflow. */
int epref_mul3(size_t a, size_t b, size_t c, size_t *out);

/* topk.c: the shared routing checks and queries. */
/* Every id in idx[n, k] lies in [-1, num_experts); otherwise EPREF_BAD_EXPERT naming `owner`, token, k, id. */
epref_status_t epref_check_topk_ids(const int64_t *idx, int num_tokens, int topk, int num_experts, const char *owner);
/* The checks every dispatch makes on the R ranks' inputs: counts, topk (same on every rank), pointers,
 * strides, and expert ids (EPREF_BAD_EXPERT naming rank, token, k and id). `op` prefixes the message. */
epref_status_t epref_check_rank_inputs(const epref_rank_input_t *in, int num_ranks, int num_experts, const char *op);
/* 1 if some entry of one token's top-k row names an expert of `rank` (L local experts per rank). */
int epref_token_goes_to(const int64_t *row, int topk, int rank, int num_local_experts);

/* Reads bf16 element i of a row that may be unaligned (rows are opaque bytes with arbitrary strides). */
uint16_t epref_load_bf16(const uint8_t *row, size_t i);

#endif
