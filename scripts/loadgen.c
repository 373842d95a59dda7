/*
 * loadgen: closed-loop load generator for the memcached text protocol.
 *
 * One thread, epoll, libc and libm only (C99 plus POSIX/Linux calls).
 * scripts/bench compiles it with `cc -O2 -std=c99` into build/bench/.
 *
 *   loadgen --port P [--host H] [--conns N] [--depth D] [--sets S --gets G]
 *           [--mget K] [--keys N] [--zipf EXP] [--value-min A --value-max B]
 *           [--prefill] [--prefill-conns N] [--prefill-depth D]
 *           [--duration SECONDS] [--seed N] [--prefix STR] [--stall SECONDS]
 *
 * Load: N connections; each runs a closed loop of batches: write D requests,
 * read all D replies, repeat. Each request is a set with probability S/(S+G),
 * else a get of K keys ("get k1 ... kK"). Keys are PREFIX<index>, the index
 * uniform over [0, keys) or zipf(EXP) (rank 0 hottest); set values are random
 * bytes (CR and LF included), their size uniform in [value-min, value-max].
 * With --prefill every key is set once first over separate connections
 * (pipelined, not timed, not counted in the figures).
 *
 * Latency of a request: from the moment its batch's first write() was issued
 * to the moment its reply was completely read, in a log-linear histogram
 * (32 sub-buckets per power of two: about 3 % resolution).
 *
 * Handshake on stdin/stdout, so a caller can sample CPU time over exactly the
 * timed phase: after connecting (and prefilling) it prints `ready` and waits
 * for one line (or the end) of stdin; then it runs the timed phase, prints
 * `stop` (after the last batch's replies are in: a batch is never cut short),
 * waits for the end of stdin, and prints one JSON object with the counts and
 * percentiles. With stdin at /dev/null it simply runs. Errors go to stderr,
 * exit status 1 (2 for bad arguments).
 *
 * Counts: ops = gets + sets (a multi-get is one op); keys = keys requested by
 * gets; hits = VALUE blocks received; misses = keys - hits of successful gets;
 * errors = replies that were SERVER_ERROR / CLIENT_ERROR / ERROR, or anything
 * but STORED to a set (an error reply's keys count neither hit nor miss);
 * conn_ops_min/max = the fewest and most ops one connection completed (a
 * server that serves its connections unfairly shows a wide gap).
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include <fcntl.h>

#define MAX_KEY_LEN 250            /* memcached's key limit */
#define READ_CHUNK 65536
#define HIST_SUB_BITS 5            /* 32 sub-buckets per power of two */
#define HIST_SUB (1 << HIST_SUB_BITS)
#define HIST_BUCKETS (64 * HIST_SUB)

/* ---- options --------------------------------------------------------------- */

static struct {
    const char *host;
    const char *port;
    int conns, depth, sets, gets, mget;
    long keys;
    double zipf;
    int value_min, value_max;
    int prefill, prefill_conns, prefill_depth;
    double duration, stall;
    uint64_t seed;
    const char *prefix;
} opt = {"127.0.0.1", NULL, 1, 1, 1, 10, 1, 10000, 0.0, 32, 100, 0, 16, 32, 5.0, 30.0, 1, "key:"};

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fputs("loadgen: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(1);
}

static void usage(const char *why)
{
    fprintf(stderr, "loadgen: %s\n(see the comment at the top of scripts/loadgen.c for the options)\n", why);
    exit(2);
}

static void *xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        die("out of memory (%zu bytes)", n);
    return p;
}

static void *xrealloc(void *old, size_t n)
{
    void *p = realloc(old, n);
    if (!p)
        die("out of memory (%zu bytes)", n);
    return p;
}

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

/* ---- random numbers: splitmix64, and the key distribution ------------------- */

static uint64_t rng_state;

