/* The host's reading of the device error record (ep_group_take_device_error), host only: the device claims the
 * record, writes the details, then publishes the status; the host must report the details, never a half-written
 * record (which read as "timed out in stage 'unknown stage' waiting for rank 0"). */
#define _POSIX_C_SOURCE 200809L
#include "error.h"
#include "group.h"
#include "kernels/ht_layout.h"
#include "kernels/ll_layout.h"
#include "tcheck.h"

#include <pthread.h>
#include <time.h>

static void fill_timeout(volatile ep_dev_error_t *e) {
    e->stage = EP_STAGE_GROUP_BARRIER;
    e->rank = 2;
    e->peer = 3;
    e->detail = 7;
    e->waited_ns = 1500000000ull;
}

/* A group with nothing but its host-mapped record, zeroed. */
static void fake_group(struct ep_group *g, ep_mapped_t *mapped) {
    memset(mapped, 0, sizeof(*mapped));
    memset(g, 0, sizeof(*g));
    g->mapped_host = mapped;
}

/* A device error record as rank 0's kernel leaves it (status last). */
static void fake_error(ep_mapped_t *mapped, int stage, int peer, uint64_t detail, uint64_t waited_ns, int32_t status) {
    mapped->error.stage = stage;
    mapped->error.rank = 0;
    mapped->error.peer = peer;
    mapped->error.detail = detail;
    mapped->error.waited_ns = waited_ns;
    mapped->error.status = status;
}

/* A bad-input record of one entry, as a kernel leaves it. */
static void fake_input_error(ep_mapped_t *mapped, int op, int kind, int k, int64_t value, int64_t token) {
    mapped->input_error.op = op;
    mapped->input_error.kind = kind;
    mapped->input_error.k = k;
    mapped->input_error.value = value;
    mapped->input_error.token = token;
    mapped->input_error.count = 1;
}

static void published_record_is_reported(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_SUCCESS);
    fill_timeout(&mapped.error);
    mapped.error.status = EP_ERROR_TIMEOUT;
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_TIMEOUT);
    TCHECK_STR_CONTAINS(ep_last_error(), "stage 'group barrier' waiting for rank 3 (epoch 7)");
    TCHECK_EQ_INT(g.failed, EP_ERROR_TIMEOUT);
}

/* Plays the device: the details and then the status land a few milliseconds after the claim. */
static void *publish_later(void *p) {
    volatile ep_dev_error_t *e = p;
    struct timespec nap = {0, 5000000};
    nanosleep(&nap, NULL);
    fill_timeout(e);
    __atomic_store_n(&e->status, EP_ERROR_TIMEOUT, __ATOMIC_RELEASE);
    return NULL;
}

static void claimed_record_is_read_once_published(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    mapped.error.status = EP_DEV_ERROR_WRITING;
    pthread_t t;
    pthread_create(&t, NULL, publish_later, &mapped.error);
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_TIMEOUT);
    TCHECK_STR_CONTAINS(ep_last_error(), "waiting for rank 3");
    pthread_join(t, NULL);
}

static void record_never_published_is_an_internal_error(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    mapped.error.status = EP_DEV_ERROR_WRITING;
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_INTERNAL);
    TCHECK_STR_CONTAINS(ep_last_error(), "did not finish");
}

/* ep_flag_overrun's record: bad input naming the peer that ran ahead, not a timeout. */
static void overrun_record_is_reported_as_such(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    fake_error(&mapped, EP_STAGE_LL_DISPATCH_RECV, 2, (9ull << 32) | 8, 0, EP_ERROR_DEVICE_INPUT);
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_DEVICE_INPUT);
    TCHECK_STR_CONTAINS(ep_last_error(), "stage 'low-latency dispatch (receive)': rank 2 had already sent a later "
                                         "call's data (epoch 9, this call's 8)");
    TCHECK(strstr(ep_last_error(), "timed out") == NULL, "not a timeout: %s", ep_last_error());
    TCHECK_EQ_INT(g.failed, EP_ERROR_DEVICE_INPUT); /* unlike bad expert ids, this one fails the group */
    fake_group(&g, &mapped);
    fake_error(&mapped, EP_STAGE_LL_COMBINE_RECV, 1, (5ull << 32) | 4, 0, EP_ERROR_DEVICE_INPUT);
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_DEVICE_INPUT);
    TCHECK_STR_CONTAINS(ep_last_error(), "stage 'low-latency combine (receive)': rank 1 had already sent");
}

