/* sampler.c — next-token sampling: logit bias, penalties, top-k, temperature, top-p, min-p,
 * draw (see sampler.h for the chain and its semantics).
 *
 * All scratch lives in the sampler and is sized once from n_vocab: candidate arrays of
 * (value, id) pairs that the truncation steps fill and reorder, the softmax numerators,
 * per-token occurrence counts for the penalties, and a list of the ids whose counts are
 * non-zero so that applying penalties and resetting cost O(distinct tokens seen).
 *
 * Per token the work is a handful of vectorised O(V) passes (divide by T, max/min/count, exp)
 * plus, for top-k, counting passes that find a threshold admitting a little more than k
 * tokens, and for top-p, a histogram of the probabilities by octave fraction that finds the
 * one bucket holding the nucleus boundary. Only the tokens that survive those (usually tens)
 * are sorted; nothing sorts the vocabulary.
 */
#include "strata/sampler.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Results must not depend on the compiler fusing a*b+c (GCC does not in ISO C mode). */
#if defined(__clang__)
#pragma STDC FP_CONTRACT OFF
#endif

/* ------------------------------------------------------------------------------------------ */
/* random numbers                                                                             */

uint64_t smp_splitmix64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void smp_rng_seed(smp_rng *r, uint64_t seed) {
    uint64_t st = seed;
    for (int i = 0; i < 4; i++) r->s[i] = smp_splitmix64(&st);
}

/* x rotated left by k bits (0 < k < 64). */
static inline uint64_t rotl64(uint64_t x, int k) { return (x << k) | (x >> (64 - k)); }

uint64_t smp_rng_next(smp_rng *r) {
    uint64_t *s = r->s;
    uint64_t result = rotl64(s[1] * 5, 7) * 9;
    uint64_t t = s[1] << 17;
    s[2] ^= s[0];
    s[3] ^= s[1];
    s[1] ^= s[2];
    s[0] ^= s[3];
    s[2] ^= t;
    s[3] = rotl64(s[3], 45);
    return result;
}

double smp_rng_uniform(smp_rng *r) { return (double)(smp_rng_next(r) >> 11) * 0x1.0p-53; }

/* ------------------------------------------------------------------------------------------ */
/* the sampler                                                                                */

/* A candidate token. v is a logit until the softmax step, then exp(logit - max). */
typedef struct smp_cand {
    float v;
    int32_t id;
} smp_cand;

#define SMP_NB 4096    /* histogram buckets for the bucketed top-p selection         */
#define SMP_BLOCK 256  /* vec_exp's partial-sum block, in tokens                     */

struct smp_sampler {
    smp_params p;          /* copy; p.logit_bias points at bias                              */
    int32_t n_vocab;
    smp_bias *bias;        /* (n_bias,) owned copy of the logit bias list                    */
    int32_t n_bias;
    smp_cand *cand;        /* (n_vocab,) candidates, reordered by the truncation steps       */
    smp_cand *cand2;       /* (n_vocab,) top-p's boundary bucket (see nucleus_bucketed)      */
    float *prob;           /* (n_vocab,) softmax numerators exp(l - max)                      */
    double *block_sum;     /* (ceil(n_vocab / SMP_BLOCK),) sums of prob per block             */
    int32_t *count_all;    /* (n_vocab,) occurrences in the window, prompt + generated       */
    int32_t *count_gen;    /* (n_vocab,) occurrences in the window, generated only           */
    int32_t *active;       /* (n_vocab,) ids with count_all > 0, unordered                   */
    int32_t *active_pos;   /* (n_vocab,) index of an id in active (valid while count_all>0)  */
    int32_t n_active;
    int32_t *ring;         /* (ring_cap,) window, oldest at ring_head: id if generated, ~id
                              if prompt; NULL when the window is unbounded                   */
    size_t ring_cap;
    size_t ring_head;
    size_t ring_len;
    smp_rng rng;           /* draws; re-seeded by smp_reset                                  */
    double bucket_mass[SMP_NB];    /* top-p histogram (scratch)                             */
    uint64_t pivot;        /* xorshift state for partition pivots (never affects results)    */
};

smp_params smp_params_default(void) {
    smp_params p;
    memset(&p, 0, sizeof p);
    p.temperature = 1.0f;
    p.top_k = 0;
    p.top_p = 1.0f;
    p.min_p = 0.0f;
    p.repetition_penalty = 1.0f;
    return p;
}

