/*
 * A minimal lazypaged restorer in C, written from docs/handoff.md alone.
 *
 * It maps anonymous private memory, creates a userfaultfd for it, hands the
 * uffd to the daemon with a restore request, then reads every byte of the
 * memory (each first touch of a page is a fault the daemon serves) and
 * compares it with the image file, and finally waits for the daemon to say
 * the whole image is in.
 *
 *   cc -O2 -Wall -o handoff_client handoff_client.c
 *   ./handoff_client -s /run/lazypaged/handoff.sock -n app.img /var/lib/lazypaged/snapshots/app.img
 *
 * Options:
 *   -s PATH   handoff socket (default /run/lazypaged/handoff.sock)
 *   -n NAME   snapshot name as the daemon knows it (default: the image's file name)
 *   -o OFF    offset in the snapshot (default 0)
 *   -l LEN    bytes to restore (default: the rest of the image from OFF)
 *   -r N      hand the memory over as N ranges (default 1)
 *   -e MASK   uffd features to enable with UFFDIO_API and report (default 0)
 *   -F        ask the daemon not to fill in the background (options.fill = false)
 *   -A        ask for no fault-around (options.fault_around = false)
 *   -K        do not keep a copy of the uffd (keeps_uffd = false)
 *   -t SEC    seconds to wait for each reply (default 60)
 *
 * Exit status: 0 every byte matched and the restore completed; 1 a local
 * error (system call, bad arguments, broken reply); 2 the daemon refused the
 * request ("error"); 3 the restore failed ("failed") or the daemon went away;
 * 4 a byte did not match the image.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/userfaultfd.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

#ifndef SYS_userfaultfd
#define SYS_userfaultfd 323 /* x86_64 */
#endif
#ifndef USERFAULTFD_IOC_NEW
#define USERFAULTFD_IOC_NEW _IO(0xAA, 0x00)
#endif

#define MAX_FRAME (1u << 20)
#define MAX_RANGES 4096