/* A low-latency dispatch receive that found a peer's (T, H, K, E) or row format differing from its own
 * (layout_differs). */
static void layout_mismatch_names_both_layouts(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    fake_error(&mapped, EP_STAGE_LL_DISPATCH_RECV, 1, ep_ll_pack_layout(256, 7168, 8, 288, ep_ll_format(1, 1, 1)),
               ep_ll_pack_layout(128, 7168, 8, 288, ep_ll_format(0, 1, 1)), EP_DEV_STATUS_MISMATCH);
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "rank 0: stage 'low-latency dispatch (receive)': rank 1 called the "
                                         "low-latency dispatch with num_max_dispatch_tokens_per_rank=256, "
                                         "hidden=7168, num_topk=8, num_experts=288, use_fp8=1, round_scale=1, "
                                         "use_ue8m0=1, this rank with 128, 7168, 8, 288, 0, 0, 0");
    TCHECK_EQ_INT(g.failed, EP_ERROR_INVALID_ARGUMENT);
}

/* A low-latency combine receive that found a peer's rows in the other kind (per-rank sums or one row per k): the
 * message says which side sent what and names the setting. */
static void combine_kind_mismatch_names_the_setting(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    fake_error(&mapped, EP_STAGE_LL_COMBINE_RECV, 3, 1, 0, EP_DEV_STATUS_MISMATCH);
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "rank 0: stage 'low-latency combine (receive)': rank 3 sent one sum per "
                                         "token (per-rank combine), this rank expected one row per (token, k): "
                                         "EPCOMM_LL_COMBINE_PER_RANK must be set alike on every rank");
    TCHECK_EQ_INT(g.failed, EP_ERROR_INVALID_ARGUMENT);
    fake_group(&g, &mapped);
    fake_error(&mapped, EP_STAGE_LL_COMBINE_RECV, 1, 0, 1, EP_DEV_STATUS_MISMATCH);
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "rank 1 sent one row per (token, k), this rank expected one sum per token");
    /* a per-rank send that saw the peer's combine flag (rows per k) before any weights from it */
    fake_group(&g, &mapped);
    fake_error(&mapped, EP_STAGE_LL_COMBINE_WEIGHTS, 2, 0, 1, EP_DEV_STATUS_MISMATCH);
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "stage 'low-latency combine send (waiting for a source's weights)': rank 2 "
                                         "sent one row per (token, k), this rank expected one sum per token");
    /* and the stage the per-rank send waits in has a name */
    fake_group(&g, &mapped);
    fake_error(&mapped, EP_STAGE_LL_COMBINE_WEIGHTS, 2, 7, 31000000, EP_ERROR_TIMEOUT);
    TCHECK_EQ_INT(ep_group_take_device_error(&g), EP_ERROR_TIMEOUT);
    TCHECK_STR_CONTAINS(ep_last_error(), "stage 'low-latency combine send (waiting for a source's weights)' waiting "
                                         "for rank 2");
}

/* The packed layout round-trips at the limits the checks allow (T up to 2^16, H up to 2^16, K up to 16, E up to
 * 4096, every format), and any one size or format bit differing changes the word. */