/* Checks every parameter range; returns ST_OK or ST_ERR_ARG with the offending field named. */
static int params_check(const smp_params *p, int32_t n_vocab, st_err *err) {
    if (n_vocab <= 0) return st_err_set(err, ST_ERR_ARG, "sampler: n_vocab must be > 0 (got %d)", n_vocab);
    if (p->n_vocab != 0 && p->n_vocab != n_vocab)
        return st_err_set(err, ST_ERR_ARG, "sampler: params.n_vocab %d != n_vocab %d", p->n_vocab, n_vocab);
    if (!(p->temperature >= 0.0f) || !isfinite(p->temperature))
        return st_err_set(err, ST_ERR_ARG, "sampler: temperature must be finite and >= 0 (got %g)",
                          (double)p->temperature);
    if (p->top_k < 0) return st_err_set(err, ST_ERR_ARG, "sampler: top_k must be >= 0 (got %d)", p->top_k);
    if (!(p->top_p > 0.0f && p->top_p <= 1.0f))
        return st_err_set(err, ST_ERR_ARG, "sampler: top_p must be in (0, 1] (got %g)", (double)p->top_p);
    if (!(p->min_p >= 0.0f && p->min_p <= 1.0f))
        return st_err_set(err, ST_ERR_ARG, "sampler: min_p must be in [0, 1] (got %g)", (double)p->min_p);
    if (!(p->repetition_penalty > 0.0f) || !isfinite(p->repetition_penalty))
        return st_err_set(err, ST_ERR_ARG, "sampler: repetition_penalty must be finite and > 0 (got %g)",
                          (double)p->repetition_penalty);
    if (!isfinite(p->presence_penalty))
        return st_err_set(err, ST_ERR_ARG, "sampler: presence_penalty must be finite");
    if (!isfinite(p->frequency_penalty))
        return st_err_set(err, ST_ERR_ARG, "sampler: frequency_penalty must be finite");
    if (p->n_logit_bias < 0 || (p->n_logit_bias > 0 && !p->logit_bias))
        return st_err_set(err, ST_ERR_ARG, "sampler: bad logit_bias list (n=%d)", p->n_logit_bias);
    for (int32_t i = 0; i < p->n_logit_bias; i++) {
        const smp_bias *b = &p->logit_bias[i];
        if (b->id < 0 || b->id >= n_vocab)
            return st_err_set(err, ST_ERR_ARG, "sampler: logit_bias token id %d outside [0, %d)", b->id, n_vocab);
        if (isnan(b->bias)) return st_err_set(err, ST_ERR_ARG, "sampler: logit_bias for token %d is NaN", b->id);
    }
    return ST_OK;
}

smp_sampler *smp_init(const smp_params *p, int32_t n_vocab, size_t max_history, st_err *err) {
    ST_ASSERT(p);
    if (params_check(p, n_vocab, err) != ST_OK) return NULL;
    size_t ring_bytes;
    if (st_mul_size(max_history, sizeof(int32_t), &ring_bytes) != 0) {
        st_err_set(err, ST_ERR_ARG, "sampler: max_history %zu too large", max_history);
        return NULL;
    }
    smp_sampler *s = calloc(1, sizeof *s);
    if (!s) goto nomem;
    s->p = *p;
    s->p.n_vocab = n_vocab;
    s->n_vocab = n_vocab;
    size_t nv = (size_t)n_vocab;
    s->cand = malloc(nv * sizeof *s->cand);
    s->cand2 = malloc(nv * sizeof *s->cand2);
    s->prob = malloc(nv * sizeof *s->prob);
    s->block_sum = malloc((nv / SMP_BLOCK + 1) * sizeof *s->block_sum);
    s->count_all = calloc(nv, sizeof *s->count_all);
    s->count_gen = calloc(nv, sizeof *s->count_gen);
    s->active = malloc(nv * sizeof *s->active);
    s->active_pos = malloc(nv * sizeof *s->active_pos);
    if (!s->cand || !s->cand2 || !s->prob || !s->block_sum || !s->count_all || !s->count_gen || !s->active || !s->active_pos) goto nomem;
    if (p->n_logit_bias > 0) {
        s->bias = malloc((size_t)p->n_logit_bias * sizeof *s->bias);
        if (!s->bias) goto nomem;
        memcpy(s->bias, p->logit_bias, (size_t)p->n_logit_bias * sizeof *s->bias);
        s->n_bias = p->n_logit_bias;
    }
    s->p.logit_bias = s->bias;
    s->p.n_logit_bias = s->n_bias;
    if (max_history > 0) {
        s->ring = malloc(ring_bytes);
        if (!s->ring) goto nomem;
        s->ring_cap = max_history;
    }
    smp_reset(s);
    return s;
nomem:
    smp_free(s);
    st_err_set(err, ST_ERR_NOMEM, "sampler: out of memory (n_vocab %d, max_history %zu)", n_vocab, max_history);
    return NULL;
}

void smp_free(smp_sampler *s) {
    if (!s) return;
    free(s->bias);
    free(s->cand);
    free(s->cand2);
    free(s->prob);
    free(s->block_sum);
    free(s->count_all);
    free(s->count_gen);
    free(s->active);
    free(s->active_pos);
    free(s->ring);
    free(s);
}

void smp_reset(smp_sampler *s) {
    for (int32_t i = 0; i < s->n_active; i++) {
        int32_t id = s->active[i];
        s->count_all[id] = 0;
        s->count_gen[id] = 0;
    }
    s->n_active = 0;
    s->ring_head = 0;
    s->ring_len = 0;
    smp_rng_seed(&s->rng, s->p.seed);
    s->pivot = 0x2545f4914f6cdd1dull;
}

