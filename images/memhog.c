/*
 * memhog SIZE_MIB [REWRITE_PERCENT]: holds SIZE_MIB of memory with a
 * deterministic pattern and keeps proving that it is intact.
 *
 * The first half is compressible (each page repeats a 16-byte record made of
 * a marker and the page index), the second half is pseudo-random (xorshift64
 * from a fixed seed), so a migration's compression sees both kinds of pages.
 * The content depends only on SIZE_MIB, and so does the checksum: the same
 * size prints the same checksum in every run, before and after a migration.
 *
 * With REWRITE_PERCENT (1..100), after each verification it also rewrites
 * that share of its pages, in order and wrapping around: the k-th rewrite
 * (counting from 0) gives page k mod PAGES new content derived from the
 * page and how often it was rewritten. The count of rewrites lives in the
 * process's memory too, so every page's expected content follows from it:
 * a page restored from an older copy is a mismatch. The checksum then
 * changes from tick to tick.
 *
 * Output, one line per write(2):
 *   ready SIZE_MIB checksum HEX     once, after filling
 *   tick N checksum HEX             after each full verification (~1 s apart)
 *   tick N rewrites R checksum HEX  the same with REWRITE_PERCENT
 *   mismatch at page P              then exit 2, if any byte is wrong
 */
#include <errno.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096u
#define WORDS (PAGE / 8u)
#define SEED 0x9e3779b97f4a7c15ull
#define MARKER 0x4d454d5952524546ull /* "FERRYMEM" in memory (little endian) */

static void on_term(int sig) { (void)sig; _exit(0); }

static void say(const char *fmt, ...) {
    char buf[128];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if ((size_t)n >= sizeof buf) n = sizeof buf - 1;
    const char *p = buf;
    while (n > 0) {
        ssize_t w = write(STDOUT_FILENO, p, (size_t)n);
        if (w < 0) {
            if (errno == EINTR) continue;
            _exit(1);
        }
        p += w;
        n -= (int)w;
    }
}

static uint64_t xorshift64(uint64_t *s) {
    uint64_t x = *s;
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    return *s = x;
}

/* Expected content of word w of page p; `rng` is the xorshift state, used and
 * advanced only for pages in the random half (they are visited in order). */
static inline uint64_t expected(uint64_t p, uint64_t w, uint64_t half, uint64_t *rng) {
    if (p < half) return (w & 1) ? p : MARKER;
    return xorshift64(rng);
}

/* Word w of page p after its t-th rewrite (t >= 1). */
static inline uint64_t rewritten(uint64_t p, uint64_t t, uint64_t w) {
    uint64_t z = p * 0x9e3779b97f4a7c15ull + t * 0xbf58476d1ce4e5b9ull + w + 1;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* How often page p was rewritten after r rewrites of `pages` pages in turn. */
static inline uint64_t times(uint64_t p, uint64_t r, uint64_t pages) {
    return r > p ? (r - p - 1) / pages + 1 : 0;
}

/* FNV-1a style mix over 64-bit words. */
static inline uint64_t mix(uint64_t h, uint64_t v) { return (h ^ v) * 0x100000001b3ull; }

int main(int argc, char **argv) {
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);

    char *end = NULL, *end2 = NULL;
    unsigned long mib = argc >= 2 ? strtoul(argv[1], &end, 10) : 0;
    unsigned long pct = argc == 3 ? strtoul(argv[2], &end2, 10) : 0;
    if (argc < 2 || argc > 3 || *end != '\0' || mib == 0 || mib > (1ul << 20) ||
        (argc == 3 && (*end2 != '\0' || pct == 0 || pct > 100))) {
        say("usage: memhog SIZE_MIB (1..1048576) [REWRITE_PERCENT (1..100)]\n");
        return 64;
    }
    uint64_t pages = (uint64_t)mib * (1024 * 1024 / PAGE), half = pages / 2;
    uint64_t *buf = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE,
                         MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (buf == MAP_FAILED) {
        say("mmap of %lu MiB failed: %s\n", mib, strerror(errno));
        return 1;
    }

    uint64_t rng = SEED, sum = 0xcbf29ce484222325ull;
    for (uint64_t p = 0; p < pages; p++)
        for (uint64_t w = 0; w < WORDS; w++) {
            uint64_t v = expected(p, w, half, &rng);
            buf[p * WORDS + w] = v;
            sum = mix(sum, v);
        }
    say("ready %lu checksum %016llx\n", mib, (unsigned long long)sum);

    const struct timespec period = {1, 0};
    uint64_t per_tick = pct * pages / 100, rewrites = 0;
    for (uint64_t tick = 1;; tick++) {
        struct timespec rem = period;
        while (nanosleep(&rem, &rem) < 0 && errno == EINTR) {}
        uint64_t r = SEED, s = 0xcbf29ce484222325ull;
        for (uint64_t p = 0; p < pages; p++) {
            uint64_t bad = 0, t = times(p, rewrites, pages);
            for (uint64_t w = 0; w < WORDS; w++) {
                uint64_t v = buf[p * WORDS + w], e = expected(p, w, half, &r);
                bad |= v ^ (t ? rewritten(p, t, w) : e);
                s = mix(s, v);
            }
            if (bad) {
                say("mismatch at page %llu\n", (unsigned long long)p);
                return 2;
            }
        }
        if (!pct) {
            say("tick %llu checksum %016llx\n", (unsigned long long)tick, (unsigned long long)s);
            continue;
        }
        say("tick %llu rewrites %llu checksum %016llx\n", (unsigned long long)tick,
            (unsigned long long)rewrites, (unsigned long long)s);
        for (uint64_t i = 0; i < per_tick; i++, rewrites++) {
            uint64_t p = rewrites % pages, t = times(p, rewrites + 1, pages);
            for (uint64_t w = 0; w < WORDS; w++) buf[p * WORDS + w] = rewritten(p, t, w);
        }
    }
}
