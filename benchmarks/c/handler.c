/*
 * A minimal userfaultfd handler, the C baseline for the core benchmarks.
 *
 *     chandler SOCKET IMAGE
 *
 * Listens on the Unix socket SOCKET and serves one restore at a time from
 * the raw file IMAGE. A restorer registers its range itself (MISSING mode),
 * connects, and sends one request with the uffd attached (SCM_RIGHTS):
 *
 *     struct request { u64 addr, len, offset, chunk; u32 mode, pad; }
 *
 * The handler maps IMAGE (read-only, shared, not populated: as lazypaged
 * does per session), answers a `struct reply` of kind 'A', then
 *
 *   mode 0 (fault):   serves every fault with one 4 KiB UFFDIO_COPY from the
 *                     mapping, until the restorer sends a byte or hangs up;
 *   mode 1 (precopy): installs the whole range with `chunk`-byte UFFDIO_COPY
 *                     ioctls, no faults involved, then unregisters it;
 *
 * and answers a reply of kind 'D' with what it did. Nothing else: no zero
 * pages, no fault-around, no events.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096ull

struct request {
    uint64_t addr, len, offset, chunk;
    uint32_t mode, pad;
};

struct reply {
    uint32_t kind;  /* 'A' or 'D' */
    int32_t err;    /* 0 or an errno */
    uint64_t faults;
    uint64_t bytes;
    uint64_t ns;    /* time inside the serving loop */
};

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int send_reply(int conn, uint32_t kind, int err, uint64_t faults, uint64_t bytes, uint64_t ns)
{
    struct reply r = {.kind = kind, .err = err, .faults = faults, .bytes = bytes, .ns = ns};
    return send(conn, &r, sizeof r, MSG_NOSIGNAL) == (ssize_t)sizeof r ? 0 : -1;
}

static int recv_request(int conn, struct request *req, int *uffd)
{
    char cbuf[CMSG_SPACE(sizeof(int))];
    struct iovec iov = {.iov_base = req, .iov_len = sizeof *req};
    struct msghdr mh = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = cbuf, .msg_controllen = sizeof cbuf};
    ssize_t n = recvmsg(conn, &mh, MSG_CMSG_CLOEXEC | MSG_WAITALL);
    *uffd = -1;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&mh); c; c = CMSG_NXTHDR(&mh, c))
        if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS)
            memcpy(uffd, CMSG_DATA(c), sizeof(int));
    if (n != (ssize_t)sizeof *req || *uffd < 0)
        return -1;
    return 0;
}

/* Serve 4 KiB per fault until the restorer speaks or hangs up. */
static void serve_faults(int conn, int uffd, const struct request *req, const char *src)
{
    struct uffd_msg msgs[64];
    struct pollfd pf[2] = {{.fd = uffd, .events = POLLIN}, {.fd = conn, .events = POLLIN}};
    uint64_t faults = 0, bytes = 0, busy = 0;
    int err = 0;
    for (;;) {
        if (poll(pf, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            err = errno;
            break;
        }
        if (pf[0].revents & POLLIN) {
            ssize_t n = read(uffd, msgs, sizeof msgs);
            if (n < 0 && errno != EAGAIN) {
                err = errno;
                break;
            }
            uint64_t t0 = now_ns();
            for (ssize_t i = 0; i < n / (ssize_t)sizeof msgs[0]; i++) {
                if (msgs[i].event != UFFD_EVENT_PAGEFAULT)
                    continue;
                uint64_t page = msgs[i].arg.pagefault.address & ~(PAGE - 1);
                struct uffdio_copy cp = {
                    .dst = page,
                    .src = (uint64_t)(uintptr_t)(src + req->offset + (page - req->addr)),
                    .len = PAGE,
                };
                faults++;
                if (ioctl(uffd, UFFDIO_COPY, &cp) == 0) {
                    bytes += PAGE;
                } else if (errno == EEXIST) {
                    struct uffdio_range r = {.start = page, .len = PAGE};
                    ioctl(uffd, UFFDIO_WAKE, &r);
                } else {
                    err = errno;
                    goto out;
                }
            }
            busy += now_ns() - t0;
        }
        if (pf[0].revents & (POLLERR | POLLHUP))
            break;
        if (pf[1].revents)
            break;
    }
out:
    send_reply(conn, 'D', err, faults, bytes, busy);
}

/* Install the whole range with chunk-sized UFFDIO_COPY ioctls. */
static void precopy(int conn, int uffd, const struct request *req, const char *src)
{
    uint64_t chunk = req->chunk ? req->chunk : 2ull << 20;
    uint64_t done = 0, ioctls = 0;
    int err = 0;
    uint64_t t0 = now_ns();
    while (done < req->len) {
        uint64_t n = req->len - done < chunk ? req->len - done : chunk;
        struct uffdio_copy cp = {
            .dst = req->addr + done,
            .src = (uint64_t)(uintptr_t)(src + req->offset + done),
            .len = n,
        };
        ioctls++;
        if (ioctl(uffd, UFFDIO_COPY, &cp) == 0) {
            done += n;
        } else if (cp.copy > 0) {
            done += (uint64_t)cp.copy;
        } else if (errno == EEXIST) {
            done += PAGE;
        } else if (errno != EAGAIN) {
            err = errno;
            break;
        }
    }
    uint64_t ns = now_ns() - t0;
    struct uffdio_range r = {.start = req->addr, .len = req->len};
    if (!err && ioctl(uffd, UFFDIO_UNREGISTER, &r))
        err = errno;
    send_reply(conn, 'D', err, ioctls, done, ns);
}

int main(int argc, char **argv)
{
    if (argc != 3) {
        fprintf(stderr, "usage: %s SOCKET IMAGE\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    int img = open(argv[2], O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (img < 0 || fstat(img, &st)) {
        perror(argv[2]);
        return 1;
    }
    int ls = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    struct sockaddr_un sa = {.sun_family = AF_UNIX};
    if (strlen(argv[1]) >= sizeof sa.sun_path) {
        fprintf(stderr, "socket path too long\n");
        return 2;
    }
    strcpy(sa.sun_path, argv[1]);
    unlink(argv[1]);
    if (ls < 0 || bind(ls, (struct sockaddr *)&sa, sizeof sa) || listen(ls, 8)) {
        perror(argv[1]);
        return 1;
    }
    for (;;) {
        int conn = accept4(ls, NULL, NULL, SOCK_CLOEXEC);
        if (conn < 0) {
            if (errno == EINTR)
                continue;
            perror("accept");
            return 1;
        }
        struct request req;
        int uffd;
        if (recv_request(conn, &req, &uffd)) {
            if (uffd >= 0)
                close(uffd);
            close(conn);
            continue;
        }
        if (req.offset + req.len > (uint64_t)st.st_size || req.addr % PAGE || req.len % PAGE) {
            send_reply(conn, 'A', EINVAL, 0, 0, 0);
            close(uffd);
            close(conn);
            continue;
        }
        char *src = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, img, 0);
        if (src == MAP_FAILED) {
            send_reply(conn, 'A', errno, 0, 0, 0);
            close(uffd);
            close(conn);
            continue;
        }
        send_reply(conn, 'A', 0, 0, 0, 0);
        if (req.mode == 1)
            precopy(conn, uffd, &req, src);
        else
            serve_faults(conn, uffd, &req, src);
        munmap(src, (size_t)st.st_size);
        close(uffd);
        close(conn);
    }
}
