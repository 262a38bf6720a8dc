/* Client connections in C: accept, the TLS handshake, records in and out, close.
 *
 * What tls/transport.py does in compiled Python, without the Python objects per connection
 * (a socket object, ssl's _SSLSocket, an exception for every "no data yet", uvloop's reader
 * registrations): bench/RESULTS.md, session 9, has what it saves. The rules are the same
 * as transport.py's (its docstring), and so are the protocol's calls: the protocol is made
 * once the handshake succeeds, and sees an asyncio transport.
 *
 * One difference: an exception from the protocol's callbacks (a bug of ours) goes to the
 * loop's exception handler, which logs it, and the connection is aborted: its state is
 * unknown after that. (uvloop, calling transport.py, logs it and leaves it open.)
 *
 * How it sits in the loop: one epoll set per worker holds the listening sockets, every
 * client connection and a timerfd for handshake deadlines; the event loop watches that
 * set's descriptor (level-triggered) and calls Core.poll when anything in it is ready.
 *
 * The handshake uses the base context that the supervisor made before forking (shared
 * ticket keys), and this module's own SNI callback on it, which asks `select(name)` for the
 * domain's context. OpenSSL is reached through the SSL_CTX inside the Python SSLContext:
 * CPython 3.11's _ssl object layout, checked at import by native.py (same libssl as _ssl,
 * same version), which otherwise keeps the Python transport.
 */

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <arpa/inet.h>
#include <dlfcn.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define RECORD 16384      /* the largest TLS record's plaintext: one SSL_read's most */
#define READS_PER_EVENT 8 /* full records read per readiness before others get a turn */
#define WRITE_HIGH 65536
#define WRITE_LOW 16384
#define LINGER 2.0 /* how long a closed connection reads (and drops) what still comes */
#define MAX_EVENTS 64

enum { S_HANDSHAKE, S_OPEN, S_CLOSING, S_LINGER, S_CLOSED };
static const char *STATE_NAMES[] = {"handshake", "open", "closing", "linger", "closed"};

/* epoll tags: a connection is its (aligned) pointer; these have low bits set. */
#define TAG_TIMER ((uint64_t)2)
#define TAG_LISTENER(fd) (((uint64_t)(unsigned)(fd) << 2) | 1)

/* CPython 3.11 Modules/_ssl.c: PySSLContext begins with the SSL_CTX pointer. */
typedef struct {
    PyObject_HEAD
    SSL_CTX *ctx;
} PySSLContextHead;

typedef struct Core Core;
typedef struct Conn Conn;

struct Conn {
    PyObject_HEAD
    Core *core;
    SSL *ssl;
    int fd;
    int state;
    uint32_t events;     /* what epoll watches for it now (0: not in the set) */
    char reading;        /* the protocol wants data (pause_reading / resume_reading) */
    char write_paused;   /* the protocol was told to pause writing */
    char read_wants_write;
    PyObject *peer;
    PyObject *sni;       /* the SNI name, "" until the callback sets it */
    PyObject *ctx;       /* the SSLContext SNI picked: its callbacks need it alive */
    PyObject *factory;   /* makes the protocol, once the handshake succeeds */
    PyObject *protocol;
    PyObject *wbuf;      /* list of bytes waiting, from index whead on */
    Py_ssize_t whead;
    Py_ssize_t wsize;
    PyObject *timer;     /* the linger's */
    PyObject *send_timer; /* while data waits: send_timeout */
    double progress;     /* when the client last took some of what waits */
    double deadline;     /* of the handshake */
    Conn *dprev, *dnext; /* handshakes in deadline order */
    PyObject *weakreflist;
};

struct Core {
    PyObject_HEAD
    PyObject *loop;
    PyObject *base_ctx;
    PyObject *ctx_type; /* _ssl._SSLContext */
    PyObject *factory;
    PyObject *select;
    PyObject *on_accept_error;
    PyObject *ssl_error; /* ssl.SSLError, for connection_lost */
    SSL_CTX *base;
    int epfd;
    int tfd;
    double timeout;      /* for a handshake */
    double send_timeout; /* for a client to take some of what waits for it */
    double armed; /* the deadline the timerfd is set for, 0 when unset */
    Conn *dhead, *dtail;
    long long ok, failed;
};

static PyTypeObject ConnType;
static PyTypeObject CoreType;

static PyObject *s_data_received, *s_connection_made, *s_connection_lost, *s_eof_received;
static PyObject *s_pause_writing, *s_resume_writing, *s_reading_request, *s_call_soon;
static PyObject *s_call_later, *s_cancel, *s_lost, *s_linger_done, *s_call_exception_handler;
static PyObject *s_send_check;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + ts.tv_nsec / 1e9;
}

/* --- the epoll set ------------------------------------------------------------------------ */

static void set_events(Conn *c, uint32_t events) {
    if (c->events == events || c->fd < 0)
        return;
    struct epoll_event ev = {.events = events, .data.ptr = c};
    /* A connection watching nothing leaves the set: epoll would still report a hang-up
     * for it, again and again (level-triggered), while the protocol has paused reading. */
    int op = events == 0 ? EPOLL_CTL_DEL : c->events == 0 ? EPOLL_CTL_ADD : EPOLL_CTL_MOD;
    if (epoll_ctl(c->core->epfd, op, c->fd, &ev) == 0) {
        c->events = events;
    } else { /* (out of memory, or the set is full: said, and it watches what it did) */
        PyErr_SetFromErrno(PyExc_OSError);
        PyErr_WriteUnraisable((PyObject *)c);
    }
}

static void watch_read(Conn *c) { set_events(c, c->events | EPOLLIN); }
static void unwatch_read(Conn *c) { set_events(c, c->events & ~(uint32_t)EPOLLIN); }
static void watch_write(Conn *c) { set_events(c, c->events | EPOLLOUT); }
static void unwatch_write(Conn *c) { set_events(c, c->events & ~(uint32_t)EPOLLOUT); }

/* --- handshake deadlines: one timerfd, armed for the oldest pending handshake -------------- */

static void arm(Core *core, double at) {
    struct itimerspec its = {{0, 0}, {0, 0}};
    if (at > 0) {
        its.it_value.tv_sec = (time_t)at;
        its.it_value.tv_nsec = (long)((at - (double)(time_t)at) * 1e9);
        if (its.it_value.tv_sec == 0 && its.it_value.tv_nsec == 0)
            its.it_value.tv_nsec = 1;
    }
    timerfd_settime(core->tfd, TFD_TIMER_ABSTIME, &its, NULL);
    core->armed = at;
}