static void layout_words_round_trip(void) {
    const int ts[] = {1, 128, 65536}, hs[] = {128, 7168, 65536}, ks[] = {1, 16}, es[] = {2, 288, 4096};
    const int fs[] = {ep_ll_format(0, 1, 1), ep_ll_format(1, 0, 0), ep_ll_format(1, 1, 0), ep_ll_format(1, 1, 1)};
    TCHECK_EQ_INT(fs[0], 0); /* scale options mean nothing without FP8 */
    for (int a = 0; a < 3; a++)
        for (int b = 0; b < 3; b++)
            for (int c = 0; c < 2; c++)
                for (int d = 0; d < 3; d++)
                    for (int i = 0; i < 4; i++) {
                        int t, h, k, e, f;
                        const uint64_t w = ep_ll_pack_layout(ts[a], hs[b], ks[c], es[d], fs[i]);
                        ep_ll_unpack_layout(w, &t, &h, &k, &e, &f);
                        TCHECK(t == ts[a] && h == hs[b] && k == ks[c] && e == es[d] && f == fs[i],
                               "(%d, %d, %d, %d, %d) came back (%d, %d, %d, %d, %d)", ts[a], hs[b], ks[c], es[d], fs[i],
                               t, h, k, e, f);
                        TCHECK(w != ep_ll_pack_layout(ts[a] == 1 ? 2 : 1, hs[b], ks[c], es[d], fs[i]), "T");
                        TCHECK(w != ep_ll_pack_layout(ts[a], hs[b] == 128 ? 256 : 128, ks[c], es[d], fs[i]), "H");
                        TCHECK(w != ep_ll_pack_layout(ts[a], hs[b], ks[c] == 1 ? 2 : 1, es[d], fs[i]), "K");
                        TCHECK(w != ep_ll_pack_layout(ts[a], hs[b], ks[c], es[d] == 2 ? 4 : 2, fs[i]), "E");
                        for (int j = 0; j < 4; j++)
                            TCHECK(j == i || w != ep_ll_pack_layout(ts[a], hs[b], ks[c], es[d], fs[j]), "format");
                    }
}

/* A dispatch whose sizes differ from a peer's (the count exchange compares every rank's ep_ht_pack_call word):
 * bad input naming the peer and both sets of sizes; the group stays usable (nothing was sent). */
