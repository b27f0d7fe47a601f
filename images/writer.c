/*
 * writer: changes the container's filesystem and a volume while it runs.
 *
 *   writer              (no arguments; the image declares VOLUME /vol)
 *
 * At start it writes /data/created-at-start ("created at start\n") and
 * deletes /data/deleted-at-start, which the image ships (next to
 * /data/shipped, which it leaves alone). Then every 200 ms it counts
 * 1, 2, 3, ... in memory and appends "N\n" to /vol/log (the volume) and to
 * /data/ticks (the container's own layer), and prints "tick N".
 *
 * Both files stay open (O_APPEND) the whole time, as a real logger keeps
 * them: CRIU records their sizes at the checkpoint and refuses a restore
 * where a file is missing or has another size, so a migration that does
 * not carry the files exactly fails loudly. A resumed writer goes on at
 * N + 1 in both files; a restarted one rewrites created-at-start and its
 * files start over at 1 after the lines already there.
 */
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

static void on_term(int sig) { (void)sig; _exit(0); }

static int write_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = write(fd, p, n);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static int fail(const char *what, const char *path) {
    char line[256];
    int n = snprintf(line, sizeof line, "writer: %s %s: %s\n", what, path, strerror(errno));
    write_all(STDERR_FILENO, line, (size_t)n);
    return 1;
}

static int open_append(const char *path) {
    return open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
}

int main(void) {
    /* PID 1 in a container ignores signals it has no handler for. */
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);

    mkdir("/data", 0755);
    mkdir("/vol", 0755);
    int fd = open("/data/created-at-start", O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0 || write_all(fd, "created at start\n", 17) < 0 || close(fd) < 0)
        return fail("writing", "/data/created-at-start");
    if (unlink("/data/deleted-at-start") < 0 && errno != ENOENT)
        return fail("deleting", "/data/deleted-at-start");

    int vol = open_append("/vol/log"), ticks = open_append("/data/ticks");
    if (vol < 0) return fail("opening", "/vol/log");
    if (ticks < 0) return fail("opening", "/data/ticks");

    const struct timespec period = {0, 200 * 1000 * 1000};
    for (uint64_t n = 1;; n++) {
        char line[40];
        int len = snprintf(line, sizeof line, "%llu\n", (unsigned long long)n);
        if (write_all(vol, line, (size_t)len) < 0) return fail("appending to", "/vol/log");
        if (write_all(ticks, line, (size_t)len) < 0) return fail("appending to", "/data/ticks");
        len = snprintf(line, sizeof line, "tick %llu\n", (unsigned long long)n);
        if (write_all(STDOUT_FILENO, line, (size_t)len) < 0) return 1;
        /* Relative sleep: a restored process on another machine must not
         * wait for an absolute deadline on a different monotonic clock. */
        struct timespec rem = period;
        while (nanosleep(&rem, &rem) < 0 && errno == EINTR) {}
    }
}