static uint64_t rng_next(void)
{
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

/* uniform in [0, 1) with 53 bits */
static double rng_unit(void)
{
    return (double)(rng_next() >> 11) * (1.0 / 9007199254740992.0);
}

static long rng_below(long n)
{
    long v = (long)(rng_unit() * (double)n);
    return v < n ? v : n - 1;
}

/* zipf: cdf[i] = P(rank <= i), P(rank = i) proportional to 1 / (i + 1)^s */
static double *zipf_cdf;

static void zipf_init(long n, double s)
{
    double total = 0.0;
    long i;
    zipf_cdf = xmalloc((size_t)n * sizeof *zipf_cdf);
    for (i = 0; i < n; i++) {
        total += 1.0 / pow((double)(i + 1), s);
        zipf_cdf[i] = total;
    }
    for (i = 0; i < n; i++)
        zipf_cdf[i] /= total;
}

static long next_key_index(void)
{
    double u;
    long lo = 0, hi;
    if (!zipf_cdf)
        return rng_below(opt.keys);
    /* first rank whose cdf >= u */
    u = rng_unit();
    hi = opt.keys - 1;
    while (lo < hi) {
        long mid = lo + (hi - lo) / 2;
        if (zipf_cdf[mid] >= u)
            hi = mid;
        else
            lo = mid + 1;
    }
    return lo;
}

/* values are slices of a pool of random bytes (CR and LF included on purpose:
 * replies must be parsed by length, never by scanning for line ends) */
static unsigned char *value_pool;
static size_t value_pool_len;

/* ---- latency histogram -------------------------------------------------------- */

static uint64_t hist[HIST_BUCKETS];
static uint64_t hist_count;
static double lat_sum_s, lat_max_s;

static int msb64(uint64_t v) /* index of the highest set bit, v > 0 */
{
    int n = 0;
    while (v >>= 1)
        n++;
    return n;
}

/* values below 32 ns get a bucket each; above, the top 6 bits select one */
static int hist_bucket(uint64_t ns)
{
    int shift;
    if (ns < HIST_SUB)
        return (int)ns;
    shift = msb64(ns) - HIST_SUB_BITS;
    return (shift + 1) * HIST_SUB + (int)((ns >> shift) & (HIST_SUB - 1));
}

/* the middle of a bucket's range, in ns */
static double hist_value(int b)
{
    int shift;
    if (b < HIST_SUB)
        return (double)b;
    shift = b / HIST_SUB - 1;
    return ((double)(HIST_SUB + b % HIST_SUB) + 0.5) * (double)(1ULL << shift);
}

static void hist_add(double seconds)
{
    uint64_t ns = seconds <= 0 ? 0 : (uint64_t)(seconds * 1e9);
    hist[hist_bucket(ns)]++;
    hist_count++;
    lat_sum_s += seconds;
    if (seconds > lat_max_s)
        lat_max_s = seconds;
}

static double hist_quantile_ms(double q)
{
    uint64_t rank, seen = 0;
    int b;
    if (!hist_count)
        return 0.0;
    rank = (uint64_t)ceil(q * (double)hist_count);
    if (rank < 1)
        rank = 1;
    for (b = 0; b < HIST_BUCKETS; b++) {
        seen += hist[b];
        if (seen >= rank)
            return hist_value(b) / 1e6;
    }
    return lat_max_s * 1e3;
}

/* ---- connections ---------------------------------------------------------------- */

typedef struct {
    char *p;
    size_t len, cap, off; /* bytes [off, len) are pending */
} buf_t;

static void buf_reserve(buf_t *b, size_t more)
{
    if (b->len + more > b->cap) {
        b->cap = (b->len + more) * 2;
        b->p = xrealloc(b->p, b->cap);
    }
}

static void buf_append(buf_t *b, const void *data, size_t n)
{
    buf_reserve(b, n);
    memcpy(b->p + b->len, data, n);
    b->len += n;
}

enum { REQ_GET, REQ_SET };
enum { PHASE_PREFILL, PHASE_TIMED };

typedef struct {
    int fd;
    int want_out;      /* EPOLLOUT registered */
    int active;        /* has a batch in flight */
    buf_t out, in;
    /* the requests of the batch in flight, in order; head = next reply */
    unsigned char *kinds;
    int *nkeys;
    int pending, head, cap;
    double batch_start;
    int hits_so_far;   /* VALUE blocks of the get reply being read */
    uint64_t ops;      /* requests completed in the timed phase (fairness) */
} conn_t;

static struct {
    uint64_t ops, gets, keys, hits, misses, sets, errors;
} count;

static int phase;
static long prefill_next;  /* next key index to prefill */
static long prefill_done;
static int epfd;
static double last_progress;

static int connect_to(void)
{
    struct addrinfo hints, *res, *ai;
    int fd = -1, err, one = 1, last_errno = 0;
    memset(&hints, 0, sizeof hints);
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    err = getaddrinfo(opt.host, opt.port, &hints, &res);
    if (err)
        die("cannot resolve %s:%s: %s", opt.host, opt.port, gai_strerror(err));
    for (ai = res; ai; ai = ai->ai_next) {
        fd = socket(ai->ai_family, ai->ai_socktype, ai->ai_protocol);
        if (fd < 0) {
            last_errno = errno;
            continue;
        }
        if (connect(fd, ai->ai_addr, ai->ai_addrlen) == 0)
            break;
        last_errno = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        die("cannot connect to %s:%s: %s", opt.host, opt.port, strerror(last_errno));
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK);
    return fd;
}

static void conn_open(conn_t *c, int depth)
{
    struct epoll_event ev;
    memset(c, 0, sizeof *c);
    c->fd = connect_to();
    c->cap = depth;
    c->kinds = xmalloc((size_t)depth);
    c->nkeys = xmalloc((size_t)depth * sizeof *c->nkeys);
    ev.events = EPOLLIN;
    ev.data.ptr = c;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
}

static void conn_close(conn_t *c)
{
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    free(c->out.p);
    free(c->in.p);
    free(c->kinds);
    free(c->nkeys);
}

static void set_want_out(conn_t *c, int want)
{
    struct epoll_event ev;
    if (c->want_out == want)
        return;
    ev.events = EPOLLIN | (want ? EPOLLOUT : 0);
    ev.data.ptr = c;
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
    c->want_out = want;
}

/* write what is pending; register for EPOLLOUT while some is left */
static void conn_flush(conn_t *c)
{
    while (c->out.off < c->out.len) {
        ssize_t n = write(c->fd, c->out.p + c->out.off, c->out.len - c->out.off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN || errno == EWOULDBLOCK)
                break;
            die("write to %s:%s failed: %s", opt.host, opt.port, strerror(errno));
        }
        c->out.off += (size_t)n;
    }
    if (c->out.off == c->out.len)
        c->out.off = c->out.len = 0;
    set_want_out(c, c->out.len > 0);
}

