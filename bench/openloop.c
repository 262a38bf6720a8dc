/* Open-loop load for bench/run.py scenario 4: request k is due at t0 + k/rate, goes out on
 * the next idle keep-alive connection, and its latency is response complete - due time, so
 * waiting for a connection counts (wrk2's coordinated-omission correction).
 *
 * Why C: the Python client it replaces needed ~1 core for 15k TLS requests/s. Sharing the
 * load CPU with the upstream, it queued its own sends by up to 23 ms, and that queueing
 * landed in the p99 "added by the proxy". This one spends a few us per request.
 *
 *   openloop HOST PORT SNI|- CAFILE|- RATE SECONDS CONNS REQUEST_FILE LATENCY_FILE
 *
 * SNI "-" means plain TCP. Responses must be bodiless (the bench's beacons get 204s).
 * Latencies (ns, one per line) go to LATENCY_FILE; a JSON summary to stdout. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

typedef struct {
    int fd;
    SSL *ssl;
    int busy;        /* a request is out */
    int dead;        /* closed by the server: never used again */
    int64_t due;     /* its due time (ns) */
    char buf[8192];  /* response bytes not yet parsed */
    size_t len;
} conn_t;

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void die(const char *what) {
    fprintf(stderr, "openloop: %s: %s\n", what, errno ? strerror(errno) : "");
    ERR_print_errors_fp(stderr);
    exit(2);
}

static char *read_file(const char *path, size_t *len) {
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    static char data[65536];
    *len = fread(data, 1, sizeof data, f);
    fclose(f);
    return data;
}