static void deadline_add(Conn *c) {
    Core *core = c->core;
    c->deadline = now() + core->timeout;
    c->dnext = NULL;
    c->dprev = core->dtail;
    if (core->dtail)
        core->dtail->dnext = c;
    else
        core->dhead = c;
    core->dtail = c;
    if (core->armed == 0)
        arm(core, c->deadline);
}

static void deadline_forget(Conn *c) {
    Core *core = c->core;
    if (!c->dprev && core->dhead != c)
        return; /* not in the list */
    if (c->dprev)
        c->dprev->dnext = c->dnext;
    else
        core->dhead = c->dnext;
    if (c->dnext)
        c->dnext->dprev = c->dprev;
    else
        core->dtail = c->dprev;
    c->dprev = c->dnext = NULL;
    /* The timer stays armed: when it fires it finds nothing due and moves on. */
}

/* --- reporting what went wrong ------------------------------------------------------------ */

/* The exception a Python callback raised goes to the loop's exception handler, as uvloop
 * does for a callback of its own; the connection it came from is aborted. */
static void report(Conn *c, const char *what) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb && value)
        PyException_SetTraceback(value, tb);
    PyObject *context = Py_BuildValue(
        "{s:s,s:O,s:O,s:O}", "message", what, "exception", value ? value : Py_None, "transport",
        (PyObject *)c, "protocol", c->protocol ? c->protocol : Py_None);
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
    if (context) {
        PyObject *r =
            PyObject_CallMethodOneArg(c->core->loop, s_call_exception_handler, context);
        Py_DECREF(context);
        Py_XDECREF(r);
    }
    if (PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)c);
}

/* What connection_lost gets for a TLS or socket error (the error queue is consumed). */
static PyObject *ssl_exception(Conn *c, int err) {
    PyObject *exc;
    if (err == SSL_ERROR_SYSCALL && errno) {
        int e = errno;
        exc = PyObject_CallFunction(PyExc_OSError, "is", e, strerror(e));
    } else {
        char buf[256];
        unsigned long code = ERR_peek_last_error();
        if (code)
            ERR_error_string_n(code, buf, sizeof buf);
        else
            snprintf(buf, sizeof buf, "TLS error %d", err);
        exc = PyObject_CallFunction(c->core->ssl_error, "is", err, buf);
    }
    ERR_clear_error();
    if (exc == NULL)
        PyErr_Clear();
    return exc;
}

/* --- closing ------------------------------------------------------------------------------ */

static void call_soon_lost(Conn *c, PyObject *exc) {
    PyObject *cb = PyObject_GetAttr((PyObject *)c, s_lost);
    if (cb) {
        PyObject *r =
            PyObject_CallMethodObjArgs(c->core->loop, s_call_soon, cb, exc ? exc : Py_None, NULL);
        Py_DECREF(cb);
        Py_XDECREF(r);
    }
    if (PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)c);
}

/* loop.call_later(delay, getattr(c, method)), or NULL (reported). */
static PyObject *call_later(Conn *c, double delay, PyObject *method) {
    PyObject *timer = NULL;
    PyObject *cb = PyObject_GetAttr((PyObject *)c, method);
    PyObject *d = PyFloat_FromDouble(delay);
    if (cb && d)
        timer = PyObject_CallMethodObjArgs(c->core->loop, s_call_later, d, cb, NULL);
    Py_XDECREF(cb);
    Py_XDECREF(d);
    if (timer == NULL)
        PyErr_WriteUnraisable((PyObject *)c);
    return timer;
}

static void cancel(Conn *c, PyObject **slot) {
    PyObject *t = *slot;
    if (t == NULL)
        return;
    *slot = NULL;
    PyObject *r = PyObject_CallMethodNoArgs(t, s_cancel);
    Py_XDECREF(r);
    Py_DECREF(t);
    if (PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)c);
}

/* Closes at once. The caller holds a reference to c: the set's reference goes here. */
static void close_now(Conn *c, PyObject *exc) {
    int prev = c->state;
    if (prev == S_CLOSED)
        return;
    c->state = S_CLOSED;
    deadline_forget(c);
    cancel(c, &c->timer);
    cancel(c, &c->send_timer);
    Py_CLEAR(c->wbuf);
    c->whead = 0;
    c->wsize = 0;
    c->events = 0;
    if (c->fd >= 0) {
        /* Closing takes it out of the epoll set: this descriptor is the file's only one
         * (client sockets are never dup'ed, and the worker never forks). */
        close(c->fd);
        c->fd = -1;
    }
    if (c->ssl) {
        SSL_free(c->ssl);
        c->ssl = NULL;
    }
    Py_CLEAR(c->ctx);
    Py_CLEAR(c->factory);
    if (c->protocol && (prev == S_OPEN || prev == S_CLOSING))
        call_soon_lost(c, exc); /* (from S_LINGER it is called already) */
    Py_DECREF(c);              /* the epoll set's */
}

static void do_shutdown(Conn *c);

static int queued(Conn *c) { return c->wbuf && c->whead < PyList_GET_SIZE(c->wbuf); }

static void conn_close(Conn *c) {
    if (c->state != S_OPEN)
        return;
    c->state = S_CLOSING;
    if (queued(c))
        unwatch_read(c); /* nothing more reaches the protocol; on_writable goes on */
    else
        do_shutdown(c);
}

/* Everything is written: close_notify, then close or linger (transport.py's docstring). */
static void do_shutdown(Conn *c) {
    /* A protocol in the middle of reading a request (a refused upload) knows more is
     * coming, whatever the socket holds this very moment. Asked first: it is Python, and
     * may close or abort the connection itself. */
    int unread = 0;
    if (c->protocol) {
        PyObject *v = PyObject_GetAttr(c->protocol, s_reading_request);
        if (v == NULL) {
            PyErr_Clear(); /* (no such attribute: nothing unread) */
        } else {
            unread = PyObject_IsTrue(v);
            Py_DECREF(v);
            if (unread < 0) {
                report(c, "edgeproxy: reading_request failed");
                unread = 1;
            }
        }
    }
    if (c->state != S_CLOSING && c->state != S_OPEN)
        return; /* closed meanwhile */
    c->state = S_LINGER; /* (from here on, the protocol has had its connection_lost) */
    call_soon_lost(c, NULL);
    /* close_notify, then one read for the client's, as ssl's shutdown() does: without
     * read-ahead that read shows whether the client sent anything else. */
    ERR_clear_error();
    int r = SSL_shutdown(c->ssl);
    if (r == 0)
        r = SSL_shutdown(c->ssl);
    if (r >= 0) {
        ERR_clear_error();
        close_now(c, NULL); /* its close_notify came too */
        return;
    }
    int err = SSL_get_error(c->ssl, r);
    int e = errno;
    int nothing_more = 0;
    if (err == SSL_ERROR_WANT_READ)
        nothing_more = 1;
    else if (err == SSL_ERROR_SYSCALL)
        nothing_more = e == 0 || e == ECONNRESET || e == EPIPE || e == ECONNABORTED ||
                       e == ESHUTDOWN || e == ECONNREFUSED;
    else if (err == SSL_ERROR_SSL &&
             ERR_GET_REASON(ERR_peek_last_error()) == SSL_R_UNEXPECTED_EOF_WHILE_READING)
        nothing_more = 1;
    ERR_clear_error();
    if (nothing_more && !unread) {
        /* Nothing more from the client, or it has closed: nothing for a reset to destroy. */
        close_now(c, NULL);
        return;
    }
    /* It sent more than we read (a body not read, a pipelined request): linger. */
    if (shutdown(c->fd, SHUT_WR) != 0) {
        close_now(c, NULL);
        return;
    }
    unwatch_write(c);
    cancel(c, &c->send_timer); /* (nothing waits any more) */
    c->timer = call_later(c, LINGER, s_linger_done);
    if (c->timer == NULL) {
        close_now(c, NULL);
        return;
    }
    watch_read(c);
}