const smp_params *smp_get_params(const smp_sampler *s) { return &s->p; }

/* ------------------------------------------------------------------------------------------ */
/* penalty history                                                                            */

/* Counts one occurrence of id (generated or prompt) and lists id as active on its first. */
static void hist_count(smp_sampler *s, int32_t id, int generated) {
    if (s->count_all[id]++ == 0) {
        s->active_pos[id] = s->n_active;
        s->active[s->n_active++] = id;
    }
    if (generated) s->count_gen[id]++;
}

/* Removes one occurrence recorded by hist_count (the ring entry e leaving the window). */
static void hist_uncount(smp_sampler *s, int32_t e) {
    int generated = e >= 0;
    int32_t id = generated ? e : ~e;
    ST_ASSERT(s->count_all[id] > 0);
    if (generated) s->count_gen[id]--;
    if (--s->count_all[id] == 0) { /* swap-remove from the active list */
        int32_t pos = s->active_pos[id];
        int32_t last = s->active[--s->n_active];
        s->active[pos] = last;
        s->active_pos[last] = pos;
    }
}

/* Appends id to the window, evicting the oldest entry when the ring is full. */
static void hist_push(smp_sampler *s, int32_t id, int generated) {
    ST_ASSERT(id >= 0 && id < s->n_vocab);
    if (s->ring_cap) {
        if (s->ring_len == s->ring_cap) {
            hist_uncount(s, s->ring[s->ring_head]);
            s->ring_head = (s->ring_head + 1) % s->ring_cap;
            s->ring_len--;
        }
        s->ring[(s->ring_head + s->ring_len) % s->ring_cap] = generated ? id : ~id;
        s->ring_len++;
    }
    hist_count(s, id, generated);
}

void smp_accept_prompt(smp_sampler *s, const int32_t *ids, size_t n) {
    for (size_t i = 0; i < n; i++) hist_push(s, ids[i], 0);
}

void smp_accept(smp_sampler *s, int32_t id) { hist_push(s, id, 1); }

/* ------------------------------------------------------------------------------------------ */
/* partial selection and sorting of candidates                                               */

/* 1 if a ranks before b: larger value first, lower id on ties. A strict total order (ids are
 * unique, values never NaN), so every selection and sort below has exactly one result no
 * matter which pivots are drawn. */
static inline int cand_before(smp_cand a, smp_cand b) { return a.v > b.v || (a.v == b.v && a.id < b.id); }

/* Exchanges *a and *b. */
static inline void cand_swap(smp_cand *a, smp_cand *b) {
    smp_cand t = *a;
    *a = *b;
    *b = t;
}

/* Pseudo-random pivot index in [0, n) (xorshift64; keeps quickselect O(n) expected on any
 * input order, sorted logits included). */
static inline size_t pick_pivot(uint64_t *st, size_t n) {
    uint64_t x = *st;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    *st = x;
    return (size_t)(x % n);
}

/* Lomuto partition of c[0, n) around c[pivot]: returns k with c[0, k) ranking before the
 * pivot, the pivot at c[k], and c[k+1, n) ranking after it. */
static size_t cand_partition(smp_cand *c, size_t n, size_t pivot) {
    cand_swap(&c[pivot], &c[n - 1]);
    smp_cand pv = c[n - 1];
    size_t k = 0;
    for (size_t i = 0; i + 1 < n; i++)
        if (cand_before(c[i], pv)) cand_swap(&c[i], &c[k++]);
    cand_swap(&c[k], &c[n - 1]);
    return k;
}

/* Moves the m top-ranked candidates of c[0, n) into c[0, m), in no particular order
 * (quickselect, O(n) expected). 0 <= m <= n. */
static void cand_select(smp_cand *c, size_t n, size_t m, uint64_t *st) {
    size_t lo = 0, hi = n; /* invariant: c[0,lo) outrank c[lo,n); c[hi,n) are outranked; lo <= m <= hi */
    while (hi - lo > 1 && m > lo && m < hi) {
        size_t k = lo + cand_partition(c + lo, hi - lo, pick_pivot(st, hi - lo));
        if (k == m || k + 1 == m) return;
        if (m < k) hi = k;
        else lo = k + 1;
    }
}

/* Sorts c[0, n) by rank (quicksort with random pivots, insertion sort below 16; recursion
 * only on the smaller side, so the stack depth is O(log n)). */
