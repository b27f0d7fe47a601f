/*
 * mqttpub: holds one MQTT 3.1.1 connection to a broker and publishes an
 * incrementing counter (payload "0", "1", ...) every 200 ms at QoS 0.
 *
 *   mqttpub [HOST [PORT [TOPIC [CLIENT_ID]]]]
 *
 * Arguments override the environment: MQTT_HOST (an IPv4 address; no name
 * lookup in a static binary), MQTT_PORT (1883), MQTT_TOPIC
 * (ferry/test/mqttpub), MQTT_CLIENT_ID (mqttpub).
 *
 * The counter lives only in memory: a workload resumed from a checkpoint
 * goes on at the next value, a restarted one begins again at 0. A value is
 * counted once its PUBLISH was written to the socket. When the connection
 * is lost (a write or read fails, the broker closes it, or a PINGREQ goes
 * unanswered for 10 s), mqttpub reconnects with a backoff of 200 ms doubling
 * up to 2 s and goes on counting where it was. Each line on stdout is one
 * event: "connected HOST:PORT", "published N", "lost: REASON".
 *
 * Only the packets it needs are written by hand: CONNECT (clean session,
 * keep-alive 30 s), PUBLISH (QoS 0), PINGREQ, DISCONNECT (on SIGTERM).
 * A test workload, not a client library.
 */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define TICK_MS 200
#define KEEPALIVE_S 30
#define PING_EVERY_TICKS 25   /* a PINGREQ every 5 s ... */
#define PING_TIMEOUT_TICKS 50 /* ... answered within 10 s, or the link is dead */

static volatile sig_atomic_t stop;
static void on_term(int sig) { (void)sig; stop = 1; }

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    /* One write(2) per line: nothing may sit in a stdio buffer when the
     * process is checkpointed. */
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line - 1, fmt, ap);
    va_end(ap);
    if (n < 0) return;
    if (n > (int)sizeof line - 2) n = (int)sizeof line - 2;
    line[n++] = '\n';
    ssize_t w = write(STDOUT_FILENO, line, (size_t)n);
    (void)w;
}

static void sleep_ms(long ms) {
    /* Relative sleep: a restored process on another machine must not wait
     * for an absolute deadline on a different monotonic clock. */
    struct timespec t = {ms / 1000, (ms % 1000) * 1000000L};
    while (nanosleep(&t, &t) < 0 && errno == EINTR && !stop) {}
}