static void linger_read(Conn *c) {
    char buf[65536];
    for (;;) {
        ssize_t n = recv(c->fd, buf, sizeof buf, 0);
        if (n > 0)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR))
            return;
        break;
    }
    close_now(c, NULL); /* the client closed (or reset): done */
}

/* --- the handshake ------------------------------------------------------------------------ */

static void handshake(Conn *c) {
    ERR_clear_error();
    int r = SSL_do_handshake(c->ssl);
    if (r != 1) {
        int err = SSL_get_error(c->ssl, r);
        if (err == SSL_ERROR_WANT_READ) {
            unwatch_write(c);
            return;
        }
        if (err == SSL_ERROR_WANT_WRITE) { /* the send buffer is full mid-flight */
            watch_write(c);
            return;
        }
        ERR_clear_error(); /* refused by SNI, a protocol error, a reset */
        c->core->failed++;
        close_now(c, NULL);
        return;
    }
    ERR_clear_error(); /* (cheap insurance: ssl's own reads don't clear it first) */
    deadline_forget(c);
    unwatch_write(c);
    c->state = S_OPEN;
    c->core->ok++;
    PyObject *factory = c->factory;
    c->factory = NULL;
    c->protocol = PyObject_CallNoArgs(factory);
    Py_DECREF(factory);
    if (c->protocol == NULL) {
        report(c, "edgeproxy: the protocol factory failed");
        close_now(c, NULL);
        return;
    }
    PyObject *res = PyObject_CallMethodOneArg(c->protocol, s_connection_made, (PyObject *)c);
    if (res == NULL) {
        report(c, "edgeproxy: connection_made failed");
        close_now(c, NULL);
        return;
    }
    Py_DECREF(res);
    /* No read now: the request is rarely in yet, and the set (level-triggered) reports it
     * as soon as it is. */
}

/* --- reading ------------------------------------------------------------------------------ */

static void on_eof(Conn *c) {
    unwatch_read(c);
    PyObject *res = PyObject_CallMethodNoArgs(c->protocol, s_eof_received);
    if (res == NULL) {
        report(c, "edgeproxy: eof_received failed");
        close_now(c, NULL);
        return;
    }
    int keep_open = PyObject_IsTrue(res);
    Py_DECREF(res);
    if (keep_open < 0)
        report(c, "edgeproxy: eof_received returned a value with no truth");
    if (keep_open != 1) /* (a TLS half-close can't be kept: the protocol may only write) */
        conn_close(c);
}

static void on_readable(Conn *c) {
    if (c->state != S_OPEN) {
        if (c->state == S_HANDSHAKE)
            handshake(c);
        else if (c->state == S_LINGER)
            linger_read(c);
        return;
    }
    char buf[RECORD];
    for (int i = 0; i < READS_PER_EVENT; i++) {
        size_t n = 0;
        ERR_clear_error();
        if (SSL_read_ex(c->ssl, buf, RECORD, &n) != 1) {
            int err = SSL_get_error(c->ssl, 0);
            if (err == SSL_ERROR_WANT_READ)
                return;
            if (err == SSL_ERROR_WANT_WRITE) { /* OpenSSL must answer something first */
                c->read_wants_write = 1;
                watch_write(c);
                return;
            }
            int e = errno;
            if (err == SSL_ERROR_ZERO_RETURN ||
                (err == SSL_ERROR_SYSCALL && (e == 0 || e == ECONNRESET)) ||
                (err == SSL_ERROR_SSL && ERR_GET_REASON(ERR_peek_last_error()) ==
                                             SSL_R_UNEXPECTED_EOF_WHILE_READING)) {
                ERR_clear_error(); /* the client closed (with or without close_notify) */
                on_eof(c);
                return;
            }
            PyObject *exc = ssl_exception(c, err);
            close_now(c, exc);
            Py_XDECREF(exc);
            return;
        }
        PyObject *data = PyBytes_FromStringAndSize(buf, (Py_ssize_t)n);
        if (data == NULL) {
            report(c, "edgeproxy: out of memory reading a record");
            close_now(c, NULL);
            return;
        }
        PyObject *res = PyObject_CallMethodOneArg(c->protocol, s_data_received, data);
        Py_DECREF(data);
        if (res == NULL) {
            report(c, "edgeproxy: data_received failed");
            close_now(c, NULL);
            return;
        }
        Py_DECREF(res);
        if (n < RECORD || !c->reading || c->state != S_OPEN)
            return;
    }
}

/* --- writing ------------------------------------------------------------------------------ */

static int queue(Conn *c, PyObject *bytes) {
    if (!queued(c)) { /* the first to wait: the client has send_timeout to take some */
        c->progress = now();
        if (c->send_timer == NULL)
            c->send_timer = call_later(c, c->core->send_timeout, s_send_check);
    }
    if (c->wbuf == NULL && (c->wbuf = PyList_New(0)) == NULL)
        return -1;
    if (PyList_Append(c->wbuf, bytes) < 0)
        return -1;
    c->wsize += PyBytes_GET_SIZE(bytes);
    if (!c->write_paused && c->wsize > WRITE_HIGH) {
        c->write_paused = 1;
        PyObject *res = PyObject_CallMethodNoArgs(c->protocol, s_pause_writing);
        if (res == NULL) {
            report(c, "edgeproxy: pause_writing failed");
            close_now(c, NULL);
            return 0;
        }
        Py_DECREF(res);
    }
    return 0;
}

