/* SPDX-License-Identifier: Apache-2.0 */
/*
 * workload.c - the benchmark's traffic, in C so the client adds as little
 * noise as possible. One binary, several modes:
 *
 *   workload server ADDR            TCP accept-and-close on 80, TCP sink on
 *                                   5001, UDP sink on 53 (forks one child per
 *                                   service; SIGTERM ends them all)
 *   workload connect ADDR PORT SECS connect()+close() loop
 *   workload udp ADDR PORT SECS     sendto() of 16-byte datagrams on one
 *                                   unconnected socket
 *   workload bulk ADDR PORT SECS    one connection, 64 KiB writes
 *   workload holders BASE COUNT     COUNT sleeping children with login UIDs
 *                                   BASE..BASE+COUNT-1 (control-path bench)
 *
 * Clients print one line: "ops=<n> ok=<n> fail=<n> seconds=<s> bytes=<n>".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec / 1e9;
}

static struct sockaddr_in addr_of(const char *ip, int port)
{
	struct sockaddr_in a = { .sin_family = AF_INET, .sin_port = htons(port) };
	if (inet_pton(AF_INET, ip, &a.sin_addr) != 1) {
		fprintf(stderr, "bad address %s\n", ip);
		exit(2);
	}
	return a;
}

static int listen_on(const char *ip, int port, int type)
{
	struct sockaddr_in a = addr_of(ip, port);
	int s = socket(AF_INET, type, 0), one = 1;
	setsockopt(s, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
	if (bind(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
		perror("bind");
		exit(1);
	}
	if (type == SOCK_STREAM && listen(s, 4096) < 0) {
		perror("listen");
		exit(1);
	}
	return s;
}

static void serve(const char *ip)
{
	pid_t kids[3];
	int n = 0;
	setpgid(0, 0);
	if ((kids[n++] = fork()) == 0) {      /* accept and close */
		int s = listen_on(ip, 80, SOCK_STREAM);
		for (;;) {
			int c = accept(s, NULL, NULL);
			if (c >= 0)
				close(c);
		}
	}
	if ((kids[n++] = fork()) == 0) {      /* bulk sink */
		int s = listen_on(ip, 5001, SOCK_STREAM);
		static char buf[1 << 16];
		for (;;) {
			int c = accept(s, NULL, NULL);
			if (c < 0)
				continue;
			while (read(c, buf, sizeof(buf)) > 0)
				;
			close(c);
		}
	}
	if ((kids[n++] = fork()) == 0) {      /* UDP sink */
		int s = listen_on(ip, 53, SOCK_DGRAM);
		int big = 1 << 22;
		setsockopt(s, SOL_SOCKET, SO_RCVBUF, &big, sizeof(big));
		static char buf[2048];
		for (;;)
			recv(s, buf, sizeof(buf), 0);
	}
	printf("ready\n");
	fflush(stdout);
	int st;
	while (wait(&st) > 0)
		;
}

static void connect_loop(const char *ip, int port, double secs)
{
	struct sockaddr_in a = addr_of(ip, port);
	struct linger lg = { 1, 0 };   /* RST on close: no TIME_WAIT pile-up */
	long ok = 0, fail = 0;
	double t0 = now(), t;
	do {
		for (int i = 0; i < 64; i++) {
			int s = socket(AF_INET, SOCK_STREAM, 0);
			if (connect(s, (struct sockaddr *)&a, sizeof(a)) == 0) {
				ok++;
				setsockopt(s, SOL_SOCKET, SO_LINGER, &lg, sizeof(lg));
			} else {
				fail++;
			}
			close(s);
		}
		t = now();
	} while (t - t0 < secs);
	printf("ops=%ld ok=%ld fail=%ld seconds=%.6f bytes=0\n", ok + fail, ok, fail, t - t0);
}

static void udp_loop(const char *ip, int port, double secs)
{
	struct sockaddr_in a = addr_of(ip, port);
	int s = socket(AF_INET, SOCK_DGRAM, 0);
	char msg[16] = "aus-bench";
	long ok = 0, fail = 0;
	double t0 = now(), t;
	do {
		for (int i = 0; i < 256; i++) {
			if (sendto(s, msg, sizeof(msg), 0, (struct sockaddr *)&a, sizeof(a)) > 0)
				ok++;
			else
				fail++;
		}
		t = now();
	} while (t - t0 < secs);
	printf("ops=%ld ok=%ld fail=%ld seconds=%.6f bytes=%ld\n", ok + fail, ok, fail,
	       t - t0, ok * (long)sizeof(msg));
}

static void bulk(const char *ip, int port, double secs)
{
	struct sockaddr_in a = addr_of(ip, port);
	static char buf[1 << 16];
	int s = socket(AF_INET, SOCK_STREAM, 0);
	if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
		printf("ops=0 ok=0 fail=1 seconds=0 bytes=0\n");
		return;
	}
	long bytes = 0, writes = 0;
	double t0 = now(), t;
	do {
		ssize_t n = write(s, buf, sizeof(buf));
		if (n <= 0)
			break;
		bytes += n;
		writes++;
		t = now();
	} while (t - t0 < secs);
	t = now();
	close(s);
	printf("ops=%ld ok=%ld fail=0 seconds=%.6f bytes=%ld\n", writes, writes, t - t0, bytes);
}

static void holders(long base, long count)
{
	setpgid(0, 0);
	for (long i = 0; i < count; i++) {
		pid_t p = fork();
		if (p == 0) {
			char v[32];
			int fd = open("/proc/self/loginuid", O_WRONLY);
			int n = snprintf(v, sizeof(v), "%ld", base + i);
			if (fd < 0 || write(fd, v, n) != n)
				_exit(1);
			close(fd);
			pause();
			_exit(0);
		}
		if (p < 0) {
			perror("fork");
			break;
		}
	}
	printf("ready\n");
	fflush(stdout);
	pause();
}

int main(int argc, char **argv)
{
	if (argc >= 3 && !strcmp(argv[1], "server")) {
		serve(argv[2]);
	} else if (argc >= 5 && !strcmp(argv[1], "connect")) {
		connect_loop(argv[2], atoi(argv[3]), atof(argv[4]));
	} else if (argc >= 5 && !strcmp(argv[1], "udp")) {
		udp_loop(argv[2], atoi(argv[3]), atof(argv[4]));
	} else if (argc >= 5 && !strcmp(argv[1], "bulk")) {
		bulk(argv[2], atoi(argv[3]), atof(argv[4]));
	} else if (argc >= 4 && !strcmp(argv[1], "holders")) {
		holders(atol(argv[2]), atol(argv[3]));
	} else {
		fprintf(stderr, "usage: see the comment at the top of workload.c\n");
		return 2;
	}
	return 0;
}