static int send_all(int fd, const uint8_t *p, size_t n) {
    while (n > 0) {
        ssize_t w = send(fd, p, n, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EINTR) continue;
            return -1;
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Fixed header: packet type byte, then the "remaining length" in 7-bit
 * groups, least significant first, high bit = more bytes follow. */
static size_t put_header(uint8_t *b, uint8_t type, size_t remaining) {
    size_t i = 0;
    b[i++] = type;
    do {
        uint8_t d = remaining % 128;
        remaining /= 128;
        if (remaining) d |= 0x80;
        b[i++] = d;
    } while (remaining);
    return i;
}

/* A UTF-8 string field: 2-byte big-endian length, then the bytes. */
static size_t put_str(uint8_t *b, const char *s) {
    size_t n = strlen(s);
    b[0] = (uint8_t)(n >> 8);
    b[1] = (uint8_t)n;
    memcpy(b + 2, s, n);
    return n + 2;
}

static int mqtt_connect(int fd, const char *client_id) {
    uint8_t body[300], pkt[310];
    size_t n = 0;
    n += put_str(body + n, "MQTT"); /* protocol name */
    body[n++] = 4;                  /* protocol level 4 = 3.1.1 */
    body[n++] = 0x02;               /* flags: clean session */
    body[n++] = KEEPALIVE_S >> 8;
    body[n++] = KEEPALIVE_S & 0xff;
    n += put_str(body + n, client_id);
    size_t h = put_header(pkt, 0x10, n);
    memcpy(pkt + h, body, n);
    if (send_all(fd, pkt, h + n) < 0) return -1;

    /* CONNACK: 0x20 0x02, session-present flag, return code (0 = accepted). */
    uint8_t ack[4];
    size_t got = 0;
    while (got < sizeof ack) {
        ssize_t r = recv(fd, ack + got, sizeof ack - got, 0);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    if (ack[0] != 0x20 || ack[1] != 2 || ack[3] != 0) {
        errno = ECONNREFUSED;
        return -1;
    }
    return 0;
}

static int mqtt_publish(int fd, const char *topic, uint64_t value) {
    uint8_t pkt[300];
    char payload[24];
    int pn = snprintf(payload, sizeof payload, "%llu", (unsigned long long)value);
    size_t tn = strlen(topic);
    /* QoS 0: no packet identifier; topic, then the payload to the end. */
    size_t h = put_header(pkt, 0x30, 2 + tn + (size_t)pn);
    h += put_str(pkt + h, topic);
    memcpy(pkt + h, payload, (size_t)pn);
    return send_all(fd, pkt, h + (size_t)pn);
}

static int dial(struct sockaddr_in *addr) {
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return -1;
    /* Bounds connect() and the CONNACK read. */
    struct timeval tv = {5, 0};
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(fd, (struct sockaddr *)addr, sizeof *addr) < 0) {
        int e = errno;
        close(fd);
        errno = e;
        return -1;
    }
    return fd;
}

static const char *arg_or_env(int argc, char **argv, int i, const char *env, const char *dflt) {
    if (argc > i && argv[i][0]) return argv[i];
    const char *v = getenv(env);
    return v && v[0] ? v : dflt;
}

int main(int argc, char **argv) {
    signal(SIGTERM, on_term);
    signal(SIGINT, on_term);
    signal(SIGPIPE, SIG_IGN);

    const char *host = arg_or_env(argc, argv, 1, "MQTT_HOST", NULL);
    const char *port = arg_or_env(argc, argv, 2, "MQTT_PORT", "1883");
    const char *topic = arg_or_env(argc, argv, 3, "MQTT_TOPIC", "ferry/test/mqttpub");
    const char *client_id = arg_or_env(argc, argv, 4, "MQTT_CLIENT_ID", "mqttpub");
    struct sockaddr_in addr = {.sin_family = AF_INET};
    long p = port ? strtol(port, NULL, 10) : 0;
    if (!host || inet_pton(AF_INET, host, &addr.sin_addr) != 1 || p <= 0 || p > 65535
        || strlen(topic) > 200 || strlen(client_id) > 23) {
        say("usage: mqttpub HOST(IPv4) [PORT [TOPIC(<=200) [CLIENT_ID(<=23)]]] (or MQTT_HOST, MQTT_PORT, MQTT_TOPIC, MQTT_CLIENT_ID)");
        return 2;
    }
    addr.sin_port = htons((uint16_t)p);

    uint64_t next = 0; /* the counter: the value the next PUBLISH carries */
    long backoff = TICK_MS;
    while (!stop) {
        int fd = dial(&addr);
        if (fd < 0 || mqtt_connect(fd, client_id) < 0) {
            say("lost: connect to %s:%ld: %s; again in %ld ms", host, p, strerror(errno), backoff);
            if (fd >= 0) close(fd);
            sleep_ms(backoff);
            if (backoff < 2000) backoff *= 2;
            continue;
        }
        say("connected %s:%ld as %s", host, p, client_id);
        backoff = TICK_MS;

        const char *why = NULL;
        int ticks = 0, ping_sent_at = -1;
        while (!stop && !why) {
            if (mqtt_publish(fd, topic, next) < 0) {
                why = strerror(errno);
                break;
            }
            say("published %llu", (unsigned long long)next);
            next++;
            sleep_ms(TICK_MS);
            ticks++;

            /* Drain what the broker sent (only PINGRESP is expected). */
            uint8_t in[64];
            ssize_t r;
            while ((r = recv(fd, in, sizeof in, MSG_DONTWAIT)) > 0) {
                for (ssize_t i = 0; i < r; i++)
                    if (in[i] == 0xd0) ping_sent_at = -1; /* PINGRESP */
            }
            if (r == 0) why = "closed by the broker";
            else if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR) why = strerror(errno);

            if (ping_sent_at >= 0 && ticks - ping_sent_at > PING_TIMEOUT_TICKS) {
                why = "no PINGRESP within 10 s";
            } else if (ping_sent_at < 0 && ticks % PING_EVERY_TICKS == 0) {
                static const uint8_t pingreq[2] = {0xc0, 0};
                if (send_all(fd, pingreq, sizeof pingreq) < 0) why = strerror(errno);
                else ping_sent_at = ticks;
            }
        }
        if (stop) {
            static const uint8_t disconnect[2] = {0xe0, 0};
            send_all(fd, disconnect, sizeof disconnect);
            close(fd);
            break;
        }
        say("lost: %s; reconnecting", why ? why : "?");
        close(fd);
        sleep_ms(backoff);
    }
    return 0;
}
