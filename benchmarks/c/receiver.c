/*
 * The C floor for a remote fill: receive a TCP stream and install it with
 * UFFDIO_COPY, nothing else (no protocol, no checksum, no faults).
 *
 *     creceiver HOST PORT SIZE CHUNK THREADS
 *
 * Maps SIZE bytes of anonymous memory, registers them in a userfaultfd
 * (MISSING mode), connects to HOST:PORT (a sender that streams at least
 * SIZE bytes) and installs each CHUNK received at its place in the mapping.
 * THREADS 1: one thread receives a chunk, then copies it in. THREADS 2: a
 * receiving thread and a copying thread with a ring of 8 chunks between
 * them, the best split two CPUs allow. Prints {"bytes", "seconds"} as JSON,
 * timed from before connect() to the last copy, like the Python receiver.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#define RING 8

static int uffd, sock;
static char *region;
static uint64_t size, chunk;
static char *ring[RING];
static uint64_t filled, copied; /* chunks received / installed */
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;

static void die(const char *what)
{
    fprintf(stderr, "creceiver: %s: %s\n", what, strerror(errno));
    exit(1);
}

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void recv_full(char *buf, uint64_t n)
{
    uint64_t got = 0;
    while (got < n) {
        ssize_t r = recv(sock, buf + got, n - got, 0);
        if (r == 0) {
            errno = EPIPE;
            die("sender closed early");
        }
        if (r < 0) {
            if (errno == EINTR)
                continue;
            die("recv");
        }
        got += (uint64_t)r;
    }
}

static void install(uint64_t off, const char *buf, uint64_t n)
{
    uint64_t done = 0;
    while (done < n) {
        struct uffdio_copy c = {
            .dst = (uint64_t)(uintptr_t)(region + off + done),
            .src = (uint64_t)(uintptr_t)(buf + done),
            .len = n - done,
        };
        if (ioctl(uffd, UFFDIO_COPY, &c) < 0 && c.copy <= 0 && errno != EAGAIN)
            die("UFFDIO_COPY");
        if (c.copy > 0)
            done += (uint64_t)c.copy;
    }
}

static uint64_t len_of(uint64_t k)
{
    uint64_t off = k * chunk;
    return size - off < chunk ? size - off : chunk;
}

static void *copier(void *arg)
{
    (void)arg;
    uint64_t total = (size + chunk - 1) / chunk;
    for (uint64_t k = 0; k < total; k++) {
        pthread_mutex_lock(&mu);
        while (filled <= k)
            pthread_cond_wait(&cv, &mu);
        pthread_mutex_unlock(&mu);
        install(k * chunk, ring[k % RING], len_of(k));
        pthread_mutex_lock(&mu);
        copied = k + 1;
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: creceiver HOST PORT SIZE CHUNK THREADS\n");
        return 2;
    }
    size = strtoull(argv[3], NULL, 0);
    chunk = strtoull(argv[4], NULL, 0);
    int threads = atoi(argv[5]);
    if (!size || !chunk || chunk % 4096 || (threads != 1 && threads != 2)) {
        fprintf(stderr, "creceiver: SIZE > 0, CHUNK a multiple of 4096, THREADS 1 or 2\n");
        return 2;
    }

    region = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (region == MAP_FAILED)
        die("mmap");
    uffd = (int)syscall(SYS_userfaultfd, O_CLOEXEC);
    if (uffd < 0)
        die("userfaultfd");
    struct uffdio_api api = {.api = UFFD_API};
    if (ioctl(uffd, UFFDIO_API, &api) < 0)
        die("UFFDIO_API");
    struct uffdio_register reg = {
        .range = {.start = (uint64_t)(uintptr_t)region, .len = size},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0)
        die("UFFDIO_REGISTER");
    for (int i = 0; i < RING; i++) {
        ring[i] = aligned_alloc(4096, chunk);
        if (!ring[i])
            die("aligned_alloc");
        memset(ring[i], 0, chunk);
    }

    struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons((uint16_t)atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) {
        fprintf(stderr, "creceiver: HOST must be an IPv4 address\n");
        return 2;
    }
    double t0 = now();
    sock = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (sock < 0)
        die("socket");
    if (connect(sock, (struct sockaddr *)&sa, sizeof sa) < 0)
        die("connect");

    uint64_t total = (size + chunk - 1) / chunk;
    if (threads == 1) {
        for (uint64_t k = 0; k < total; k++) {
            recv_full(ring[0], len_of(k));
            install(k * chunk, ring[0], len_of(k));
        }
    } else {
        pthread_t t;
        if (pthread_create(&t, NULL, copier, NULL))
            die("pthread_create");
        for (uint64_t k = 0; k < total; k++) {
            pthread_mutex_lock(&mu);
            while (k >= copied + RING)
                pthread_cond_wait(&cv, &mu);
            pthread_mutex_unlock(&mu);
            recv_full(ring[k % RING], len_of(k));
            pthread_mutex_lock(&mu);
            filled = k + 1;
            pthread_cond_broadcast(&cv);
            pthread_mutex_unlock(&mu);
        }
        pthread_join(t, NULL);
    }
    double dt = now() - t0;
    printf("{\"bytes\": %llu, \"seconds\": %.6f, \"threads\": %d}\n", (unsigned long long)size, dt, threads);
    return 0;
}
