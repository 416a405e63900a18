/*
 * The touching side of the core benchmarks, shared by every variant.
 *
 * Loaded with ctypes into the target process (ctypes drops the GIL around
 * each call), so the same machine code touches memory served by lazypaged,
 * by the minimal C handler and by the kernel's own lazy file mapping, and no
 * Python loop runs while anything is timed.
 *
 * A "touch" is a read-modify-write of one byte that leaves the byte as it
 * was (`or $0`): the CPU reports it as a write access, so a page that is
 * not present takes exactly one write fault, and the restored bytes can be
 * checked afterwards.
 *
 * Every timing function returns elapsed nanoseconds (CLOCK_MONOTONIC), or a
 * negative errno.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static inline void touch(char *p)
{
#if defined(__x86_64__) || defined(__i386__)
    __asm__ volatile("orb $0, %0" : "+m"(*p) : : "memory");
#else
    __atomic_fetch_or(p, 0, __ATOMIC_SEQ_CST);
#endif
}

uint64_t bench_now_ns(void)
{
    return now_ns();
}

/* Touch one byte in every `step` bytes of [base, base+len), in order. */
int64_t bench_touch_seq(char *base, size_t len, size_t step)
{
    uint64_t t0 = now_ns();
    for (size_t off = 0; off < len; off += step)
        touch(base + off);
    return (int64_t)(now_ns() - t0);
}

/*
 * Touch page pages[i] (an index, `page` bytes each) for i in [0, n), timing
 * each touch into out_ns[i]; returns the total.
 */
int64_t bench_touch_pages(char *base, const uint32_t *pages, size_t n, size_t page, uint64_t *out_ns)
{
    uint64_t start = now_ns(), prev = start;
    for (size_t i = 0; i < n; i++) {
        touch(base + (size_t)pages[i] * page);
        uint64_t t = now_ns();
        out_ns[i] = t - prev;
        prev = t;
    }
    return (int64_t)(prev - start);
}

/* Time one touch of the byte at p. */
int64_t bench_touch_one(char *p)
{
    uint64_t t0 = now_ns();
    touch(p);
    return (int64_t)(now_ns() - t0);
}

/* Map `len` bytes of private anonymous memory; returns the address or 0. */
void *bench_map_anon(size_t len)
{
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

int bench_unmap(void *p, size_t len)
{
    return munmap(p, len) ? -errno : 0;
}

/*
 * Eager restore: map fresh anonymous memory and pread the file into it in
 * `chunk`-byte reads. *out receives the mapping (caller unmaps).
 */
int64_t bench_eager_pread(int fd, size_t len, size_t chunk, void **out)
{
    uint64_t t0 = now_ns();
    char *dst = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (dst == MAP_FAILED)
        return -errno;
    size_t done = 0;
    while (done < len) {
        size_t n = len - done < chunk ? len - done : chunk;
        ssize_t r = pread(fd, dst + done, n, (off_t)done);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            int e = errno;
            munmap(dst, len);
            return -e;
        }
        if (r == 0) {
            munmap(dst, len);
            return -EIO;
        }
        done += (size_t)r;
    }
    uint64_t t1 = now_ns();
    *out = dst;
    return (int64_t)(t1 - t0);
}

/*
 * The kernel's own lazy restore: mmap(MAP_PRIVATE) the file and write-touch
 * every page, so each page becomes a private copy (as a UFFDIO_COPY'd page
 * is). *out receives the mapping (caller unmaps).
 */
int64_t bench_kernel_lazy(int fd, size_t len, size_t step, void **out)
{
    uint64_t t0 = now_ns();
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    for (size_t off = 0; off < len; off += step)
        touch(p + off);
    uint64_t t1 = now_ns();
    *out = p;
    return (int64_t)(t1 - t0);
}

/*
 * Create a userfaultfd for this process and register [addr, addr+len) in
 * MISSING mode: what a restorer does before handing the fd to a handler
 * that does not register by itself. Returns the fd or a negative errno.
 */
int bench_uffd_register(void *addr, size_t len)
{
    int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
    if (fd < 0) {
        int e = errno;
        int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
        if (dev < 0)
            return -e;
        fd = ioctl(dev, USERFAULTFD_IOC_NEW, O_CLOEXEC | O_NONBLOCK);
        e = errno;
        close(dev);
        if (fd < 0)
            return -e;
    }
    struct uffdio_api api = {.api = UFFD_API, .features = 0};
    if (ioctl(fd, UFFDIO_API, &api)) {
        int e = errno;
        close(fd);
        return -e;
    }
    struct uffdio_register reg = {
        .range = {.start = (uint64_t)(uintptr_t)addr, .len = len},
        .mode = UFFDIO_REGISTER_MODE_MISSING,
    };
    if (ioctl(fd, UFFDIO_REGISTER, &reg)) {
        int e = errno;
        close(fd);
        return -e;
    }
    return fd;
}

/* Fraction (in 1/1e6) of the file's first `len` bytes resident in the page cache. */
int64_t bench_cached_ppm(int fd, size_t len)
{
    long page = sysconf(_SC_PAGESIZE);
    void *p = mmap(NULL, len, PROT_READ, MAP_SHARED, fd, 0);
    if (p == MAP_FAILED)
        return -errno;
    size_t n = (len + (size_t)page - 1) / (size_t)page;
    unsigned char *vec = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (vec == MAP_FAILED) {
        int e = errno;
        munmap(p, len);
        return -e;
    }
    int64_t r;
    if (mincore(p, len, vec)) {
        r = -errno;
    } else {
        size_t in = 0;
        for (size_t i = 0; i < n; i++)
            in += vec[i] & 1;
        r = n ? (int64_t)(in * 1000000ull / n) : 1000000;
    }
    munmap(vec, n);
    munmap(p, len);
    return r;
}

/* Fill [p, p+len) with pseudo-random bytes (xorshift64*, seeded): image data. */
void bench_fill_random(void *p, size_t len, uint64_t seed)
{
    uint64_t x = seed * 0x9E3779B97F4A7C15ull + 1;
    uint64_t *w = p;
    for (size_t i = 0; i < len / 8; i++) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        w[i] = x * 0x2545F4914F6CDD1Dull;
    }
    unsigned char *tail = (unsigned char *)p + len / 8 * 8;
    for (size_t i = 0; i < len % 8; i++)
        tail[i] = (unsigned char)(x >> (8 * i));
}

/*
 * A workload in the shape of a function invocation: touch pages pages[i]
 * (an index, `page` bytes each) for i in [0, n) in that order, and between
 * touches run `spin` rounds of dependent integer arithmetic (the "compute"
 * of the handler). Returns the elapsed nanoseconds; *sink receives the
 * arithmetic's result so the compiler cannot drop it.
 */
int64_t bench_touch_compute(char *base, const uint32_t *pages, size_t n, size_t page, unsigned spin, uint64_t *sink)
{
    uint64_t x = 0x9E3779B97F4A7C15ull;
    uint64_t t0 = now_ns();
    for (size_t i = 0; i < n; i++) {
        char *p = base + (size_t)pages[i] * page;
        touch(p);
        x ^= (uint64_t)(unsigned char)*p;
        for (unsigned k = 0; k < spin; k++) {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x *= 0x2545F4914F6CDD1Dull;
        }
    }
    uint64_t t1 = now_ns();
    *sink = x;
    return (int64_t)(t1 - t0);
}