static void append_key(buf_t *b, long index)
{
    char key[MAX_KEY_LEN + 32];
    int n = snprintf(key, sizeof key, "%s%ld", opt.prefix, index);
    buf_append(b, key, (size_t)n);
}

static void add_set(conn_t *c, long index)
{
    char head[64];
    int size = opt.value_min + (int)rng_below(opt.value_max - opt.value_min + 1);
    size_t at = (size_t)rng_below((long)(value_pool_len - (size_t)size) + 1);
    buf_append(&c->out, "set ", 4);
    append_key(&c->out, index);
    buf_append(&c->out, head, (size_t)snprintf(head, sizeof head, " 0 0 %d\r\n", size));
    buf_append(&c->out, value_pool + at, (size_t)size);
    buf_append(&c->out, "\r\n", 2);
    c->kinds[c->pending] = REQ_SET;
    c->nkeys[c->pending] = 1;
    c->pending++;
}

static void add_get(conn_t *c)
{
    int k;
    buf_append(&c->out, "get", 3);
    for (k = 0; k < opt.mget; k++) {
        buf_append(&c->out, " ", 1);
        append_key(&c->out, next_key_index());
    }
    buf_append(&c->out, "\r\n", 2);
    c->kinds[c->pending] = REQ_GET;
    c->nkeys[c->pending] = opt.mget;
    c->pending++;
}

/* queue the connection's next batch and start writing it; returns 0 when
 * there is nothing more to do in this phase */
static int conn_next_batch(conn_t *c)
{
    int i;
    c->pending = c->head = 0;
    if (phase == PHASE_PREFILL) {
        for (i = 0; i < c->cap && prefill_next < opt.keys; i++)
            add_set(c, prefill_next++);
    } else {
        for (i = 0; i < c->cap; i++) {
            if (rng_below(opt.sets + opt.gets) < opt.sets)
                add_set(c, next_key_index());
            else
                add_get(c);
        }
    }
    c->active = c->pending > 0;
    if (!c->active)
        return 0;
    c->batch_start = now_s();
    conn_flush(c);
    return 1;
}

static void protocol_error(const char *what, const char *line, size_t len)
{
    char shown[81];
    size_t i;
    if (len > 80)
        len = 80;
    for (i = 0; i < len; i++) /* printable copy of the offending bytes */
        shown[i] = (line[i] >= 32 && line[i] < 127) ? line[i] : '?';
    shown[len] = 0;
    die("protocol error from %s:%s: %s: \"%s\"", opt.host, opt.port, what, shown);
}