static void on_writable(Conn *c) {
    if (c->state == S_HANDSHAKE) {
        handshake(c);
        return;
    }
    while (queued(c)) {
        PyObject *item = PyList_GET_ITEM(c->wbuf, c->whead);
        size_t written = 0;
        ERR_clear_error();
        if (SSL_write_ex(c->ssl, PyBytes_AS_STRING(item), (size_t)PyBytes_GET_SIZE(item),
                         &written) != 1) {
            int err = SSL_get_error(c->ssl, 0);
            if (err == SSL_ERROR_WANT_WRITE || err == SSL_ERROR_WANT_READ) {
                /* What went out is dropped now: a slow reader's queue may never empty
                 * (it is refilled before), and would otherwise keep all it was sent. */
                if (c->whead > 0) {
                    if (PyList_SetSlice(c->wbuf, 0, c->whead, NULL) == 0)
                        c->whead = 0;
                    else
                        PyErr_WriteUnraisable((PyObject *)c);
                }
                return;
            }
            PyObject *exc = ssl_exception(c, err);
            close_now(c, exc);
            Py_XDECREF(exc);
            return;
        }
        c->wsize -= PyBytes_GET_SIZE(item);
        c->whead++;
        c->progress = now();
        if (c->write_paused && c->wsize <= WRITE_LOW) {
            c->write_paused = 0;
            PyObject *res = PyObject_CallMethodNoArgs(c->protocol, s_resume_writing);
            if (res == NULL) {
                report(c, "edgeproxy: resume_writing failed");
                close_now(c, NULL);
                return;
            }
            Py_DECREF(res);
            if (c->state != S_OPEN && c->state != S_CLOSING)
                return;
        }
    }
    if (c->wbuf) {
        if (PyList_SetSlice(c->wbuf, 0, PyList_GET_SIZE(c->wbuf), NULL) == 0)
            c->whead = 0;
        else
            PyErr_WriteUnraisable((PyObject *)c);
    }
    if (c->read_wants_write) {
        c->read_wants_write = 0;
        if (c->reading)
            on_readable(c);
        if (c->read_wants_write || (c->state != S_OPEN && c->state != S_CLOSING))
            return;
        if (queued(c))
            return; /* the protocol wrote more meanwhile: still watched, goes on */
    }
    unwatch_write(c);
    if (c->state == S_CLOSING)
        do_shutdown(c);
}

/* --- the SNI callback --------------------------------------------------------------------- */

/* ssl's keylog callback reads the connection as its own _SSLSocket: a context that has
 * one (keylog_filename) can't serve here, and a handshake that would get it is refused. */
static int refuse(Core *core, PyObject *ctx, int *al) {
    PyErr_Format(PyExc_ValueError,
                 "%R has a keylog_filename: the C connections can't serve with it (set "
                 "EDGEPROXY_PY_TRANSPORT=1 to debug TLS that way)",
                 ctx);
    PyErr_WriteUnraisable(core->select);
    *al = SSL_AD_INTERNAL_ERROR;
    return SSL_TLSEXT_ERR_ALERT_FATAL;
}