static void cand_sort(smp_cand *c, size_t n, uint64_t *st) {
    while (n > 16) {
        size_t k = cand_partition(c, n, pick_pivot(st, n));
        if (k < n - k - 1) {
            cand_sort(c, k, st);
            c += k + 1;
            n -= k + 1;
        } else {
            cand_sort(c + k + 1, n - k - 1, st);
            n = k;
        }
    }
    for (size_t i = 1; i < n; i++) {
        smp_cand x = c[i];
        size_t j = i;
        while (j > 0 && cand_before(x, c[j - 1])) {
            c[j] = c[j - 1];
            j--;
        }
        c[j] = x;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* vector kernels: the O(V) passes                                                            */

/* A 150k-entry vocabulary makes every pass over the logits count, and libm's expf is the
 * biggest cost of all, so the per-token passes are written with GCC/Clang vector extensions
 * around a branch-free exp, and on x86-64 compiled twice (AVX2 and baseline) with a run-time
 * pick. Both versions run the same IEEE operations in the same order (no FMA contraction in
 * ISO C mode), so results are bit-identical whichever runs: reproducibility survives. */
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define SMP_KERNEL __attribute__((target_clones("avx2", "default")))
#else
#define SMP_KERNEL
#endif

/* Vectors never cross a function boundary (the helpers below are macros), so no call passes
 * one between the AVX and non-AVX ABIs. */
typedef float smp_v8f __attribute__((vector_size(32)));
typedef int32_t smp_v8i __attribute__((vector_size(32)));

#define V8F_LOAD(v, p) memcpy(&(v), (p), sizeof(smp_v8f))
#define V8F_STORE(p, v) memcpy((p), &(v), sizeof(smp_v8f))
/* 1 if any lane of an smp_v8i mask is set (lane extraction: amortise it over several vectors) */
#define V8I_ANY(m) (((m)[0] | (m)[1] | (m)[2] | (m)[3] | (m)[4] | (m)[5] | (m)[6] | (m)[7]) != 0)
/* lane-wise mask ? a : b, mask lanes all-ones or zero (what vector comparisons return) */
#define V8F_SELECT(mask, a, b) ((smp_v8f)(((smp_v8i)(a) & (mask)) | ((smp_v8i)(b) & ~(mask))))

/* exp(x) for x <= 0, 0 for x < -87 (and NaN): Cody-Waite reduction x = k ln2 + r with
 * |r| <= ln2/2, a degree-6 Taylor polynomial for e^r (truncation error < 1.3e-7 relative) and
 * 2^k built from the exponent bits. Max relative error about 2.4e-7 against exp(); exp1(0) is
 * exactly 1. EXP8 is the same computation lane-wise. */
#define SMP_EXP_LO -87.0f
#define SMP_LOG2E 1.44269504088896341f
#define SMP_LN2_HI 0.693145751953125f     /* ln 2 split so that k * LN2_HI is exact */
#define SMP_LN2_LO 1.428606765330187e-06f
#define SMP_ROUND 12582912.0f             /* 1.5 * 2^23: adding and subtracting rounds to integer */

/* exp(x) for x <= 0 as described above (0 below -87 and for NaN / -inf). */
static inline float exp1(float x) {
    if (!(x >= SMP_EXP_LO)) return 0.0f;
    float k = (x * SMP_LOG2E + SMP_ROUND) - SMP_ROUND;
    float r = x - k * SMP_LN2_HI;
    r = r - k * SMP_LN2_LO;
    float p = r * (1.0f / 720) + 1.0f / 120;
    p = p * r + 1.0f / 24;
    p = p * r + 1.0f / 6;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    union { uint32_t u; float f; } sc = {(uint32_t)((int32_t)k + 127) << 23};
    return p * sc.f;
}

/* out = exp1 of each lane of xin (both smp_v8f lvalues; xin is clobbered) */
#define EXP8(out, xin)                                                                     \
    do {                                                                                   \
        const smp_v8f lo_ = {SMP_EXP_LO, SMP_EXP_LO, SMP_EXP_LO, SMP_EXP_LO,               \
                             SMP_EXP_LO, SMP_EXP_LO, SMP_EXP_LO, SMP_EXP_LO};              \
        smp_v8i keep_ = (xin) >= lo_; /* false for NaN and x < -87 */                      \
        smp_v8f x_ = V8F_SELECT(keep_, xin, lo_);                                          \
        smp_v8f k_ = (x_ * SMP_LOG2E + SMP_ROUND) - SMP_ROUND;                             \
        smp_v8f r_ = x_ - k_ * SMP_LN2_HI;                                                 \
        r_ = r_ - k_ * SMP_LN2_LO;                                                         \
        smp_v8f p_ = r_ * (1.0f / 720) + 1.0f / 120;                                       \
        p_ = p_ * r_ + 1.0f / 24;                                                          \
        p_ = p_ * r_ + 1.0f / 6;                                                           \
        p_ = p_ * r_ + 0.5f;                                                               \
        p_ = p_ * r_ + 1.0f;                                                               \
        p_ = p_ * r_ + 1.0f;                                                               \
        smp_v8i ki_ = __builtin_convertvector(k_, smp_v8i);                                \
        smp_v8f sc_ = (smp_v8f)((ki_ + 127) << 23);                                        \
        (out) = (smp_v8f)((smp_v8i)(p_ * sc_) & keep_);                                    \
    } while (0)

/* logits[i] /= t for i in [0, n). */
SMP_KERNEL static void vec_div(float *logits, int32_t n, float t) {
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        smp_v8f x;
        V8F_LOAD(x, logits + i);
        x = x / t;
        V8F_STORE(logits + i, x);
    }
    for (; i < n; i++) logits[i] /= t;
}

/* Largest and smallest logit above -inf (NaN ignored) and how many logits are above -inf;
 * *max = -inf, *min = +inf and *n_live = 0 when none is. */
SMP_KERNEL static void vec_scan(const float *logits, int32_t n, float *max, float *min, size_t *n_live) {
    const smp_v8f ninf = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    smp_v8f mx = ninf, mn = -ninf;
    smp_v8i cnt = {0};
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        smp_v8f x;
        V8F_LOAD(x, logits + i);
        smp_v8i live = x > ninf;
        mx = V8F_SELECT(x > mx, x, mx);
        mn = V8F_SELECT((x < mn) & live, x, mn);
        cnt -= live;
    }
    float M = -INFINITY, m = INFINITY;
    size_t c = 0;
    for (int j = 0; j < 8; j++) {
        if (mx[j] > M) M = mx[j];
        if (mn[j] < m) m = mn[j];
        c += (size_t)cnt[j];
    }
    for (; i < n; i++) {
        float x = logits[i];
        if (!(x > -INFINITY)) continue;
        if (x > M) M = x;
        if (x < m) m = x;
        c++;
    }
    *max = M;
    *min = m;
    *n_live = c;
}