static int starts_with(const char *line, size_t len, const char *prefix)
{
    size_t n = strlen(prefix);
    return len >= n && memcmp(line, prefix, n) == 0;
}

/* one reply completed: count it (timed phase only) */
static void reply_done(conn_t *c, int is_error, double done_at)
{
    int kind = c->kinds[c->head], nkeys = c->nkeys[c->head];
    c->head++;
    c->hits_so_far = 0;
    last_progress = done_at;
    if (phase == PHASE_PREFILL) {
        if (is_error)
            die("prefill: a set was refused by %s:%s", opt.host, opt.port);
        prefill_done++;
        return;
    }
    count.ops++;
    c->ops++;
    if (kind == REQ_SET)
        count.sets++;
    else {
        count.gets++;
        count.keys += (uint64_t)nkeys;
    }
    if (is_error)
        count.errors++;
    hist_add(done_at - c->batch_start);
}

/*
 * Consume every complete reply in c->in. A get reply is zero or more
 * "VALUE <key> <flags> <bytes> [<cas>]\r\n<data>\r\n" blocks, then "END\r\n";
 * the data is skipped by its length. A VALUE block is consumed (and counted in
 * hits_so_far) as soon as it is whole, so a long multi-get reply arriving in
 * pieces is never scanned twice.
 */
static void conn_parse(conn_t *c)
{
    double t = 0.0;
    while (c->head < c->pending) {
        char *line = c->in.p + c->in.off;
        size_t avail = c->in.len - c->in.off, len;
        char *nl = memchr(line, '\n', avail);
        if (!nl)
            break;
        len = (size_t)(nl - line) + 1;
        if (len < 2 || line[len - 2] != '\r')
            protocol_error("line not ended by CRLF", line, len);
        if (t == 0.0)
            t = now_s();
        if (starts_with(line, len, "SERVER_ERROR") || starts_with(line, len, "CLIENT_ERROR") ||
            (len == 7 && memcmp(line, "ERROR\r\n", 7) == 0)) {
            c->in.off += len;
            reply_done(c, 1, t);
        } else if (c->kinds[c->head] == REQ_SET) {
            int stored = len == 8 && memcmp(line, "STORED\r\n", 8) == 0;
            if (!stored && !starts_with(line, len, "NOT_STORED\r") && !starts_with(line, len, "EXISTS\r") &&
                !starts_with(line, len, "NOT_FOUND\r"))
                protocol_error("unexpected reply to a set", line, len);
            c->in.off += len;
            reply_done(c, !stored, t);
        } else if (len == 5 && memcmp(line, "END\r\n", 5) == 0) {
            int hits = c->hits_so_far, nkeys = c->nkeys[c->head];
            if (hits > nkeys)
                protocol_error("more VALUE blocks than keys requested", line, len);
            c->in.off += len;
            if (phase == PHASE_TIMED) {
                count.hits += (uint64_t)hits;
                count.misses += (uint64_t)(nkeys - hits);
            }
            reply_done(c, 0, t);
        } else if (starts_with(line, len, "VALUE ")) {
            /* the 4th field is the data length */
            char field[32];
            unsigned long size;
            size_t i = 0, f = 0, n;
            for (f = 0; f < 3; f++) {
                while (i < len && line[i] != ' ')
                    i++;
                while (i < len && line[i] == ' ')
                    i++;
            }
            for (n = 0; i < len && line[i] >= '0' && line[i] <= '9' && n < sizeof field - 1; i++)
                field[n++] = line[i];
            field[n] = 0;
            if (!n)
                protocol_error("VALUE line without a length", line, len);
            size = strtoul(field, NULL, 10);
            if (avail < len + size + 2)
                break; /* the data block is not all here yet */
            if (line[len + size] != '\r' || line[len + size + 1] != '\n')
                protocol_error("VALUE data not followed by CRLF", line, len);
            c->in.off += len + size + 2;
            c->hits_so_far++;
        } else {
            protocol_error("unexpected reply to a get", line, len);
        }
    }
    /* keep the unread tail at the front of the buffer */
    if (c->in.off > 0) {
        memmove(c->in.p, c->in.p + c->in.off, c->in.len - c->in.off);
        c->in.len -= c->in.off;
        c->in.off = 0;
    }
}