static void call_mismatch_names_both_calls(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    g.rank = 1;
    const ep_ht_call_t bf16 = {.hidden = 3584, .topk = 8, .weights = 1, .num_experts = 256};
    const ep_ht_call_t fp8 = {.hidden = 7168, .fp8 = 1, .num_scales = 56, .topk = 8, .num_experts = 256};
    fake_input_error(&mapped, EP_STAGE_DISPATCH_NOTIFY, EP_INPUT_CALL_MISMATCH, 3, (int64_t)ep_ht_pack_call(&bf16),
                     (int64_t)ep_ht_pack_call(&fp8));
    TCHECK_EQ_INT(ep_group_take_input_error(&g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "rank 1: dispatch (count exchange): rank 3 called dispatch with "
                                         "hidden=3584, x bfloat16, num_topk=8, with topk_weights, num_experts=256; "
                                         "this rank with hidden=7168, x float8_e4m3fn with 56 float32 scales per "
                                         "token, num_topk=8, without topk_weights, num_experts=256: every rank must "
                                         "pass the same; nothing was sent");
    TCHECK_EQ_INT(g.failed, EP_SUCCESS);
    TCHECK_EQ_INT(ep_group_take_input_error(&g), EP_SUCCESS); /* taken once */
    /* the record was cleared when taken */
    fake_input_error(&mapped, EP_STAGE_DISPATCH_NOTIFY, EP_INPUT_WORST_MISMATCH, 0, 4096, 0);
    TCHECK_EQ_INT(ep_group_take_input_error(&g), EP_ERROR_INVALID_ARGUMENT);
    TCHECK_STR_CONTAINS(ep_last_error(), "rank 1: dispatch (count exchange): rank 0 called dispatch with "
                                         "num_worst_tokens=4096, this rank with 0: every rank must pass the same");
}

/* A cached dispatch or a combine whose sizes differ from a peer's (found at the barrier after the send, from the
 * EP_HT_SEND_* words): bad input naming the peer and both calls; a peer in another call is named as such. */
static void send_mismatch_names_both_calls(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    g.rank = 2;
    const ep_ht_call_t ue8m0 = {
        .hidden = 7168, .fp8 = 1, .num_scales = 56, .int_scales = 1, .topk = 8, .weights = 1, .num_experts = 256};
    const ep_ht_call_t bf16 = {.hidden = 7168, .num_experts = 256};
    const struct {
        int op;
        uint64_t theirs, mine;
        const char *want;
        int out_of_step; /* the ranks were at different barriers: the group fails */
    } cases[] = {
        {EP_STAGE_COMBINE_SEND, ep_ht_combine_word(3584, 0), ep_ht_combine_word(7168, 1),
         "rank 2: combine (send): rank 1 combined rows of hidden=3584 without topk_weights, this rank hidden=7168 "
         "with: every rank must pass the same; the combined output is not valid",
         0},
        {EP_STAGE_DISPATCH_SEND, EP_HT_SEND_DISPATCH | ep_ht_pack_call(&ue8m0),
         EP_HT_SEND_DISPATCH | ep_ht_pack_call(&bf16),
         "rank 2: dispatch (send): rank 1 made a cached dispatch with hidden=7168, x float8_e4m3fn with 56 int32 "
         "(packed UE8M0) scales per token, num_topk=8, with topk_weights, num_experts=256; this rank with "
         "hidden=7168, x bfloat16, no topk_idx, without topk_weights, num_experts=256: every rank must pass the "
         "same; the received rows are not valid",
         0},
        {EP_STAGE_COMBINE_SEND, 0, ep_ht_combine_word(7168, 1),
         "rank 2: combine (send): rank 1 was in another call at this point: every rank must make the same calls in "
         "the same order",
         1},
        {EP_STAGE_DISPATCH_SEND, ep_ht_combine_word(7168, 1), EP_HT_SEND_DISPATCH | ep_ht_pack_call(&bf16),
         "rank 2: dispatch (send): rank 1 was in another call at this point", 1},
        /* plain barriers: the group barrier against a count exchange's barrier (word 0), or a mode switch */
        {EP_STAGE_GROUP_BARRIER, 0, ep_plain_barrier_word(EP_STAGE_GROUP_BARRIER),
         "rank 2: group barrier: rank 1 was in another call at this point", 1},
        {EP_STAGE_MODE_SWITCH, ep_plain_barrier_word(EP_STAGE_GROUP_BARRIER),
         ep_plain_barrier_word(EP_STAGE_MODE_SWITCH),
         "rank 2: switch between high-throughput and low-latency mode: rank 1 was in another call", 1},
    };
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        g.failed = EP_SUCCESS;
        fake_input_error(&mapped, cases[i].op, EP_INPUT_SEND_MISMATCH, 1, (int64_t)cases[i].theirs,
                         (int64_t)cases[i].mine);
        TCHECK_EQ_INT(ep_group_take_input_error(&g), EP_ERROR_INVALID_ARGUMENT);
        TCHECK_STR_CONTAINS(ep_last_error(), cases[i].want);
        TCHECK_EQ_INT(g.failed, cases[i].out_of_step ? EP_ERROR_INVALID_ARGUMENT : EP_SUCCESS);
    }
    TCHECK(ep_plain_barrier_word(EP_STAGE_GROUP_BARRIER) != ep_plain_barrier_word(EP_STAGE_MODE_SWITCH) &&
               (ep_plain_barrier_word(EP_STAGE_GROUP_BARRIER) & (EP_HT_SEND_DISPATCH | EP_HT_SEND_COMBINE)) == 0,
           "plain barrier words");
    /* The words: the tags keep them apart and non-zero; every compared field changes the word. */
    TCHECK(ep_ht_combine_word(0, 0) != 0 && (ep_ht_combine_word(0, 0) & EP_HT_SEND_DISPATCH) == 0, "combine tag");
    TCHECK(ep_ht_combine_word(7168, 0) != ep_ht_combine_word(7168, 1), "weights bit");
    TCHECK(ep_ht_combine_word(7168, 0) != ep_ht_combine_word(3584, 0), "hidden");
    const ep_ht_call_t full = {(1 << 24) - 1, 1, 8191, 1, 63, 1, 8191};
    TCHECK((ep_ht_pack_call(&full) & (EP_HT_SEND_DISPATCH | EP_HT_SEND_COMBINE)) == 0,
           "ep_ht_pack_call stays clear of the tags");
}

/* A dispatch that would overflow a receiver: the rows, and for the count exchange the bytes they need at the
 * call's row size (the last count exchange's word); a combine's report names rows only. */