/* prob[i] = exp(logits[i] - max) (0 for -inf and NaN); max must be the finite maximum, so
 * every prob is in [0, 1] and the maximum's is exactly 1. block_sum[b] gets the sum over
 * [b*SMP_BLOCK, (b+1)*SMP_BLOCK) (float lanes within a block, double across blocks); returns
 * the sum of all block sums, in block order. */
SMP_KERNEL static double vec_exp(const float *logits, int32_t n, float max, float *prob, double *block_sum) {
    double total = 0.0;
    for (int32_t b = 0; b * SMP_BLOCK < n; b++) {
        int32_t i = b * SMP_BLOCK, end = n - i > SMP_BLOCK ? i + SMP_BLOCK : n;
        smp_v8f acc = {0};
        for (; i + 8 <= end; i += 8) {
            smp_v8f x, e;
            V8F_LOAD(x, logits + i);
            x = x - max;
            EXP8(e, x);
            V8F_STORE(prob + i, e);
            acc += e;
        }
        float tail = 0.0f;
        for (; i < end; i++) tail += prob[i] = exp1(logits[i] - max);
        double bs = tail;
        for (int j = 0; j < 8; j++) bs += acc[j];
        block_sum[b] = bs;
        total += bs;
    }
    return total;
}

/* Top-p over the whole vocabulary works on probability buckets: the float bit pattern of
 * p in (0, 1] is monotone in p and nearly linear in log2(p), so the top 16 bits below 1.0f give
 * 1/128-octave buckets (bucket b holds bit patterns in (1.0f - (b+1)*2^16, 1.0f - b*2^16]).
 * Only p >= p_lo (a power of two >= 2^-31) is histogrammed; everything below shares the tail
 * bucket, whose mass is total minus the rest. */
#define SMP_TAIL (SMP_NB - 1)

/* Bucket of p, for 2^-31 <= p <= 1 (so the result is <= 3968 < SMP_TAIL). */
static inline int32_t prob_bucket(float p) {
    union { float f; uint32_t u; } v = {p};
    return (int32_t)((0x3f800000u - v.u) >> 16);
}

/* Smallest p in bucket b < SMP_TAIL. */
static inline float bucket_floor(int32_t b) {
    union { uint32_t u; float f; } v = {0x3f800000u - ((uint32_t)b << 16) - 0xffffu};
    return v.f;
}

/* mass[prob_bucket(p)] += p for every p = prob[i] >= p_lo (p_lo >= 2^-31); returns their sum.
 * Blocks of 64 without such a p (nearly all of them for real logits) cost 8 vector compares. */
SMP_KERNEL static double vec_hist_mass(const float *prob, int32_t n, float p_lo, double *mass) {
    double head = 0.0;
    int32_t i = 0;
    for (; i < n; i += 64) {
        if (i + 64 <= n) {
            smp_v8i any = {0};
            for (int j = 0; j < 64; j += 8) {
                smp_v8f v;
                V8F_LOAD(v, prob + i + j);
                any |= v >= p_lo;
            }
            if (!V8I_ANY(any)) continue;
        }
        for (int32_t j = i; j < i + 64 && j < n; j++)
            if (prob[j] >= p_lo) {
                mass[prob_bucket(prob[j])] += prob[j];
                head += prob[j];
            }
    }
    return head;
}

/* Number of x[i] >= t, i in [0, n) (NaN never counts). */
SMP_KERNEL static size_t vec_count_ge(const float *x, int32_t n, float t) {
    smp_v8i cnt = {0};
    int32_t i = 0;
    for (; i + 8 <= n; i += 8) {
        smp_v8f v;
        V8F_LOAD(v, x + i);
        cnt -= v >= t;
    }
    size_t c = 0;
    for (int j = 0; j < 8; j++) c += (size_t)cnt[j];
    for (; i < n; i++) c += x[i] >= t;
    return c;
}