static void die(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	fputs("handoff_client: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(1);
}

/* ---- msgpack writer: just the types a restore request needs ------------- */

struct buf {
	uint8_t *p;
	size_t len, cap;
};

static void put(struct buf *b, const void *data, size_t n)
{
	if (b->len + n > b->cap) {
		b->cap = (b->len + n) * 2;
		b->p = realloc(b->p, b->cap);
		if (!b->p)
			die("out of memory");
	}
	memcpy(b->p + b->len, data, n);
	b->len += n;
}

static void put_byte(struct buf *b, uint8_t v) { put(b, &v, 1); }

static void put_be(struct buf *b, uint64_t v, int bytes)
{
	for (int i = bytes - 1; i >= 0; i--)
		put_byte(b, (uint8_t)(v >> (8 * i)));
}

static void put_map(struct buf *b, uint32_t n)
{
	if (n < 16) {
		put_byte(b, 0x80 | n);
	} else {
		put_byte(b, 0xde);
		put_be(b, n, 2);
	}
}

static void put_array(struct buf *b, uint32_t n)
{
	if (n < 16) {
		put_byte(b, 0x90 | n);
	} else {
		put_byte(b, 0xdc);
		put_be(b, n, 2);
	}
}

static void put_str(struct buf *b, const char *s)
{
	size_t n = strlen(s);
	if (n < 32) {
		put_byte(b, 0xa0 | (uint8_t)n);
	} else if (n < 256) {
		put_byte(b, 0xd9);
		put_be(b, n, 1);
	} else {
		put_byte(b, 0xda);
		put_be(b, n, 2);
	}
	put(b, s, n);
}

/* Every integer as uint64 (0xcf): longer than needed, and valid msgpack. */
static void put_uint(struct buf *b, uint64_t v)
{
	put_byte(b, 0xcf);
	put_be(b, v, 8);
}

static void put_bool(struct buf *b, int v) { put_byte(b, v ? 0xc3 : 0xc2); }

/* ---- msgpack reader: enough to decode the daemon's replies --------------- */

struct rd {
	const uint8_t *p, *end;
	int bad;
};

static uint64_t get_be(struct rd *r, int bytes)
{
	uint64_t v = 0;
	if (r->end - r->p < bytes) {
		r->bad = 1;
		return 0;
	}
	for (int i = 0; i < bytes; i++)
		v = (v << 8) | *r->p++;
	return v;
}

enum kind { K_NIL, K_BOOL, K_UINT, K_INT, K_FLOAT, K_STR, K_BIN, K_ARRAY, K_MAP, K_EXT, K_BAD };

struct val {
	enum kind kind;
	uint64_t u; /* K_UINT / K_BOOL; a length for K_STR / K_BIN / K_ARRAY / K_MAP / K_EXT */
	int64_t i;
	double f;
	const uint8_t *s; /* K_STR / K_BIN bytes */
};

/* Read one value's header (and scalar payload); containers leave their items. */
static struct val get(struct rd *r)
{
	struct val v = {K_BAD, 0, 0, 0, NULL};
	if (r->p >= r->end) {
		r->bad = 1;
		return v;
	}
	uint8_t t = *r->p++;
	uint32_t n;
	if (t <= 0x7f) {
		v.kind = K_UINT, v.u = t;
	} else if (t >= 0xe0) {
		v.kind = K_INT, v.i = (int8_t)t;
	} else if ((t & 0xf0) == 0x80) {
		v.kind = K_MAP, v.u = t & 0x0f;
	} else if ((t & 0xf0) == 0x90) {
		v.kind = K_ARRAY, v.u = t & 0x0f;
	} else if ((t & 0xe0) == 0xa0) {
		n = t & 0x1f;
		goto str;
	} else {
		switch (t) {
		case 0xc0: v.kind = K_NIL; break;
		case 0xc2: v.kind = K_BOOL, v.u = 0; break;
		case 0xc3: v.kind = K_BOOL, v.u = 1; break;
		case 0xcc: v.kind = K_UINT, v.u = get_be(r, 1); break;
		case 0xcd: v.kind = K_UINT, v.u = get_be(r, 2); break;
		case 0xce: v.kind = K_UINT, v.u = get_be(r, 4); break;
		case 0xcf: v.kind = K_UINT, v.u = get_be(r, 8); break;
		case 0xd0: v.kind = K_INT, v.i = (int8_t)get_be(r, 1); break;
		case 0xd1: v.kind = K_INT, v.i = (int16_t)get_be(r, 2); break;
		case 0xd2: v.kind = K_INT, v.i = (int32_t)get_be(r, 4); break;
		case 0xd3: v.kind = K_INT, v.i = (int64_t)get_be(r, 8); break;
		case 0xca: {
			uint32_t w = (uint32_t)get_be(r, 4);
			float f;
			memcpy(&f, &w, 4);
			v.kind = K_FLOAT, v.f = f;
			break;
		}
		case 0xcb: {
			uint64_t w = get_be(r, 8);
			memcpy(&v.f, &w, 8);
			v.kind = K_FLOAT;
			break;
		}
		case 0xd9: n = (uint32_t)get_be(r, 1); goto str;
		case 0xda: n = (uint32_t)get_be(r, 2); goto str;
		case 0xdb: n = (uint32_t)get_be(r, 4); goto str;
		case 0xc4: case 0xc5: case 0xc6:
			n = (uint32_t)get_be(r, t == 0xc4 ? 1 : t == 0xc5 ? 2 : 4);
			v.kind = K_BIN;
			goto bytes;
		case 0xdc: v.kind = K_ARRAY, v.u = get_be(r, 2); break;
		case 0xdd: v.kind = K_ARRAY, v.u = get_be(r, 4); break;
		case 0xde: v.kind = K_MAP, v.u = get_be(r, 2); break;
		case 0xdf: v.kind = K_MAP, v.u = get_be(r, 4); break;
		case 0xd4: case 0xd5: case 0xd6: case 0xd7: case 0xd8:
			n = 1u << (t - 0xd4); /* fixext: type byte + 1..16 bytes */
			n += 1;
			v.kind = K_EXT;
			goto bytes;
		case 0xc7: case 0xc8: case 0xc9:
			n = (uint32_t)get_be(r, t == 0xc7 ? 1 : t == 0xc8 ? 2 : 4) + 1;
			v.kind = K_EXT;
			goto bytes;
		default: r->bad = 1; break; /* 0xc1 is never used */
		}
	}
	return v;
str:
	v.kind = K_STR;
bytes:
	if (r->bad || (uint64_t)(r->end - r->p) < n) {
		r->bad = 1;
		v.kind = K_BAD;
		return v;
	}
	v.s = r->p, v.u = n;
	r->p += n;
	return v;
}

/* Skip a value whose header was just read (the items of a container). */
static void skip_items(struct rd *r, struct val v, int depth)
{
	if (depth > 64) {
		r->bad = 1;
		return;
	}
	uint64_t items = v.kind == K_ARRAY ? v.u : v.kind == K_MAP ? 2 * v.u : 0;
	for (uint64_t k = 0; k < items && !r->bad; k++)
		skip_items(r, get(r), depth + 1);
}

struct reply {
	char type[32], session[128], code[128], message[1024];
	uint64_t pages, bytes_copied, bytes_zero, faults;
	double seconds;
	int64_t version;
};

static int key_is(struct val k, const char *name)
{
	return k.kind == K_STR && k.u == strlen(name) && memcmp(k.s, name, k.u) == 0;
}

static void copy_str(char *dst, size_t cap, struct val v)
{
	size_t n = v.kind == K_STR ? (v.u < cap - 1 ? v.u : cap - 1) : 0;
	memcpy(dst, v.s, n);
	dst[n] = 0;
}

static int decode_reply(const uint8_t *body, size_t len, struct reply *out)
{
	struct rd r = {body, body + len, 0};
	memset(out, 0, sizeof *out);
	out->version = -1;
	struct val m = get(&r);
	if (m.kind != K_MAP)
		return -1;
	for (uint64_t k = 0; k < m.u && !r.bad; k++) {
		struct val key = get(&r), v = get(&r);
		if (r.bad)
			break;
		if (key_is(key, "v") && v.kind == K_UINT)
			out->version = (int64_t)v.u;
		else if (key_is(key, "type"))
			copy_str(out->type, sizeof out->type, v);
		else if (key_is(key, "session"))
			copy_str(out->session, sizeof out->session, v);
		else if (key_is(key, "code"))
			copy_str(out->code, sizeof out->code, v);
		else if (key_is(key, "message"))
			copy_str(out->message, sizeof out->message, v);
		else if (key_is(key, "pages") && v.kind == K_UINT)
			out->pages = v.u;
		else if (key_is(key, "bytes_copied") && v.kind == K_UINT)
			out->bytes_copied = v.u;
		else if (key_is(key, "bytes_zero") && v.kind == K_UINT)
			out->bytes_zero = v.u;
		else if (key_is(key, "faults") && v.kind == K_UINT)
			out->faults = v.u;
		else if (key_is(key, "seconds"))
			out->seconds = v.kind == K_FLOAT ? v.f : v.kind == K_UINT ? (double)v.u : 0;
		else
			skip_items(&r, v, 0); /* unknown keys are ignored */
	}
	if (r.bad || r.p != r.end || out->version != 1 || !out->type[0])
		return -1;
	return 0;
}

/* ---- socket I/O ----------------------------------------------------------- */

/* Read exactly n bytes; 0 on success, 1 on end of stream, -1 on error. */
static int read_full(int fd, void *dst, size_t n)
{
	uint8_t *p = dst;
	while (n) {
		ssize_t got = read(fd, p, n);
		if (got < 0 && errno == EINTR)
			continue;
		if (got < 0)
			return -1;
		if (got == 0)
			return 1;
		p += got, n -= (size_t)got;
	}
	return 0;
}

/* Read one frame and decode it; returns like read_full, -2 for a bad frame. */
static int read_reply(int sock, struct reply *out)
{
	uint8_t hdr[4];
	int rc = read_full(sock, hdr, 4);
	if (rc)
		return rc;
	uint32_t n = (uint32_t)hdr[0] << 24 | (uint32_t)hdr[1] << 16 | (uint32_t)hdr[2] << 8 | hdr[3];
	if (n == 0 || n > MAX_FRAME)
		return -2;
	uint8_t *body = malloc(n);
	if (!body)
		die("out of memory");
	rc = read_full(sock, body, n);
	if (rc == 0 && decode_reply(body, n, out))
		rc = -2;
	free(body);
	return rc;
}

/* Send the frame with the uffd attached to its first byte, the rest plain. */
static void send_with_fd(int sock, const uint8_t *frame, size_t len, int fd)
{
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} ctl;
	memset(&ctl, 0, sizeof ctl);
	struct iovec iov = {(void *)frame, len};
	struct msghdr msg = {0};
	msg.msg_iov = &iov;
	msg.msg_iovlen = 1;
	msg.msg_control = ctl.buf;
	msg.msg_controllen = sizeof ctl.buf;
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	c->cmsg_level = SOL_SOCKET;
	c->cmsg_type = SCM_RIGHTS;
	c->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(c), &fd, sizeof(int));
	ssize_t sent;
	do
		sent = sendmsg(sock, &msg, MSG_NOSIGNAL);
	while (sent < 0 && errno == EINTR);
	if (sent < 0)
		die("sendmsg: %s", strerror(errno));
	/* A short write: the descriptor went with byte 0; never attach it twice. */
	for (size_t off = (size_t)sent; off < len;) {
		ssize_t n = send(sock, frame + off, len - off, MSG_NOSIGNAL);
		if (n < 0 && errno == EINTR)
			continue;
		if (n < 0)
			die("send: %s", strerror(errno));
		off += (size_t)n;
	}
}

