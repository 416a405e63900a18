/*
 * A CRIU test program: fills a heap with a known pattern and keeps printing
 * a checksum of it, one line per pass:
 *
 *     pass=N sum=HEX bad=K [extra fields] t0=SECONDS t=SECONDS
 *
 * "bad" counts 8-byte words that differ from the pattern, so a wrong page
 * shows up even if the sum happened to match. Modes (argv[2]):
 *
 *   plain     only the passes
 *   fork      each pass is computed by a freshly forked child, which then
 *             scribbles over part of its copy of the heap and exits; the
 *             parent checks its own copy afterwards (copy-on-write must hold)
 *   dontneed  each pass first drops one stretch of the heap with
 *             MADV_DONTNEED, checks that it reads back as zeros
 *             (zero_bad=K), and writes the pattern into it again
 *   tree      before the first pass, forks a zombie (a child that exits and
 *             is never reaped) and a worker that runs plain passes on its
 *             copy of the heap (lines tagged who=worker), with its upper
 *             half rewritten so the two copies differ there and the dump
 *             holds pages of both tasks
 *
 * t0 and t are the wall-clock times (CLOCK_REALTIME: a restored time
 * namespace shifts the monotonic clocks, not this one) when the pass started
 * and when its line was printed.
 * One page in every 16 is left zero, so images hold zero pages too.
 * Usage: heapprog SIZE_MIB MODE [INTERVAL_MS]
 */
#define _GNU_SOURCE
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define PAGE 4096UL

static uint64_t word(uint64_t i)
{
	/* splitmix64 of the word index: incompressible, no zero words */
	uint64_t z = i + 0x9e3779b97f4a7c15ULL;
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
	z ^= z >> 31;
	return z | 1;
}

static uint64_t expect(uint64_t i)
{
	/* one page in 16 is all zero */
	return ((i * 8 / PAGE) % 16 == 7) ? 0 : word(i);
}

static void fill(uint64_t *h, size_t from, size_t to)
{
	for (size_t i = from; i < to; i++)
		h[i] = expect(i);
}

static void check(const uint64_t *h, size_t n, uint64_t *sum, size_t *bad)
{
	uint64_t s = 0;
	size_t b = 0;
	for (size_t i = 0; i < n; i++) {
		uint64_t w = h[i];
		s += w * (2 * i + 1);
		b += w != expect(i);
	}
	*sum = s;
	*bad = b;
}

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_REALTIME, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static double mono(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void sleep_ms(long ms)
{
	struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
	nanosleep(&ts, NULL);
}

/*
 * Sleep between passes in 5 ms steps, and stop early once the process has
 * been restored: the restored time namespace keeps CLOCK_MONOTONIC going
 * from its dump-time value while CLOCK_REALTIME has moved on, so their
 * difference jumps. A dump taken while idle thus yields a pass that starts
 * right after the restore and reads the whole heap through lazy pages.
 */
static void idle(long ms)
{
	double gap = now() - mono();
	for (long waited = 0; waited < ms; waited += 5) {
		sleep_ms(ms - waited < 5 ? ms - waited : 5);
		double d = now() - mono() - gap;
		if (d > 0.05 || d < -0.05)
			return;
	}
}

int main(int argc, char **argv)
{
	if (argc < 3) {
		fprintf(stderr, "usage: %s SIZE_MIB plain|fork|dontneed [INTERVAL_MS]\n", argv[0]);
		return 2;
	}
	size_t size = strtoull(argv[1], NULL, 10) << 20;
	const char *mode = argv[2];
	long interval = argc > 3 ? atol(argv[3]) : 100;
	int forking = !strcmp(mode, "fork"), dropping = !strcmp(mode, "dontneed"), tree = !strcmp(mode, "tree");
	if (!forking && !dropping && !tree && strcmp(mode, "plain")) {
		fprintf(stderr, "unknown mode %s\n", mode);
		return 2;
	}
	uint64_t *h = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (h == MAP_FAILED) {
		perror("mmap");
		return 1;
	}
	size_t n = size / 8;
	fill(h, 0, n);
	setvbuf(stdout, NULL, _IOLBF, 0);
	const char *who = "";
	if (tree) {
		if (fork() == 0)
			_exit(0); /* the zombie: never reaped */
		pid_t w = fork();
		if (w < 0) {
			perror("fork");
			return 1;
		}
		if (w == 0) {
			who = " who=worker";
			/* rewrite the upper half with the same pattern: private copies */
			fill(h, n / 2, n);
		} else {
			who = " who=parent";
		}
	}
	/* the stretch dropped in dontneed mode: 1/8 of the heap from its 3/8 mark */
	size_t drop_from = (n / 8 * 3) & ~(PAGE / 8 - 1), drop_len = (n / 8) & ~(PAGE / 8 - 1);
	for (unsigned long pass = 0;; pass++) {
		uint64_t sum;
		size_t bad;
		double t0 = now();
		if (dropping) {
			size_t zero_bad = 0;
			if (madvise(h + drop_from, drop_len * 8, MADV_DONTNEED)) {
				perror("madvise");
				return 1;
			}
			for (size_t i = drop_from; i < drop_from + drop_len; i++)
				zero_bad += h[i] != 0;
			fill(h, drop_from, drop_from + drop_len);
			check(h, n, &sum, &bad);
			printf("pass=%lu sum=%016" PRIx64 " bad=%zu zero_bad=%zu t0=%.6f t=%.6f\n", pass, sum, bad, zero_bad, t0, now());
		} else if (forking) {
			pid_t c = fork();
			if (c < 0) {
				perror("fork");
				return 1;
			}
			if (c == 0) {
				check(h, n, &sum, &bad);
				printf("pass=%lu sum=%016" PRIx64 " bad=%zu who=child t0=%.6f t=%.6f\n", pass, sum, bad, t0, now());
				memset(h, 0x5a, size / 4); /* must not reach the parent */
				_exit(0);
			}
			int st;
			while (waitpid(c, &st, 0) < 0)
				;
			check(h, n, &sum, &bad);
			printf("pass=%lu sum=%016" PRIx64 " bad=%zu who=parent child_status=%d t0=%.6f t=%.6f\n", pass, sum, bad, st, t0, now());
		} else {
			check(h, n, &sum, &bad);
			printf("pass=%lu sum=%016" PRIx64 " bad=%zu%s t0=%.6f t=%.6f\n", pass, sum, bad, who, t0, now());
		}
		idle(interval);
	}
}