/* Send all of it (blocking-style retries: a request is small, the socket buffer empty). */
static int send_all(conn_t *c, const char *p, size_t n) {
    while (n) {
        int w;
        if (c->ssl) {
            w = SSL_write(c->ssl, p, (int)n);
            if (w <= 0) {
                int e = SSL_get_error(c->ssl, w);
                if (e == SSL_ERROR_WANT_WRITE || e == SSL_ERROR_WANT_READ) continue;
                return -1;
            }
        } else {
            w = (int)send(c->fd, p, n, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EAGAIN || errno == EINTR) continue;
                return -1;
            }
        }
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

/* Read into c->buf: bytes read (> 0), 0 when the server closed (or failed), -1 for "nothing
 * yet" on a non-blocking socket. */
static int conn_read(conn_t *c) {
    if (c->ssl) {
        int r = SSL_read(c->ssl, c->buf + c->len, (int)(sizeof c->buf - c->len));
        if (r > 0) return r;
        int err = SSL_get_error(c->ssl, r);
        return err == SSL_ERROR_WANT_READ || err == SSL_ERROR_WANT_WRITE ? -1 : 0;
    }
    int r = (int)recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
    if (r >= 0) return r;
    return errno == EAGAIN || errno == EINTR ? -1 : 0;
}

int main(int argc, char **argv) {
    if (argc != 10) {
        fprintf(stderr, "usage: openloop HOST PORT SNI|- CAFILE|- RATE SECONDS CONNS REQUEST_FILE LATENCY_FILE\n");
        return 2;
    }
    const char *host = argv[1], *sni = argv[3], *cafile = argv[4];
    int port = atoi(argv[2]), nconn = atoi(argv[7]);
    double rate = atof(argv[5]), seconds = atof(argv[6]);
    size_t reqlen;
    const char *req = read_file(argv[8], &reqlen);
    int tls = strcmp(sni, "-") != 0;
    signal(SIGPIPE, SIG_IGN); /* a write to a connection the server closed: an error, not death */

    SSL_CTX *ctx = NULL;
    if (tls) {
        ctx = SSL_CTX_new(TLS_client_method());
        if (!ctx) die("SSL_CTX_new");
        if (strcmp(cafile, "-") != 0) {
            if (SSL_CTX_load_verify_locations(ctx, cafile, NULL) != 1) die("CA file");
            SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
        }
    }
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons((uint16_t)port)};
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) die("HOST must be an IPv4 address");

    int ep = epoll_create1(0);
    conn_t *conns = calloc((size_t)nconn, sizeof *conns);
    int *idle = malloc(sizeof(int) * (size_t)nconn), nidle = 0;
    for (int i = 0; i < nconn; i++) {
        conn_t *c = &conns[i];
        c->fd = socket(AF_INET, SOCK_STREAM, 0);
        if (c->fd < 0 || connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0) die("connect");
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        if (tls) {
            c->ssl = SSL_new(ctx);
            SSL_set_fd(c->ssl, c->fd);
            SSL_set_tlsext_host_name(c->ssl, sni);
            SSL_set1_host(c->ssl, sni);
            if (SSL_connect(c->ssl) != 1) die("TLS handshake");
        }
        /* One request first, not counted: the connection (and the proxy's upstream pool)
         * warmed, and a TLS 1.3 server's tickets read. */
        if (send_all(c, req, reqlen) < 0) die("warm-up request");
        while (!memmem(c->buf, c->len, "\r\n\r\n", 4)) {
            int r = conn_read(c); /* (still blocking here) */
            if (r <= 0 || c->len + (size_t)r >= sizeof c->buf) die("warm-up response");
            c->len += (size_t)r;
        }
        c->len = 0;
        fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
        struct epoll_event ev = {.events = EPOLLIN, .data.u32 = (uint32_t)i};
        if (epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev) < 0) die("epoll_ctl");
        idle[nidle++] = i;
    }

    int64_t total = (int64_t)(rate * seconds), interval = (int64_t)(1e9 / rate);
    int64_t *lat = malloc(sizeof(int64_t) * (size_t)(total + 1));
    int64_t *backlog = malloc(sizeof(int64_t) * (size_t)(total + 1)); /* due times, FIFO */
    int64_t bhead = 0, btail = 0, k = 0, nlat = 0, outstanding = 0;
    int64_t max_lag = 0, closed = 0, errors = 0, non204 = 0;
    int64_t t0 = now_ns() + 100000000LL;
    int64_t deadline = t0 + (int64_t)(seconds * 1e9) + 15000000000LL;
    struct epoll_event events[256];

    while ((k < total || bhead < btail || outstanding) && now_ns() < deadline) {
        int64_t now = now_ns();
        while (k < total && t0 + k * interval <= now) backlog[btail++] = t0 + k++ * interval;
        while (bhead < btail && nidle) {
            conn_t *c = &conns[idle[--nidle]];
            if (c->dead) continue;
            int64_t due = backlog[bhead++], lag = now_ns() - due;
            if (lag > max_lag) max_lag = lag;
            if (send_all(c, req, reqlen) < 0) {
                errors++;
                continue; /* this connection is gone: not put back */
            }
            c->busy = 1;
            c->due = due;
            outstanding++;
        }
        /* Sleep until the next request is due (ns precision), or a response comes. */
        struct timespec ts = {0, 50000000};
        if (k < total && bhead == btail) {
            int64_t wait = t0 + k * interval - now_ns();
            if (wait < 0) wait = 0;
            ts.tv_sec = wait / 1000000000LL;
            ts.tv_nsec = wait % 1000000000LL;
        }
        int n = epoll_pwait2(ep, events, 256, &ts, NULL);
        if (n < 0 && errno != EINTR) die("epoll_pwait2");
        for (int e = 0; e < n; e++) {
            int i = (int)events[e].data.u32;
            conn_t *c = &conns[i];
            for (;;) {
                int r = conn_read(c);
                if (r < 0) break; /* nothing more for now */
                if (r == 0) { /* closed by the server */
                    closed++;
                    c->dead = 1;
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    if (c->busy) { /* its request is lost */
                        outstanding--;
                        errors++;
                    }
                    c->busy = 0;
                    break;
                }
                c->len += (size_t)r;
                char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
                if (end && c->busy) {
                    int64_t done = now_ns();
                    if (c->len < 12 || memcmp(c->buf + 9, "204", 3) != 0) non204++;
                    lat[nlat++] = done - c->due;
                    size_t used = (size_t)(end + 4 - c->buf);
                    memmove(c->buf, end + 4, c->len - used);
                    c->len -= used;
                    c->busy = 0;
                    outstanding--;
                    idle[nidle++] = i;
                } else if (c->len == sizeof c->buf) {
                    errors++;
                    c->len = 0;
                }
            }
        }
    }
    double elapsed = (double)(now_ns() - t0) / 1e9;
    FILE *out = fopen(argv[9], "w");
    if (!out) die(argv[9]);
    for (int64_t i = 0; i < nlat; i++) fprintf(out, "%lld\n", (long long)lat[i]);
    fclose(out);
    printf("{\"ok\": %lld, \"non_204\": %lld, \"unsent\": %lld, \"unanswered\": %lld, "
           "\"closed_by_server\": %lld, \"errors\": %lld, \"max_send_lag_ms\": %.3f, "
           "\"elapsed\": %.3f}\n",
           (long long)(nlat - non204), (long long)non204, (long long)(total - k + btail - bhead),
           (long long)outstanding, (long long)closed, (long long)errors, (double)max_lag / 1e6,
           elapsed);
    return 0;
}