static void capacity_names_rows_and_bytes(void) {
    ep_mapped_t mapped;
    struct ep_group g;
    fake_group(&g, &mapped);
    const ep_ht_call_t c = {.hidden = 7168, .fp8 = 1, .num_scales = 56, .topk = 8, .num_experts = 256};
    g.notify_call_word = ep_ht_pack_call(&c);
    fake_input_error(&mapped, EP_STAGE_DISPATCH_NOTIFY, EP_INPUT_CAPACITY, 1, 5000, 4096);
    TCHECK_EQ_INT(ep_group_take_input_error(&g), EP_ERROR_BUFFER_TOO_SMALL);
    char want[160];
    snprintf(want, sizeof(want),
             "rank 1 must receive 5000 rows but its buffer holds 4096; num_nvl_bytes must be at "
             "least %zu (ep_normal_buffer_bytes); nothing was sent",
             ep_normal_buffer_bytes(1, 5000, 7168, 1, 56, 8));
    TCHECK_STR_CONTAINS(ep_last_error(), want);
    fake_input_error(&mapped, EP_STAGE_COMBINE_SEND, EP_INPUT_CAPACITY, 0, 300, 200);
    TCHECK_EQ_INT(ep_group_take_input_error(&g), EP_ERROR_BUFFER_TOO_SMALL);
    TCHECK_STR_CONTAINS(ep_last_error(), "rank 0 must receive 300 rows but its buffer holds 200; nothing was sent");
}

static int same_call(const ep_ht_call_t *a, const ep_ht_call_t *b) {
    return a->hidden == b->hidden && a->fp8 == b->fp8 && a->num_scales == b->num_scales &&
           a->int_scales == b->int_scales && a->topk == b->topk && a->weights == b->weights &&
           a->num_experts == b->num_experts;
}

/* Every field comes back, and every field changes the word. */
static void call_words_round_trip(void) {
    const int64_t hs[] = {16, 7168, (1 << 24) - 1};
    const int ss[] = {0, 56, 4096}, ks[] = {0, 8, 32}, es[] = {2, 288, 6144};
    for (int a = 0; a < 3; a++)
        for (int c = 0; c < 3; c++)
            for (int d = 0; d < 3; d++)
                for (int e = 0; e < 3; e++)
                    for (int flags = 0; flags < 8; flags++) {
                        const ep_ht_call_t in = {hs[a], flags & 1, ss[c], flags >> 1 & 1, ks[d], flags >> 2 & 1, es[e]};
                        const uint64_t w = ep_ht_pack_call(&in);
                        const ep_ht_call_t out = ep_ht_unpack_call(w);
                        TCHECK(same_call(&in, &out),
                               "(%lld, %d, %d, %d, %d, %d, %d) came back (%lld, %d, %d, %d, %d, "
                               "%d, %d)",
                               (long long)in.hidden, in.fp8, in.num_scales, in.int_scales, in.topk, in.weights,
                               in.num_experts, (long long)out.hidden, out.fp8, out.num_scales, out.int_scales, out.topk,
                               out.weights, out.num_experts);
                        for (int f = 0; f < 3; f++) { /* each flag alone */
                            ep_ht_call_t other = in;
                            int *field = f == 0 ? &other.fp8 : f == 1 ? &other.int_scales : &other.weights;
                            *field = !*field;
                            TCHECK(ep_ht_pack_call(&other) != w, "flag %d does not change the word", f);
                        }
                    }
}

int main(void) {
    TRUN(published_record_is_reported);
    TRUN(claimed_record_is_read_once_published);
    TRUN(record_never_published_is_an_internal_error);
    TRUN(overrun_record_is_reported_as_such);
    TRUN(layout_mismatch_names_both_layouts);
    TRUN(combine_kind_mismatch_names_the_setting);
    TRUN(layout_words_round_trip);
    TRUN(call_mismatch_names_both_calls);
    TRUN(call_words_round_trip);
    TRUN(send_mismatch_names_both_calls);
    TRUN(capacity_names_rows_and_bytes);
    return TDONE();
}