static int create_uffd(void)
{
	int flags = O_CLOEXEC | O_NONBLOCK;
	int fd = (int)syscall(SYS_userfaultfd, flags);
	if (fd < 0 && (errno == EPERM || errno == ENOSYS)) {
		int dev = open("/dev/userfaultfd", O_RDWR | O_CLOEXEC);
		if (dev >= 0) {
			fd = ioctl(dev, USERFAULTFD_IOC_NEW, flags);
			close(dev);
		}
	}
	return fd;
}

int main(int argc, char **argv)
{
	const char *sock_path = "/run/lazypaged/handoff.sock", *name = NULL;
	uint64_t offset = 0, length = 0, features = 0;
	unsigned nranges = 1;
	int no_fill = 0, no_fault_around = 0, keep = 1, timeout = 60, opt;
	while ((opt = getopt(argc, argv, "s:n:o:l:r:e:FAKt:")) != -1) {
		switch (opt) {
		case 's': sock_path = optarg; break;
		case 'n': name = optarg; break;
		case 'o': offset = strtoull(optarg, NULL, 0); break;
		case 'l': length = strtoull(optarg, NULL, 0); break;
		case 'r': nranges = (unsigned)strtoul(optarg, NULL, 0); break;
		case 'e': features = strtoull(optarg, NULL, 0); break;
		case 'F': no_fill = 1; break;
		case 'A': no_fault_around = 1; break;
		case 'K': keep = 0; break;
		case 't': timeout = atoi(optarg); break;
		default: die("usage: %s [-s socket] [-n name] [-o off] [-l len] [-r n] [-e mask] [-F] [-A] [-K] [-t sec] image", argv[0]);
		}
	}
	if (optind != argc - 1)
		die("expected one image file argument");
	const char *image = argv[optind];
	if (!name) {
		name = strrchr(image, '/');
		name = name ? name + 1 : image;
	}

	/* The expected contents, read the ordinary way. */
	int img = open(image, O_RDONLY | O_CLOEXEC);
	if (img < 0)
		die("%s: %s", image, strerror(errno));
	struct stat st;
	if (fstat(img, &st))
		die("fstat: %s", strerror(errno));
	if (!length)
		length = (uint64_t)st.st_size > offset ? (uint64_t)st.st_size - offset : 0;
	long page = sysconf(_SC_PAGESIZE);
	if (!length || length % (uint64_t)page || offset % (uint64_t)page)
		die("offset and length must be page-aligned and the length non-zero");
	if (nranges < 1 || nranges > MAX_RANGES || (length / (uint64_t)page) % nranges)
		die("cannot split %" PRIu64 " pages into %u ranges", length / (uint64_t)page, nranges);
	uint8_t *expected = malloc(length);
	if (!expected)
		die("out of memory");
	for (uint64_t got = 0; got < length;) {
		ssize_t n = pread(img, expected + got, length - got, (off_t)(offset + got));
		if (n <= 0)
			die("%s: short read at %" PRIu64, image, offset + got);
		got += (uint64_t)n;
	}
	close(img);

	/* 1. Map the memory and leave it untouched. */
	uint8_t *mem = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (mem == MAP_FAILED)
		die("mmap: %s", strerror(errno));

	/* 2. Create the uffd; 3. UFFDIO_API with the features we want. No register. */
	int uffd = create_uffd();
	if (uffd < 0)
		die("userfaultfd: %s", strerror(errno));
	struct uffdio_api api = {.api = UFFD_API, .features = features};
	if (ioctl(uffd, UFFDIO_API, &api))
		die("UFFDIO_API (features %#" PRIx64 "): %s", features, strerror(errno));

	/* 4. Connect. */
	int sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		die("socket: %s", strerror(errno));
	struct sockaddr_un addr = {.sun_family = AF_UNIX};
	if (strlen(sock_path) >= sizeof addr.sun_path)
		die("socket path too long");
	strcpy(addr.sun_path, sock_path);
	if (connect(sock, (struct sockaddr *)&addr, sizeof addr))
		die("connect %s: %s", sock_path, strerror(errno));
	struct timeval tv = {.tv_sec = timeout};
	setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);

	/* 5. The request: {"v", "type", "features", "keeps_uffd", "ranges", ["options"]}. */
	struct buf b = {0};
	put_be(&b, 0, 4); /* length, patched below */
	int with_opts = no_fill || no_fault_around;
	put_map(&b, 5 + (with_opts ? 1 : 0));
	put_str(&b, "v");
	put_uint(&b, 1);
	put_str(&b, "type");
	put_str(&b, "restore");
	put_str(&b, "features");
	put_uint(&b, features);
	put_str(&b, "keeps_uffd");
	put_bool(&b, keep);
	put_str(&b, "ranges");
	put_array(&b, nranges);
	uint64_t part = length / nranges;
	for (unsigned i = 0; i < nranges; i++) {
		put_map(&b, 4);
		put_str(&b, "start");
		put_uint(&b, (uint64_t)(uintptr_t)mem + i * part);
		put_str(&b, "length");
		put_uint(&b, part);
		put_str(&b, "source");
		put_str(&b, name);
		put_str(&b, "offset");
		put_uint(&b, offset + i * part);
	}
	if (with_opts) {
		put_str(&b, "options");
		put_map(&b, (uint32_t)(no_fill + no_fault_around));
		if (no_fill) {
			put_str(&b, "fill");
			put_bool(&b, 0);
		}
		if (no_fault_around) {
			put_str(&b, "fault_around");
			put_bool(&b, 0);
		}
	}
	uint32_t body_len = (uint32_t)(b.len - 4);
	for (int i = 0; i < 4; i++)
		b.p[i] = (uint8_t)(body_len >> (8 * (3 - i)));
	send_with_fd(sock, b.p, b.len, uffd);
	free(b.p);

	/* 6. accepted or error. */
	int status = 1;
	struct reply rep;
	int rc = read_reply(sock, &rep);
	if (rc == 1)
		die("the daemon closed the connection without a reply");
	if (rc)
		die("bad reply (%s)", rc == -2 ? "not a valid frame" : strerror(errno));
	if (!strcmp(rep.type, "error")) {
		/* Refused: the memory is as before; the uffd is still ours to close. */
		fprintf(stderr, "error %s: %s\n", rep.code, rep.message);
		status = 2;
		goto out;
	}
	if (strcmp(rep.type, "accepted"))
		die("unexpected reply type %s", rep.type);
	printf("accepted %s\n", rep.session);
	fflush(stdout);
	if (!keep) {
		close(uffd);
		uffd = -1;
	}

	/* 7. Touch every byte: each first touch of a page is served by the daemon. */
	for (uint64_t off = 0; off < length; off += (uint64_t)page) {
		if (memcmp(mem + off, expected + off, (size_t)page)) {
			uint64_t k = off;
			while (mem[k] == expected[k])
				k++;
			fprintf(stderr, "mismatch at byte %" PRIu64 ": %#x, image has %#x\n", k, mem[k], expected[k]);
			status = 4;
			goto out;
		}
	}
	printf("verified %" PRIu64 " bytes\n", length);
	fflush(stdout);

	/* 8. complete or failed. */
	rc = read_reply(sock, &rep);
	if (rc == 1) {
		/* The daemon died. Our uffd copy keeps untouched pages blocked, never zero. */
		fprintf(stderr, "the daemon closed the connection before the restore completed\n");
		status = 3;
	} else if (rc) {
		fprintf(stderr, "bad reply (%s)\n", rc == -2 ? "not a valid frame" : strerror(errno));
	} else if (!strcmp(rep.type, "failed")) {
		fprintf(stderr, "failed %s: %s\n", rep.code, rep.message);
		status = 3;
	} else if (strcmp(rep.type, "complete")) {
		fprintf(stderr, "unexpected reply type %s\n", rep.type);
	} else {
		printf("complete %s pages=%" PRIu64 " bytes_copied=%" PRIu64 " bytes_zero=%" PRIu64 " faults=%" PRIu64
		       " seconds=%.3f\n",
		       rep.session, rep.pages, rep.bytes_copied, rep.bytes_zero, rep.faults, rep.seconds);
		status = 0;
	}
out:
	if (uffd >= 0)
		close(uffd);
	close(sock);
	munmap(mem, length);
	free(expected);
	return status;
}