/* Appends (x[i], i) for every x[i] >= t to out (room for all of them) and returns how many;
 * id order. Blocks of 64 with no such x cost eight vector compares. */
SMP_KERNEL static size_t vec_collect_ge(const float *x, int32_t n, float t, smp_cand *out) {
    size_t k = 0;
    for (int32_t i = 0; i < n; i += 64) {
        if (i + 64 <= n) {
            smp_v8i any = {0};
            for (int j = 0; j < 64; j += 8) {
                smp_v8f v;
                V8F_LOAD(v, x + i + j);
                any |= v >= t;
            }
            if (!V8I_ANY(any)) continue;
        }
        for (int32_t j = i; j < i + 64 && j < n; j++)
            if (x[j] >= t) out[k++] = (smp_cand){x[j], j};
    }
    return k;
}

/* Index of the first x[i] == t (t not NaN), or -1. */
SMP_KERNEL static int32_t vec_find_eq(const float *x, int32_t n, float t) {
    for (int32_t i = 0; i < n; i += 64) {
        if (i + 64 <= n) {
            smp_v8i any = {0};
            for (int j = 0; j < 64; j += 8) {
                smp_v8f v;
                V8F_LOAD(v, x + i + j);
                any |= v == t;
            }
            if (!V8I_ANY(any)) continue;
        }
        for (int32_t j = i; j < i + 64 && j < n; j++)
            if (x[j] == t) return j;
    }
    return -1;
}

/* ------------------------------------------------------------------------------------------ */
/* top-k and top-p selection without sorting the vocabulary                                   */

/* Writes the k top-ranked logits above -inf (1 <= k < their count) as (logit, id) into
 * s->cand[0, k), in rank order. max, min: their largest and smallest (both finite).
 *
 * A threshold t is searched with vectorised counting passes until between k and about
 * 4k + 256 logits are >= t: t = max - 1, max - 4, max - 16, ... until at least k pass (at
 * t = min all do), then bisection towards the last t that let fewer than k through, 16 passes
 * at most. Real logits have an isolated head, so that is typically two or three passes. Only
 * the logits >= t are collected and ranked. Ties that defeat the search (many equal logits)
 * only make the collected set larger; the result is the same. */
static void select_top_k(smp_sampler *s, const float *logits, float max, float min, size_t k) {
    const int32_t nv = s->n_vocab;
    const size_t cap = 4 * k + 256;
    float t = max;
    size_t c = vec_count_ge(logits, nv, t);
    if (c < k) {
        float t_out, d = 1.0f; /* t_out: the closest threshold known to let fewer than k in */
        do {
            t_out = t;
            t = max - d;
            if (!(t > min)) t = min;
            c = vec_count_ge(logits, nv, t);
            d *= 4.0f;
        } while (c < k);
        for (int iter = 0; c > cap && iter < 16; iter++) {
            float mid = 0.5f * t + 0.5f * t_out; /* halves first: no overflow */
            if (!(mid > t && mid < t_out)) break;
            size_t cm = vec_count_ge(logits, nv, mid);
            if (cm >= k) {
                t = mid;
                c = cm;
            } else {
                t_out = mid;
            }
        }
    }
    smp_cand *cd = s->cand;
    size_t got = vec_collect_ge(logits, nv, t, cd);
    ST_ASSERT(got == c && got >= k);
    cand_select(cd, got, k, &s->pivot);
    cand_sort(cd, k, &s->pivot);
}

/* Ranks c[0, n) in doubling chunks until the running mass (starting at cum) reaches target;
 * returns how many of the ranked candidates are needed (n if the target is never reached, which
 * only rounding can cause). c[0, returned) ends up in rank order. */
static size_t rank_until_mass(smp_sampler *s, smp_cand *c, size_t n, double cum, double target) {
    size_t sorted = 0, done = 0;
    while (sorted < n) {
        size_t m = sorted ? 2 * sorted : 64;
        if (m > n) m = n;
        cand_select(c + sorted, n - sorted, m - sorted, &s->pivot);
        cand_sort(c + sorted, m - sorted, &s->pivot);
        sorted = m;
        for (; done < sorted; done++) {
            cum += c[done].v;
            if (cum >= target) return done + 1;
        }
    }
    return n;
}

/* Top-p over s->prob (numerators, their sum total): writes the minimal nucleus as (prob, id)
 * to s->cand[0, returned): first the tokens of the buckets above the boundary bucket in id
 * order, then the boundary bucket's needed members in rank order. One histogram pass, the
 * bucket walk, one collecting pass; only the boundary bucket is ranked. Tokens with prob 0
 * never enter.
 *
 * The histogram floor p_lo is the largest power of two with n_vocab * p_lo <= (1 - top_p) *
 * total / 2: the tail then holds at most half the mass top-p discards, so the walk stops
 * before it, while the histogram pass touches only the few tokens that can matter. */