static int servername_cb(SSL *s, int *al, void *arg) {
    Conn *c = (Conn *)SSL_get_app_data(s);
    if (c == NULL || Py_TYPE(c) != &ConnType) {
        *al = SSL_AD_INTERNAL_ERROR;
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    Core *core = c->core;
    const char *name = SSL_get_servername(s, TLSEXT_NAMETYPE_host_name);
    PyObject *key;
    if (name == NULL || !*name) {
        key = Py_NewRef(Py_None);
    } else {
        /* Lowercase, without trailing dots; a name longer than DNS allows can't match. */
        char low[256];
        size_t n = strnlen(name, 256);
        while (n && name[n - 1] == '.')
            n--;
        for (size_t i = 0; i < n; i++)
            low[i] = (name[i] >= 'A' && name[i] <= 'Z') ? name[i] + 32 : name[i];
        key = PyUnicode_DecodeLatin1(low, (Py_ssize_t)n, NULL);
    }
    PyObject *r = key ? PyObject_CallOneArg(core->select, key) : NULL;
    if (r == NULL) {
        PyErr_WriteUnraisable(core->select);
        Py_XDECREF(key);
        *al = SSL_AD_INTERNAL_ERROR;
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    if (PyLong_Check(r)) { /* refused: the alert to send */
        long alert = PyLong_AsLong(r);
        if (alert < 0 || alert > 255) {
            PyErr_Clear();
            alert = SSL_AD_INTERNAL_ERROR;
        }
        *al = (int)alert;
        Py_DECREF(r);
        Py_DECREF(key);
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    if (!PyObject_TypeCheck(r, (PyTypeObject *)core->ctx_type)) {
        PyErr_Format(PyExc_TypeError, "select() returned %R, not an SSLContext", r);
        PyErr_WriteUnraisable(core->select);
        Py_DECREF(r);
        Py_DECREF(key);
        *al = SSL_AD_INTERNAL_ERROR;
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    SSL_CTX *chosen = ((PySSLContextHead *)r)->ctx;
    if (SSL_CTX_get_keylog_callback(chosen) != NULL) {
        int refused = refuse(core, r, al);
        Py_DECREF(r);
        Py_DECREF(key);
        return refused;
    }
    if (SSL_set_SSL_CTX(s, chosen) == NULL) {
        ERR_clear_error();
        Py_DECREF(r);
        Py_DECREF(key);
        *al = SSL_AD_INTERNAL_ERROR;
        return SSL_TLSEXT_ERR_ALERT_FATAL;
    }
    Py_XSETREF(c->ctx, r);
    Py_XSETREF(c->sni, key);
    return SSL_TLSEXT_ERR_OK;
}

/* --- a new connection --------------------------------------------------------------------- */

static PyObject *sockaddr_tuple(struct sockaddr_storage *ss) {
    char host[INET6_ADDRSTRLEN];
    if (ss->ss_family == AF_INET) {
        struct sockaddr_in *a = (struct sockaddr_in *)ss;
        inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
        return Py_BuildValue("(si)", host, ntohs(a->sin_port));
    }
    if (ss->ss_family == AF_INET6) {
        struct sockaddr_in6 *a = (struct sockaddr_in6 *)ss;
        inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
        return Py_BuildValue("(siII)", host, ntohs(a->sin6_port), ntohl(a->sin6_flowinfo),
                             a->sin6_scope_id);
    }
    return PyUnicode_FromString("");
}

/* Starts the handshake on `fd` (owned from here on, closed on failure). */
static int start_conn(Core *core, int fd, PyObject *peer, PyObject *factory) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    Conn *c = PyObject_GC_New(Conn, &ConnType);
    if (c == NULL) {
        close(fd);
        return -1;
    }
    c->core = (Core *)Py_NewRef(core);
    c->ssl = NULL;
    c->fd = fd;
    c->state = S_HANDSHAKE;
    c->events = 0;
    c->reading = 1;
    c->write_paused = 0;
    c->read_wants_write = 0;
    c->peer = Py_NewRef(peer);
    c->sni = PyUnicode_FromStringAndSize(NULL, 0);
    c->ctx = NULL;
    c->factory = Py_NewRef(factory);
    c->protocol = NULL;
    c->wbuf = NULL;
    c->whead = c->wsize = 0;
    c->timer = NULL;
    c->send_timer = NULL;
    c->progress = 0;
    c->deadline = 0;
    c->dprev = c->dnext = NULL;
    c->weakreflist = NULL;
    PyObject_GC_Track(c);
    c->ssl = SSL_new(core->base);
    if (c->ssl == NULL || c->sni == NULL) {
        ERR_clear_error();
        c->state = S_CLOSED;
        close(fd);
        c->fd = -1;
        Py_DECREF(c);
        if (!PyErr_Occurred())
            PyErr_NoMemory();
        return -1;
    }
    SSL_set_app_data(c->ssl, c);
    SSL_set_msg_callback(c->ssl, NULL); /* (ssl's would read c as its own _SSLSocket) */
    SSL_set_fd(c->ssl, fd);
    SSL_set_mode(c->ssl, SSL_MODE_ACCEPT_MOVING_WRITE_BUFFER | SSL_MODE_AUTO_RETRY);
    SSL_set_accept_state(c->ssl);
    /* The set's reference (c's own is given to it): released by close_now. The ClientHello
     * is usually not there yet at accept: wait for it, don't try a read. */
    deadline_add(c);
    watch_read(c);
    if (c->events == 0) { /* epoll refused it (out of memory) */
        PyErr_SetFromErrno(PyExc_OSError);
        close_now(c, NULL);
        return -1;
    }
    return 0;
}

static void accept_one(Core *core, int lfd) {
    /* One connection per readiness event, as nginx does by default: the listener stays
     * ready while more wait, and a batch would end in one more accept that fails. */
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int fd = accept4(lfd, (struct sockaddr *)&ss, &len, SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0) {
        int e = errno;
        if (e == EMFILE || e == ENFILE || e == ENOBUFS || e == ENOMEM) {
            PyObject *r = PyObject_CallFunction(core->on_accept_error, "ii", lfd, e);
            Py_XDECREF(r);
            if (r == NULL)
                PyErr_WriteUnraisable(core->on_accept_error);
        }
        return; /* (EAGAIN; ECONNABORTED and the like: that connection is gone) */
    }
    PyObject *peer = sockaddr_tuple(&ss);
    if (peer == NULL) {
        close(fd);
        PyErr_WriteUnraisable((PyObject *)core);
        return;
    }
    if (start_conn(core, fd, peer, core->factory) < 0)
        PyErr_WriteUnraisable((PyObject *)core);
    Py_DECREF(peer);
}

static void expire(Core *core) {
    uint64_t ticks;
    ssize_t unused = read(core->tfd, &ticks, sizeof ticks);
    (void)unused;
    core->armed = 0;
    double t = now() + 0.001;
    while (core->dhead && core->dhead->deadline <= t) {
        Conn *c = core->dhead;
        deadline_forget(c);
        if (c->state == S_HANDSHAKE) {
            Py_INCREF(c);
            core->failed++;
            close_now(c, NULL);
            Py_DECREF(c);
        }
    }
    if (core->dhead)
        arm(core, core->dhead->deadline);
}

/* --- Core: the worker's connections ------------------------------------------------------- */

static PyObject *core_poll(Core *core, PyObject *unused) {
    struct epoll_event ev[MAX_EVENTS];
    int n = epoll_wait(core->epfd, ev, MAX_EVENTS, 0);
    if (n < 0)
        return errno == EINTR ? Py_NewRef(Py_None) : PyErr_SetFromErrno(PyExc_OSError);
    /* A callback may close another connection of this batch: each is held meanwhile. */
    for (int i = 0; i < n; i++)
        if ((ev[i].data.u64 & 3) == 0)
            Py_INCREF((PyObject *)ev[i].data.ptr);
    for (int i = 0; i < n; i++) {
        uint64_t tag = ev[i].data.u64;
        if (tag == TAG_TIMER) {
            expire(core);
            continue;
        }
        if (tag & 1) {
            accept_one(core, (int)(tag >> 2));
            continue;
        }
        Conn *c = (Conn *)ev[i].data.ptr;
        uint32_t e = ev[i].events;
        if (e & (EPOLLERR | EPOLLHUP))
            e |= c->events; /* let whichever side is watched find the error */
        if ((e & EPOLLIN) && (c->events & EPOLLIN) && c->state != S_CLOSED)
            on_readable(c);
        if ((e & EPOLLOUT) && (c->events & EPOLLOUT) && c->state != S_CLOSED)
            on_writable(c);
        Py_DECREF(c);
    }
    if (PyErr_Occurred())
        PyErr_WriteUnraisable((PyObject *)core);
    Py_RETURN_NONE;
}

static PyObject *core_listen(Core *core, PyObject *arg) {
    int fd = _PyLong_AsInt(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_LISTENER(fd)};
    if (epoll_ctl(core->epfd, EPOLL_CTL_ADD, fd, &ev) != 0 && errno != EEXIST)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *core_unlisten(Core *core, PyObject *arg) {
    int fd = _PyLong_AsInt(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    struct epoll_event ev = {0};
    epoll_ctl(core->epfd, EPOLL_CTL_DEL, fd, &ev); /* (not in the set: nothing to do) */
    Py_RETURN_NONE;
}

static PyObject *core_adopt(Core *core, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "adopt(fd, peer, factory)");
        return NULL;
    }
    int fd = _PyLong_AsInt(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (start_conn(core, fd, args[1], args[2]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *core_take_counts(Core *core, PyObject *unused) {
    PyObject *r = Py_BuildValue("(LL)", core->ok, core->failed);
    core->ok = core->failed = 0;
    return r;
}

static PyObject *core_fileno(Core *core, PyObject *unused) { return PyLong_FromLong(core->epfd); }

static PyMethodDef core_methods[] = {
    {"poll", (PyCFunction)core_poll, METH_NOARGS, "Serve what the epoll set reports."},
    {"listen", (PyCFunction)core_listen, METH_O, "Accept on this listening descriptor."},
    {"unlisten", (PyCFunction)core_unlisten, METH_O, "Stop accepting on it."},
    {"adopt", (PyCFunction)(void (*)(void))core_adopt, METH_FASTCALL,
     "adopt(fd, peer, factory): start the handshake on an accepted descriptor (owned)."},
    {"take_counts", (PyCFunction)core_take_counts, METH_NOARGS,
     "(handshakes ok, handshakes failed) since the last call."},
    {"fileno", (PyCFunction)core_fileno, METH_NOARGS, "The epoll set's descriptor."},
    {NULL}};

static int core_init(Core *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"loop",      "base_ctx",          "ctx_type",
                             "factory",   "select",            "on_accept_error",
                             "ssl_error", "handshake_timeout", "send_timeout",
                             NULL};
    PyObject *loop, *base_ctx, *ctx_type, *factory, *select, *on_error, *ssl_error;
    double timeout, send_timeout;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OOOOOOOdd", kwlist, &loop, &base_ctx,
                                     &ctx_type, &factory, &select, &on_error, &ssl_error,
                                     &timeout, &send_timeout))
        return -1;
    if (self->base) {
        PyErr_SetString(PyExc_RuntimeError, "a Core is set up once");
        return -1;
    }
    if (!PyType_Check(ctx_type) || !PyObject_TypeCheck(base_ctx, (PyTypeObject *)ctx_type)) {
        PyErr_SetString(PyExc_TypeError, "base_ctx must be an instance of ctx_type");
        return -1;
    }
    self->epfd = epoll_create1(EPOLL_CLOEXEC);
    self->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (self->epfd < 0 || self->tfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = TAG_TIMER};
    if (epoll_ctl(self->epfd, EPOLL_CTL_ADD, self->tfd, &ev) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->loop = Py_NewRef(loop);
    self->base_ctx = Py_NewRef(base_ctx);
    self->ctx_type = Py_NewRef(ctx_type);
    self->factory = Py_NewRef(factory);
    self->select = Py_NewRef(select);
    self->on_accept_error = Py_NewRef(on_error);
    self->ssl_error = Py_NewRef(ssl_error);
    self->timeout = timeout;
    self->send_timeout = send_timeout;
    SSL_CTX *base = ((PySSLContextHead *)base_ctx)->ctx;
    if (SSL_CTX_get_keylog_callback(base) != NULL) {
        PyErr_SetString(PyExc_ValueError,
                        "the base context has a keylog_filename: the C connections can't "
                        "serve with it (EDGEPROXY_PY_TRANSPORT=1 serves with the Python ones)");
        return -1;
    }
    self->base = base;
    /* This module's SNI callback replaces ssl's on the base context: ssl's expects the
     * connection to be its own _SSLSocket. */
    SSL_CTX_set_tlsext_servername_callback(self->base, servername_cb);
    SSL_CTX_set_tlsext_servername_arg(self->base, NULL); /* (the core is the connection's) */
    return 0;
}

static int core_traverse(Core *self, visitproc visit, void *arg) {
    Py_VISIT(self->loop);
    Py_VISIT(self->base_ctx);
    Py_VISIT(self->ctx_type);
    Py_VISIT(self->factory);
    Py_VISIT(self->select);
    Py_VISIT(self->on_accept_error);
    Py_VISIT(self->ssl_error);
    return 0;
}

static int core_clear(Core *self) {
    if (self->base) {
        SSL_CTX_set_tlsext_servername_callback(self->base, NULL);
        SSL_CTX_set_tlsext_servername_arg(self->base, NULL);
        self->base = NULL;
    }
    Py_CLEAR(self->loop);
    Py_CLEAR(self->base_ctx);
    Py_CLEAR(self->ctx_type);
    Py_CLEAR(self->factory);
    Py_CLEAR(self->select);
    Py_CLEAR(self->on_accept_error);
    Py_CLEAR(self->ssl_error);
    return 0;
}

static void core_dealloc(Core *self) {
    PyObject_GC_UnTrack(self);
    core_clear(self);
    if (self->epfd >= 0)
        close(self->epfd);
    if (self->tfd >= 0)
        close(self->tfd);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *core_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Core *self = (Core *)type->tp_alloc(type, 0);
    if (self) {
        self->epfd = self->tfd = -1;
    }
    return (PyObject *)self;
}

static PyTypeObject CoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeproxy.tls._conn.Core",
    .tp_basicsize = sizeof(Core),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A worker's client connections: Core(loop, base_ctx, ctx_type, factory, "
              "select, on_accept_error, ssl_error, handshake_timeout, send_timeout).",
    .tp_new = core_new,
    .tp_init = (initproc)core_init,
    .tp_dealloc = (destructor)core_dealloc,
    .tp_traverse = (traverseproc)core_traverse,
    .tp_clear = (inquiry)core_clear,
    .tp_methods = core_methods,
};

/* --- Conn: the asyncio transport the protocol sees ---------------------------------------- */

static PyObject *conn_write(Conn *c, PyObject *data) {
    if (c->state != S_OPEN)
        Py_RETURN_NONE; /* (as asyncio's transports: writes after close() are dropped) */
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    if (view.len == 0) {
        PyBuffer_Release(&view);
        Py_RETURN_NONE;
    }
    if (!queued(c)) {
        size_t written = 0;
        ERR_clear_error();
        if (SSL_write_ex(c->ssl, view.buf, (size_t)view.len, &written) == 1) {
            PyBuffer_Release(&view);
            Py_RETURN_NONE;
        }
        int err = SSL_get_error(c->ssl, 0);
        if (err != SSL_ERROR_WANT_WRITE && err != SSL_ERROR_WANT_READ) {
            PyBuffer_Release(&view);
            PyObject *exc = ssl_exception(c, err);
            Py_INCREF(c);
            close_now(c, exc);
            Py_DECREF(c);
            Py_XDECREF(exc);
            Py_RETURN_NONE;
        }
        /* OpenSSL keeps its part: the retry must send the same bytes. */
        watch_write(c);
    }
    PyObject *bytes = PyBytes_CheckExact(data)
                          ? Py_NewRef(data)
                          : PyBytes_FromStringAndSize(view.buf, view.len);
    PyBuffer_Release(&view);
    if (bytes == NULL)
        return NULL;
    int r = queue(c, bytes);
    Py_DECREF(bytes);
    if (r < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *conn_writelines(Conn *c, PyObject *lines) {
    PyObject *empty = PyBytes_FromStringAndSize(NULL, 0);
    if (empty == NULL)
        return NULL;
    PyObject *joined = _PyBytes_Join(empty, lines);
    Py_DECREF(empty);
    if (joined == NULL)
        return NULL;
    PyObject *r = conn_write(c, joined);
    Py_DECREF(joined);
    return r;
}

static PyObject *conn_close_m(Conn *c, PyObject *unused) {
    Py_INCREF(c);
    conn_close(c);
    Py_DECREF(c);
    Py_RETURN_NONE;
}

static PyObject *conn_abort(Conn *c, PyObject *unused) {
    Py_INCREF(c);
    close_now(c, NULL);
    Py_DECREF(c);
    Py_RETURN_NONE;
}

static PyObject *conn_lost(Conn *c, PyObject *exc) {
    PyObject *protocol = c->protocol; /* (it refers back to us: no cycle left) */
    c->protocol = NULL;
    if (protocol == NULL)
        Py_RETURN_NONE;
    PyObject *r = PyObject_CallMethodOneArg(protocol, s_connection_lost, exc);
    Py_DECREF(protocol);
    return r;
}

static PyObject *conn_linger_done(Conn *c, PyObject *unused) {
    Py_CLEAR(c->timer);
    Py_INCREF(c);
    close_now(c, NULL);
    Py_DECREF(c);
    Py_RETURN_NONE;
}

static PyObject *conn_send_check(Conn *c, PyObject *unused) {
    Py_CLEAR(c->send_timer);
    if (!queued(c) || (c->state != S_OPEN && c->state != S_CLOSING))
        Py_RETURN_NONE;
    double timeout = c->core->send_timeout;
    double idle = now() - c->progress;
    if (idle < timeout - 0.001) {
        c->send_timer = call_later(c, timeout - idle, s_send_check);
        Py_RETURN_NONE;
    }
    PyObject *exc = PyObject_CallFunction(PyExc_TimeoutError, "s",
                                          "the client took nothing for send_timeout");
    if (exc == NULL)
        PyErr_Clear();
    Py_INCREF(c);
    close_now(c, exc);
    Py_DECREF(c);
    Py_XDECREF(exc);
    Py_RETURN_NONE;
}

static PyObject *conn_pause_reading(Conn *c, PyObject *unused) {
    if (c->reading) {
        c->reading = 0;
        if (c->state == S_OPEN)
            unwatch_read(c);
    }
    Py_RETURN_NONE;
}

static PyObject *conn_resume_reading(Conn *c, PyObject *unused) {
    if (!c->reading) {
        c->reading = 1;
        if (c->state == S_OPEN)
            watch_read(c);
    }
    Py_RETURN_NONE;
}

static PyObject *conn_is_reading(Conn *c, PyObject *unused) {
    return PyBool_FromLong(c->reading && c->state == S_OPEN);
}

static PyObject *conn_is_closing(Conn *c, PyObject *unused) {
    return PyBool_FromLong(c->state != S_OPEN);
}

static PyObject *conn_get_write_buffer_size(Conn *c, PyObject *unused) {
    return PyLong_FromSsize_t(c->wsize);
}

static PyObject *conn_get_write_buffer_limits(Conn *c, PyObject *unused) {
    return Py_BuildValue("(ii)", WRITE_LOW, WRITE_HIGH);
}

static PyObject *conn_can_write_eof(Conn *c, PyObject *unused) { Py_RETURN_FALSE; }

static PyObject *conn_write_eof(Conn *c, PyObject *unused) {
    PyErr_SetString(PyExc_NotImplementedError, "TLS connections can't half-close");
    return NULL;
}

static PyObject *conn_get_extra_info(Conn *c, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs < 1 || nargs > 2) {
        PyErr_SetString(PyExc_TypeError, "get_extra_info(name, default=None)");
        return NULL;
    }
    PyObject *dflt = nargs == 2 ? args[1] : Py_None;
    if (!PyUnicode_Check(args[0]))
        return Py_NewRef(dflt);
    const char *name = PyUnicode_AsUTF8(args[0]);
    if (name == NULL)
        return NULL;
    if (strcmp(name, "peername") == 0)
        return Py_NewRef(c->peer);
    if (strcmp(name, "sni") == 0)
        return Py_NewRef(c->sni);
    if (strcmp(name, "sslcontext") == 0)
        return Py_NewRef(c->ctx ? c->ctx : c->core->base_ctx);
    if (strcmp(name, "sockname") == 0 && c->fd >= 0) {
        struct sockaddr_storage ss;
        socklen_t len = sizeof ss;
        if (getsockname(c->fd, (struct sockaddr *)&ss, &len) == 0)
            return sockaddr_tuple(&ss);
    }
    if (strcmp(name, "cipher") == 0 && c->ssl) {
        const SSL_CIPHER *cipher = SSL_get_current_cipher(c->ssl);
        if (cipher)
            return Py_BuildValue("(ssi)", SSL_CIPHER_get_name(cipher),
                                 SSL_CIPHER_get_version(cipher),
                                 SSL_CIPHER_get_bits(cipher, NULL));
    }
    return Py_NewRef(dflt);
}

static PyObject *conn_get_protocol(Conn *c, PyObject *unused) {
    return Py_NewRef(c->protocol ? c->protocol : Py_None);
}

static PyObject *conn_set_protocol(Conn *c, PyObject *protocol) {
    Py_XSETREF(c->protocol, Py_NewRef(protocol));
    Py_RETURN_NONE;
}

static PyObject *conn_get_edge_sni(Conn *c, void *closure) { return Py_NewRef(c->sni); }

static PyObject *conn_get_state(Conn *c, void *closure) {
    return PyUnicode_FromString(STATE_NAMES[c->state]);
}

static PyGetSetDef conn_getset[] = {
    {"edge_sni", (getter)conn_get_edge_sni, NULL, "The SNI name (tls/sni.SNI_ATTR).", NULL},
    {"state", (getter)conn_get_state, NULL, "handshake, open, closing, linger or closed.",
     NULL},
    {NULL}};

static PyMethodDef conn_methods[] = {
    {"write", (PyCFunction)conn_write, METH_O, NULL},
    {"writelines", (PyCFunction)conn_writelines, METH_O, NULL},
    {"close", (PyCFunction)conn_close_m, METH_NOARGS, NULL},
    {"abort", (PyCFunction)conn_abort, METH_NOARGS, NULL},
    {"pause_reading", (PyCFunction)conn_pause_reading, METH_NOARGS, NULL},
    {"resume_reading", (PyCFunction)conn_resume_reading, METH_NOARGS, NULL},
    {"is_reading", (PyCFunction)conn_is_reading, METH_NOARGS, NULL},
    {"is_closing", (PyCFunction)conn_is_closing, METH_NOARGS, NULL},
    {"get_write_buffer_size", (PyCFunction)conn_get_write_buffer_size, METH_NOARGS, NULL},
    {"get_write_buffer_limits", (PyCFunction)conn_get_write_buffer_limits, METH_NOARGS, NULL},
    {"can_write_eof", (PyCFunction)conn_can_write_eof, METH_NOARGS, NULL},
    {"write_eof", (PyCFunction)conn_write_eof, METH_NOARGS, NULL},
    {"get_extra_info", (PyCFunction)(void (*)(void))conn_get_extra_info, METH_FASTCALL, NULL},
    {"get_protocol", (PyCFunction)conn_get_protocol, METH_NOARGS, NULL},
    {"set_protocol", (PyCFunction)conn_set_protocol, METH_O, NULL},
    {"_lost", (PyCFunction)conn_lost, METH_O, NULL},
    {"_linger_done", (PyCFunction)conn_linger_done, METH_NOARGS, NULL},
    {"_send_check", (PyCFunction)conn_send_check, METH_NOARGS, NULL},
    {NULL}};

static int conn_traverse(Conn *c, visitproc visit, void *arg) {
    Py_VISIT(c->core);
    Py_VISIT(c->peer);
    Py_VISIT(c->sni);
    Py_VISIT(c->ctx);
    Py_VISIT(c->factory);
    Py_VISIT(c->protocol);
    Py_VISIT(c->wbuf);
    Py_VISIT(c->timer);
    Py_VISIT(c->send_timer);
    return 0;
}

static int conn_clear(Conn *c) {
    Py_CLEAR(c->peer);
    Py_CLEAR(c->sni);
    Py_CLEAR(c->factory);
    Py_CLEAR(c->protocol);
    Py_CLEAR(c->wbuf);
    Py_CLEAR(c->timer);
    Py_CLEAR(c->send_timer);
    return 0;
}

static void conn_dealloc(Conn *c) {
    PyObject_GC_UnTrack(c);
    if (c->weakreflist)
        PyObject_ClearWeakRefs((PyObject *)c);
    /* Only a connection that never got into the set (or has left it) gets here. */
    if (c->ssl)
        SSL_free(c->ssl);
    if (c->fd >= 0)
        close(c->fd);
    conn_clear(c);
    Py_CLEAR(c->ctx);
    Py_CLEAR(c->core);
    PyObject_GC_Del(c);
}

static PyObject *conn_repr(Conn *c) {
    return PyUnicode_FromFormat("<edgeproxy TLS connection fd=%d %s sni=%R>", c->fd,
                                STATE_NAMES[c->state], c->sni ? c->sni : Py_None);
}

static PyTypeObject ConnType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "edgeproxy.tls._conn.TLSConnection",
    .tp_basicsize = sizeof(Conn),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "A client connection: an asyncio transport over TLS (made by Core).",
    .tp_dealloc = (destructor)conn_dealloc,
    .tp_traverse = (traverseproc)conn_traverse,
    .tp_clear = (inquiry)conn_clear,
    .tp_methods = conn_methods,
    .tp_getset = conn_getset,
    .tp_repr = (reprfunc)conn_repr,
    .tp_weaklistoffset = offsetof(Conn, weakreflist),
};

/* --- the module --------------------------------------------------------------------------- */

/* Whether `path` (the loaded _ssl extension) uses the libssl this module is linked to: the
 * SSL objects made here are handed to its contexts' callbacks and back. */
static PyObject *same_libssl(PyObject *module, PyObject *path) {
    const char *p = PyUnicode_AsUTF8(path);
    if (p == NULL)
        return NULL;
    void *h = dlopen(p, RTLD_NOW | RTLD_NOLOAD);
    if (h == NULL)
        Py_RETURN_FALSE;
    void *theirs = dlsym(h, "SSL_new");
    void *theirs_ctx = dlsym(h, "SSL_CTX_new");
    dlclose(h);
    return PyBool_FromLong(theirs == (void *)SSL_new && theirs_ctx == (void *)SSL_CTX_new);
}

static PyObject *openssl_version(PyObject *module, PyObject *unused) {
    return PyLong_FromUnsignedLong(OpenSSL_version_num());
}

/* For the check at import: the SSL_CTX a context holds has the options Python reports. */
static PyObject *ctx_options(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyType_Check(args[1]) ||
        !PyObject_TypeCheck(args[0], (PyTypeObject *)args[1])) {
        PyErr_SetString(PyExc_TypeError, "ctx_options(ctx, ctx_type)");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(
        (unsigned long long)SSL_CTX_get_options(((PySSLContextHead *)args[0])->ctx));
}

static PyMethodDef module_methods[] = {
    {"same_libssl", same_libssl, METH_O, "Whether the extension at this path uses our libssl."},
    {"openssl_version", openssl_version, METH_NOARGS, "OpenSSL_version_num()."},
    {"ctx_options", (PyCFunction)(void (*)(void))ctx_options, METH_FASTCALL,
     "ctx_options(ctx, ctx_type): SSL_CTX_get_options of the SSL_CTX inside ctx."},
    {NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "edgeproxy.tls._conn",
    "Client connections in C (see tls/native.py).", -1, module_methods};

#define INTERN(var, text)                                                                     \
    if ((var = PyUnicode_InternFromString(text)) == NULL)                                     \
        return NULL;

PyMODINIT_FUNC PyInit__conn(void) {
    INTERN(s_data_received, "data_received");
    INTERN(s_connection_made, "connection_made");
    INTERN(s_connection_lost, "connection_lost");
    INTERN(s_eof_received, "eof_received");
    INTERN(s_pause_writing, "pause_writing");
    INTERN(s_resume_writing, "resume_writing");
    INTERN(s_reading_request, "reading_request");
    INTERN(s_call_soon, "call_soon");
    INTERN(s_call_later, "call_later");
    INTERN(s_cancel, "cancel");
    INTERN(s_lost, "_lost");
    INTERN(s_linger_done, "_linger_done");
    INTERN(s_call_exception_handler, "call_exception_handler");
    INTERN(s_send_check, "_send_check");
    if (PyType_Ready(&ConnType) < 0 || PyType_Ready(&CoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "Core", (PyObject *)&CoreType) < 0 ||
        PyModule_AddObjectRef(m, "TLSConnection", (PyObject *)&ConnType) < 0 ||
        PyModule_AddIntConstant(m, "RECORD", RECORD) < 0 ||
        PyModule_AddIntConstant(m, "WRITE_HIGH", WRITE_HIGH) < 0 ||
        PyModule_AddIntConstant(m, "WRITE_LOW", WRITE_LOW) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
