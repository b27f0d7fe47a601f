/*
 * counter: prints 0, 1, 2, ... one per line every 100 ms, forever.
 *
 * The value lives only in this process's memory, so a test can tell a
 * workload that was resumed from a checkpoint (it continues at last + 1)
 * from one that was restarted (it begins again at 0). Each line goes out
 * with its own write(2): stdout is a pipe to the container runtime and
 * nothing may sit in a stdio buffer when the process is checkpointed.
 */
#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <time.h>
#include <unistd.h>

static void on_term(int sig) { (void)sig; _exit(0); }

static int write_all(const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(STDOUT_FILENO, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

int main(void) {
    /* PID 1 in a container ignores signals it has no handler for. */
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);

    const struct timespec period = {0, 100 * 1000 * 1000};
    for (uint64_t n = 0;; n++) {
        char buf[24];
        size_t i = sizeof buf;
        buf[--i] = '\n';
        uint64_t v = n;
        do {
            buf[--i] = (char)('0' + v % 10);
            v /= 10;
        } while (v);
        if (write_all(buf + i, sizeof buf - i) < 0) return 1;
        /* Relative sleep: a restored process on another machine must not
         * wait for an absolute deadline on a different monotonic clock. */
        struct timespec rem = period;
        while (nanosleep(&rem, &rem) < 0 && errno == EINTR) {}
    }
}