static size_t nucleus_bucketed(smp_sampler *s, double total) {
    const double target = (double)s->p.top_p * total;
    const float *prob = s->prob;
    const int32_t nv = s->n_vocab;
    const double lo = (1.0 - (double)s->p.top_p) * total / (2.0 * (double)nv);
    float p_lo = 0x1p-31f;
    while ((double)p_lo * 2.0 <= lo && p_lo < 0.5f) p_lo *= 2.0f;
    double *mass = s->bucket_mass;
    memset(mass, 0, sizeof s->bucket_mass);
    double head = vec_hist_mass(prob, nv, p_lo, mass);
    mass[SMP_TAIL] = total - head > 0.0 ? total - head : 0.0;
    double above = 0.0;
    int32_t B = 0;
    while (B < SMP_TAIL && above + mass[B] < target) above += mass[B++];

    smp_cand *c = s->cand, *c2 = s->cand2;
    size_t n_lo = 0, n_b = 0;
    if (B < SMP_TAIL) {
        /* buckets 0..B (bucket B may reach below p_lo: those tokens rank after its members,
         * so ranking the lot still yields the exact prefix) */
        size_t got = vec_collect_ge(prob, nv, bucket_floor(B), c2);
        for (size_t j = 0; j < got; j++) {
            if (prob_bucket(c2[j].v) < B) c[n_lo++] = c2[j];
            else c2[n_b++] = c2[j]; /* n_b <= j: compacting c2 in place is safe */
        }
    } else { /* rounding put the target in the tail: rank everything below p_lo */
        for (int32_t j = 0; j < nv; j++) {
            float p = prob[j];
            if (p >= p_lo) c[n_lo++] = (smp_cand){p, j};
            else if (p > 0.0f) c2[n_b++] = (smp_cand){p, j};
        }
    }
    size_t need = rank_until_mass(s, c2, n_b, above, target);
    memmove(c + n_lo, c2, need * sizeof *c);
    return n_lo + need;
}

/* ------------------------------------------------------------------------------------------ */
/* the chain                                                                                  */

/* Steps 1-2: logit bias, then repetition / presence / frequency penalties, in place. */
static void apply_bias_penalties(smp_sampler *s, float *logits) {
    for (int32_t i = 0; i < s->n_bias; i++) logits[s->bias[i].id] += s->bias[i].bias;
    const float rep = s->p.repetition_penalty;
    const float pres = s->p.presence_penalty, freq = s->p.frequency_penalty;
    if (rep == 1.0f && pres == 0.0f && freq == 0.0f) return;
    for (int32_t i = 0; i < s->n_active; i++) {
        int32_t id = s->active[i];
        float l = logits[id];
        if (rep != 1.0f) l = l > 0.0f ? l / rep : l * rep;
        int32_t cg = s->count_gen[id];
        if (cg > 0) l -= pres + freq * (float)cg;
        logits[id] = l;
    }
}

/* Index of the largest logit, lowest id on ties; NaN and -inf never win; -1 if none is > -inf. */
static int32_t argmax(const float *logits, int32_t n) {
    float max, min;
    size_t n_live;
    vec_scan(logits, n, &max, &min, &n_live);
    if (n_live == 0) return -1;
    int32_t i = vec_find_eq(logits, n, max);
    ST_ASSERT(i >= 0);
    return i;
}

/* Draws from the unnormalised probabilities c[0, n).v (n >= 1, the sum > 0). */
static int32_t draw_cand(smp_sampler *s, const smp_cand *c, size_t n) {
    double total = 0.0;
    for (size_t i = 0; i < n; i++) total += c[i].v;
    double r = smp_rng_uniform(&s->rng) * total, acc = 0.0;
    for (size_t i = 0; i < n; i++) {
        acc += c[i].v;
        if (acc > r) return c[i].id;
    }
    for (size_t i = n; i-- > 0;) /* rounding left r at the very top: the last non-zero one */
        if (c[i].v > 0.0f) return c[i].id;
    return c[0].id;
}

/* Draws from all of s->prob (sum total, per-block sums in s->block_sum): skips whole blocks,
 * then walks the block where the running sum passes r. */
static int32_t draw_prob(smp_sampler *s, double total) {
    const float *prob = s->prob;
    const int32_t nv = s->n_vocab;
    double r = smp_rng_uniform(&s->rng) * total, acc = 0.0;
    int32_t i = 0;
    for (int32_t b = 0; i < nv && acc + s->block_sum[b] <= r; b++, i += SMP_BLOCK) acc += s->block_sum[b];
    for (; i < nv; i++) { /* runs past the block only if the block's float sum was rounded up */
        acc += prob[i];
        if (acc > r && prob[i] > 0.0f) return i;
    }
    for (i = nv; i-- > 0;)
        if (prob[i] > 0.0f) return i;
    ST_ASSERT(0 && "total > 0");
    return -1;
}

/* Steps 5-9 (temperature > 0) on logits already divided by T; logits is only read. Returns -1
 * when no logit is above -inf. */
