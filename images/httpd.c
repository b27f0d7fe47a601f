/*
 * httpd: a tiny HTTP/1.0 server with in-memory state, one request per
 * connection, one connection at a time.
 *
 *   httpd [PORT]        (default 80; listens on 0.0.0.0)
 *
 *   GET  /count         the number of /count requests so far, this one
 *                       included ("1\n", "2\n", ...)
 *   GET  /state         the value last set ("" until set), then "\n"
 *   POST /state         sets the value to the request body (<= 1024 bytes)
 *   GET  /set?v=VALUE   sets the value to VALUE (taken as is, not decoded)
 *   GET  /              "ferry-test httpd\n"
 *
 * Both the counter and the value live only in memory: after a migration
 * they must be what they were, after a restart they are 0 and "". One line
 * per request on stdout ("GET /count 200"), one write(2) each.
 */
#define _GNU_SOURCE /* accept4, strcasestr */
#include <errno.h>
#include <netinet/in.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_REQUEST 4096
#define MAX_VALUE 1024

static unsigned long long count;
static char value[MAX_VALUE + 1];

static void on_term(int sig) { (void)sig; _exit(0); }

static void send_all(int fd, const char *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return;
        }
        p += w;
        n -= (size_t)w;
    }
}

static void respond(int fd, int status, const char *body) {
    const char *reason = status == 200 ? "OK" : status == 400 ? "Bad Request" : "Not Found";
    char head[160];
    size_t n = strlen(body);
    int h = snprintf(head, sizeof head,
                     "HTTP/1.0 %d %s\r\nContent-Type: text/plain\r\nContent-Length: %zu\r\n"
                     "Connection: close\r\n\r\n",
                     status, reason, n);
    send_all(fd, head, (size_t)h);
    send_all(fd, body, n);
}

/* Reads the head and, when Content-Length says so, the body. Returns the
 * total read and points *body at the body (NUL-terminated), or -1. */
static ssize_t read_request(int fd, char *buf, char **body, size_t *body_len) {
    size_t got = 0, need = 0;
    char *end = NULL;
    while (got < MAX_REQUEST) {
        ssize_t r = recv(fd, buf + got, MAX_REQUEST - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) break;
        got += (size_t)r;
        buf[got] = 0;
        if (!end && (end = strstr(buf, "\r\n\r\n"))) {
            char *cl = strcasestr(buf, "\r\nContent-Length:");
            size_t len = cl && cl < end ? strtoul(cl + 17, NULL, 10) : 0;
            need = (size_t)(end + 4 - buf) + len;
            if (need > MAX_REQUEST) return -1;
        }
        if (end && got >= need) break;
    }
    if (!end) return -1;
    *body = end + 4;
    *body_len = got - (size_t)(end + 4 - buf);
    return (ssize_t)got;
}

static void set_value(const char *v, size_t n) {
    if (n > MAX_VALUE) n = MAX_VALUE;
    memcpy(value, v, n);
    value[n] = 0;
}

static void serve(int fd) {
    char buf[MAX_REQUEST + 1], *body, out[MAX_VALUE + 32];
    size_t body_len;
    int status = 200;
    if (read_request(fd, buf, &body, &body_len) < 0) {
        respond(fd, 400, "bad request\n");
        return;
    }
    char *sp1 = strchr(buf, ' '), *sp2 = sp1 ? strchr(sp1 + 1, ' ') : NULL;
    if (!sp1 || !sp2) {
        respond(fd, 400, "bad request\n");
        return;
    }
    *sp1 = 0;
    *sp2 = 0;
    const char *method = buf, *path = sp1 + 1;

    if (!strcmp(method, "GET") && !strcmp(path, "/count")) {
        snprintf(out, sizeof out, "%llu\n", ++count);
    } else if (!strcmp(method, "GET") && !strcmp(path, "/state")) {
        snprintf(out, sizeof out, "%s\n", value);
    } else if (!strcmp(method, "POST") && !strcmp(path, "/state")) {
        set_value(body, body_len);
        snprintf(out, sizeof out, "%s\n", value);
    } else if (!strcmp(method, "GET") && !strncmp(path, "/set?v=", 7)) {
        set_value(path + 7, strlen(path + 7));
        snprintf(out, sizeof out, "%s\n", value);
    } else if (!strcmp(method, "GET") && !strcmp(path, "/")) {
        snprintf(out, sizeof out, "ferry-test httpd\n");
    } else {
        status = 404;
        snprintf(out, sizeof out, "not found\n");
    }
    respond(fd, status, out);

    char line[128];
    int n = snprintf(line, sizeof line, "%.8s %.80s %d\n", method, path, status);
    ssize_t w = write(STDOUT_FILENO, line, (size_t)n < sizeof line ? (size_t)n : sizeof line - 1);
    (void)w;
}

int main(int argc, char **argv) {
    /* PID 1 in a container ignores signals it has no handler for. */
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    signal(SIGPIPE, SIG_IGN);

    long port = argc > 1 ? strtol(argv[1], NULL, 10) : 80;
    if (port <= 0 || port > 65535) {
        fprintf(stderr, "usage: httpd [PORT]\n");
        return 2;
    }
    int ls = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                               .sin_addr.s_addr = htonl(INADDR_ANY)};
    setsockopt(ls, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (ls < 0 || bind(ls, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(ls, 16) < 0) {
        perror("httpd: listen");
        return 1;
    }
    char line[64];
    int n = snprintf(line, sizeof line, "listening on :%ld\n", port);
    ssize_t w = write(STDOUT_FILENO, line, (size_t)n);
    (void)w;

    for (;;) {
        int fd = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            perror("httpd: accept");
            return 1;
        }
        /* A client that stalls holds no one up for more than 5 s. */
        struct timeval tv = {5, 0};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        serve(fd);
        close(fd);
    }
}
