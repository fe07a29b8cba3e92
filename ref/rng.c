/* Deterministic random numbers, so that every process (one per GPU) draws the same inputs from (seed, stream).
 * The generator is xoroshiro128++ (Blackman and Vigna): small state, fast, and good enough for test data.
 * Its state is filled from (seed, stream) through the splitmix64 finaliser, so nearby seeds and streams give
 * unrelated sequences. */
#include "internal.h"

#include <math.h>

#define GOLDEN_GAMMA 0x9E3779B97F4A7C15ull
#define TWO_PI       6.283185307179586476925

static uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

static uint64_t rotl64(uint64_t x, int k) {
    return (x << k) | (x >> (64 - k));
}

void epref_rng_seed(epref_rng_t *r, uint64_t seed, uint64_t stream) {
    uint64_t key = mix64(mix64(seed + GOLDEN_GAMMA) ^ stream);
    r->s[0] = mix64(key + GOLDEN_GAMMA);
    r->s[1] = mix64(key + 2 * GOLDEN_GAMMA);
    if (r->s[0] == 0 && r->s[1] == 0) /* the one state the generator cannot leave */
        r->s[1] = 1;
}

uint64_t epref_rng_next(epref_rng_t *r) {
    uint64_t s0 = r->s[0], s1 = r->s[1];
    uint64_t result = rotl64(s0 + s1, 17) + s0;
    s1 ^= s0;
    r->s[0] = rotl64(s0, 49) ^ s1 ^ (s1 << 21);
    r->s[1] = rotl64(s1, 28);
    return result;
}

/* The top 24 bits: every float in [0, 1) on a 2^-24 grid, exactly, never 1. */
float epref_rng_uniform(epref_rng_t *r) {
    return (float)(epref_rng_next(r) >> 40) * 0x1p-24f;
}

/* Box-Muller in double (one normal per two draws), rounded to float once. */
float epref_rng_normal(epref_rng_t *r) {
    double u1 = (double)((epref_rng_next(r) >> 11) + 1) * 0x1p-53; /* (0, 1]: log(u1) is finite */
    double u2 = (double)(epref_rng_next(r) >> 11) * 0x1p-53;
    return (float)(sqrt(-2.0 * log(u1)) * cos(TWO_PI * u2));
}