static int32_t sample_dist(smp_sampler *s, const float *logits) {
    const int32_t nv = s->n_vocab;
    float max, min;
    size_t n;
    vec_scan(logits, nv, &max, &min, &n);
    if (n == 0) return -1;
    if (max == INFINITY) return argmax(logits, nv); /* a forced token */
    const int use_top_p = s->p.top_p < 1.0f, use_min_p = s->p.min_p > 0.0f;
    smp_cand *c = s->cand;

    if (s->p.top_k > 0 && (size_t)s->p.top_k < n) {
        /* 5. top-k, 6. softmax numerators of the k survivors (the maximum's is exactly 1) */
        n = (size_t)s->p.top_k;
        select_top_k(s, logits, max, min, n);
        double total = 0.0;
        for (size_t i = 0; i < n; i++) total += c[i].v = exp1(c[i].v - max);
        /* 7. top-p on the ranked survivors: the shortest prefix with mass >= top_p * total */
        if (use_top_p) {
            const double target = (double)s->p.top_p * total;
            double cum = 0.0;
            for (size_t i = 0; i < n; i++)
                if ((cum += c[i].v) >= target) {
                    n = i + 1;
                    break;
                }
        }
    } else {
        /* 6. softmax numerators over the whole vocabulary */
        double total = vec_exp(logits, nv, max, s->prob, s->block_sum);
        if (!use_top_p && !use_min_p) return draw_prob(s, total); /* 9. no truncation */
        if (use_top_p) {
            n = nucleus_bucketed(s, total); /* 7. */
        } else {
            n = vec_collect_ge(s->prob, nv, s->p.min_p, c); /* min-p alone: its survivors */
        }
    }

    /* 8. min-p: prob >= min_p * max prob = min_p (the maximum's numerator is 1). Top-p kept a
     * ranked prefix and min-p keeps one too, so filtering what is left is the intersection. */
    if (use_min_p) {
        size_t k = 0;
        for (size_t i = 0; i < n; i++)
            if (c[i].v >= s->p.min_p) c[k++] = c[i];
        n = k;
    }

    /* 9. draw */
    return draw_cand(s, c, n);
}

/* Logprob of a (temperature-scaled) logit l given the log-normaliser lse; a +inf lse means
 * some logits are +inf, which then take all the mass. */
static inline float to_logprob(float l, double lse) {
    if (lse == INFINITY) return l == INFINITY ? 0.0f : -INFINITY;
    return (float)((double)l - lse);
}

/* Fills top[0, min(n_top, live)) with the best-ranked logits as logprobs and returns the
 * log-normaliser over all logits above -inf (-inf if there are none). Uses the scratch. */
static double report_top(smp_sampler *s, const float *logits, int32_t n_top, smp_logprob *top,
                         int32_t *n_top_out) {
    float max, min;
    size_t n;
    vec_scan(logits, s->n_vocab, &max, &min, &n);
    double lse = max; /* -inf with no live logit, +inf with a forced one */
    if (n > 0 && max < INFINITY) lse = (double)max + log(vec_exp(logits, s->n_vocab, max, s->prob, s->block_sum));
    size_t k = n_top > 0 ? (size_t)n_top : 0;
    if (k > n) k = n;
    if (k > 0 && k < n && max < INFINITY) {
        select_top_k(s, logits, max, min, k);
    } else if (k > 0) { /* all of them (or a +inf is present): rank every live logit */
        size_t m = 0;
        for (int32_t i = 0; i < s->n_vocab; i++)
            if (logits[i] > -INFINITY) s->cand[m++] = (smp_cand){logits[i], i};
        cand_select(s->cand, m, k, &s->pivot);
        cand_sort(s->cand, k, &s->pivot);
    }
    for (size_t i = 0; i < k; i++) {
        top[i].id = s->cand[i].id;
        top[i].logprob = to_logprob(s->cand[i].v, lse);
    }
    if (n_top_out) *n_top_out = (int32_t)k;
    return lse;
}

/* The whole chain; when want_lp, also the logprobs report (see smp_sample_logprobs). */
static int32_t sample_chain(smp_sampler *s, float *logits, int want_lp, int32_t n_top, smp_logprob *top,
                            int32_t *n_top_out, float *chosen_logprob) {
    ST_ASSERT(s && logits);
    apply_bias_penalties(s, logits);
    const float t = s->p.temperature;
    const int greedy = t <= 0.0f;
    if (!greedy && t != 1.0f) vec_div(logits, s->n_vocab, t);
    double lse = 0.0;
    if (want_lp) lse = report_top(s, logits, n_top, top, n_top_out);
    int32_t id = greedy ? argmax(logits, s->n_vocab) : sample_dist(s, logits);
    if (want_lp && chosen_logprob) *chosen_logprob = id >= 0 ? to_logprob(logits[id], lse) : -INFINITY;
    return id;
}

int32_t smp_sample(smp_sampler *s, float *logits) { return sample_chain(s, logits, 0, 0, NULL, NULL, NULL); }

int32_t smp_sample_logprobs(smp_sampler *s, float *logits, int32_t n_top, smp_logprob *top,
                            int32_t *n_top_out, float *chosen_logprob) {
    ST_ASSERT(n_top <= 0 || top);
    return sample_chain(s, logits, 1, n_top, top, n_top_out, chosen_logprob);
}