static void conn_read(conn_t *c)
{
    ssize_t n;
    buf_reserve(&c->in, READ_CHUNK);
    n = read(c->fd, c->in.p + c->in.len, c->in.cap - c->in.len);
    if (n < 0) {
        if (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK)
            return;
        die("read from %s:%s failed: %s", opt.host, opt.port, strerror(errno));
    }
    if (n == 0)
        die("%s:%s closed the connection", opt.host, opt.port);
    c->in.len += (size_t)n;
    conn_parse(c);
}

/* run the phase until every connection is idle; in the timed phase a
 * connection starts no new batch once `until` has passed */
static double run(conn_t *conns, int n, double until)
{
    struct epoll_event events[256];
    int i, active = 0;
    double last_done = now_s();
    last_progress = last_done;
    for (i = 0; i < n; i++)
        active += conn_next_batch(&conns[i]);
    while (active > 0) {
        int ready = epoll_wait(epfd, events, 256, 1000);
        if (ready < 0) {
            if (errno == EINTR)
                continue;
            die("epoll_wait: %s", strerror(errno));
        }
        for (i = 0; i < ready; i++) {
            conn_t *c = events[i].data.ptr;
            if (events[i].events & EPOLLOUT)
                conn_flush(c);
            if (events[i].events & (EPOLLIN | EPOLLERR | EPOLLHUP))
                conn_read(c);
            if (c->active && c->head == c->pending) { /* batch complete */
                last_done = last_progress;
                if (phase == PHASE_TIMED && last_done >= until)
                    c->active = 0;
                else
                    conn_next_batch(c);
                if (!c->active)
                    active--;
            }
        }
        if (now_s() - last_progress > opt.stall)
            die("no reply from %s:%s for %.0f s", opt.host, opt.port, opt.stall);
    }
    return last_done;
}

/* the handshake: read stdin up to a newline (until_eof = 0) or to its end */
static void wait_stdin(int until_eof)
{
    int ch;
    while ((ch = getchar()) != EOF)
        if (ch == '\n' && !until_eof)
            return;
}

/* ---- main ------------------------------------------------------------------------- */

static double parse_number(const char *name, const char *text, double min)
{
    char *end;
    double v = strtod(text, &end);
    if (*text == 0 || *end != 0 || !(v >= min)) {
        char why[160];
        snprintf(why, sizeof why, "%s wants a number >= %g, got \"%s\"", name, min, text);
        usage(why);
    }
    return v;
}

static void parse_args(int argc, char **argv)
{
    int i;
    for (i = 1; i < argc; i++) {
        const char *name = argv[i], *value;
        if (strcmp(name, "--prefill") == 0) {
            opt.prefill = 1;
            continue;
        }
        if (i + 1 >= argc) {
            char why[160];
            snprintf(why, sizeof why, "unknown option or missing value: %s", name);
            usage(why);
        }
        value = argv[++i];
        if (!strcmp(name, "--host")) opt.host = value;
        else if (!strcmp(name, "--port")) opt.port = value;
        else if (!strcmp(name, "--conns")) opt.conns = (int)parse_number(name, value, 1);
        else if (!strcmp(name, "--depth")) opt.depth = (int)parse_number(name, value, 1);
        else if (!strcmp(name, "--sets")) opt.sets = (int)parse_number(name, value, 0);
        else if (!strcmp(name, "--gets")) opt.gets = (int)parse_number(name, value, 0);
        else if (!strcmp(name, "--mget")) opt.mget = (int)parse_number(name, value, 1);
        else if (!strcmp(name, "--keys")) opt.keys = (long)parse_number(name, value, 1);
        else if (!strcmp(name, "--zipf")) opt.zipf = parse_number(name, value, 0);
        else if (!strcmp(name, "--value-min")) opt.value_min = (int)parse_number(name, value, 0);
        else if (!strcmp(name, "--value-max")) opt.value_max = (int)parse_number(name, value, 0);
        else if (!strcmp(name, "--prefill-conns")) opt.prefill_conns = (int)parse_number(name, value, 1);
        else if (!strcmp(name, "--prefill-depth")) opt.prefill_depth = (int)parse_number(name, value, 1);
        else if (!strcmp(name, "--duration")) opt.duration = parse_number(name, value, 0);
        else if (!strcmp(name, "--stall")) opt.stall = parse_number(name, value, 0.1);
        else if (!strcmp(name, "--seed")) opt.seed = (uint64_t)parse_number(name, value, 0);
        else if (!strcmp(name, "--prefix")) opt.prefix = value;
        else {
            char why[160];
            snprintf(why, sizeof why, "unknown option: %s", name);
            usage(why);
        }
    }
    if (!opt.port)
        usage("--port is required");
    if (opt.sets + opt.gets < 1)
        usage("--sets plus --gets must be at least 1");
    if (opt.value_max < opt.value_min)
        usage("--value-max is below --value-min");
    if (strlen(opt.prefix) + 20 > MAX_KEY_LEN)
        usage("--prefix is too long for a memcached key");
}

