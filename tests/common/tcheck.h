/* A tiny test harness for plain C tests: each test program is one executable with several cases.
 * A failing check prints file, line, what was expected and what was seen, and marks the case failed;
 * main() returns non-zero when any case failed, so ctest counts it. */
#ifndef TCHECK_H
#define TCHECK_H

#include <math.h>
#include <stdio.h>
#include <string.h>

static int tcheck_failures;
static int tcheck_cases;
static int tcheck_case_failed;

#define TCHECK(cond, ...)                                                                                              \
    do {                                                                                                               \
        if (!(cond)) {                                                                                                 \
            fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond);                                   \
            fprintf(stderr, __VA_ARGS__);                                                                              \
            fprintf(stderr, "\n");                                                                                     \
            tcheck_case_failed = 1;                                                                                    \
        }                                                                                                              \
    } while (0)

#define TCHECK_EQ_INT(a, b)                                                                                            \
    TCHECK((long long)(a) == (long long)(b), "%s = %lld, expected %lld", #a, (long long)(a), (long long)(b))

#define TCHECK_STR_CONTAINS(hay, needle)                                                                               \
    TCHECK(strstr((hay), (needle)) != NULL, "\"%s\" does not contain \"%s\"", (hay), (needle))

/* Runs one case: a function `void name(void)`. */
#define TRUN(fn)                                                                                                       \
    do {                                                                                                               \
        tcheck_case_failed = 0;                                                                                        \
        fn();                                                                                                          \
        tcheck_cases++;                                                                                                \
        if (tcheck_case_failed) {                                                                                      \
            tcheck_failures++;                                                                                         \
            fprintf(stderr, "FAIL %s\n", #fn);                                                                         \
        } else {                                                                                                       \
            printf("ok   %s\n", #fn);                                                                                  \
        }                                                                                                              \
    } while (0)

#define TDONE() (printf("%d cases, %d failed\n", tcheck_cases, tcheck_failures), tcheck_failures ? 1 : 0)

#endif