int main(int argc, char **argv)
{
    conn_t *conns;
    double start, end;
    uint64_t conn_min = UINT64_MAX, conn_max = 0;
    size_t i;
    int c;

    parse_args(argc, argv);
    signal(SIGPIPE, SIG_IGN);
    rng_state = opt.seed;
    if (opt.zipf > 0)
        zipf_init(opt.keys, opt.zipf);
    value_pool_len = (size_t)opt.value_max * 4 + 4096;
    value_pool = xmalloc(value_pool_len);
    for (i = 0; i < value_pool_len; i++)
        value_pool[i] = (unsigned char)(rng_next() >> 56);
    epfd = epoll_create1(0);
    if (epfd < 0)
        die("epoll_create1: %s", strerror(errno));

    /* the measured connections first: a refused connection fails fast */
    conns = xmalloc((size_t)opt.conns * sizeof *conns);
    for (c = 0; c < opt.conns; c++)
        conn_open(&conns[c], opt.depth);

    if (opt.prefill) {
        conn_t *pre = xmalloc((size_t)opt.prefill_conns * sizeof *pre);
        phase = PHASE_PREFILL;
        for (c = 0; c < opt.prefill_conns; c++)
            conn_open(&pre[c], opt.prefill_depth);
        start = now_s();
        end = run(pre, opt.prefill_conns, 0);
        fprintf(stderr, "loadgen: prefilled %ld keys in %.2f s\n", prefill_done, end - start);
        for (c = 0; c < opt.prefill_conns; c++)
            conn_close(&pre[c]);
        free(pre);
    }

    phase = PHASE_TIMED;
    puts("ready");
    fflush(stdout);
    wait_stdin(0);
    start = now_s();
    end = run(conns, opt.conns, start + opt.duration);
    puts("stop");
    fflush(stdout);
    wait_stdin(1);
    for (c = 0; c < opt.conns; c++) {
        conn_min = conns[c].ops < conn_min ? conns[c].ops : conn_min;
        conn_max = conns[c].ops > conn_max ? conns[c].ops : conn_max;
        conn_close(&conns[c]);
    }

    {
        double elapsed = end - start > 0 ? end - start : 1e-9;
        printf("{\"ops\": %llu, \"gets\": %llu, \"keys\": %llu, \"hits\": %llu, \"misses\": %llu, "
               "\"sets\": %llu, \"errors\": %llu, \"prefill_sets\": %ld, \"elapsed_s\": %.6f, "
               "\"ops_per_s\": %.1f, \"keys_per_s\": %.1f, \"p50_ms\": %.4f, \"p90_ms\": %.4f, "
               "\"p99_ms\": %.4f, \"p999_ms\": %.4f, \"mean_ms\": %.4f, \"max_ms\": %.4f, "
               "\"conn_ops_min\": %llu, \"conn_ops_max\": %llu, \"conns\": %d, \"depth\": %d, \"mget\": %d}\n",
               (unsigned long long)count.ops, (unsigned long long)count.gets,
               (unsigned long long)count.keys, (unsigned long long)count.hits,
               (unsigned long long)count.misses, (unsigned long long)count.sets,
               (unsigned long long)count.errors, prefill_done, elapsed, (double)count.ops / elapsed,
               (double)(count.keys + count.sets) / elapsed, hist_quantile_ms(0.50),
               hist_quantile_ms(0.90), hist_quantile_ms(0.99), hist_quantile_ms(0.999),
               hist_count ? lat_sum_s / (double)hist_count * 1e3 : 0.0, lat_max_s * 1e3,
               (unsigned long long)conn_min, (unsigned long long)conn_max, opt.conns, opt.depth, opt.mget);
    }
    return 0;
}
