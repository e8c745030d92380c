/* ntpflood: a paced NTP client-request generator for the loopback benchmark.
 *
 * Sends NTPv4 mode-3 requests to DST:PORT at RATE per second for at most
 * DURATION seconds (and at most RATE*DURATION packets), each from its own
 * spoofed loopback source 127.x.y.z:SRC_PORT chosen by IP_PKTINFO (the whole
 * of 127.0.0.0/8 is local, so no raw socket is needed and replies come back
 * to this socket, which is bound to 0.0.0.0:SRC_PORT). Replies are received
 * in the same loop and measured: server latency = transmit - receive
 * timestamp in the reply; round trip = now - the origin field (our send time).
 *
 * Build: gcc -O2 -o ntpflood ntpflood.c     (bench/side_by_side.py does this)
 * Usage: ntpflood DST PORT RATE DURATION_S SOURCES SRC_PORT [DRAIN_S [FIRST_SOURCE]]
 * FIRST_SOURCE lets successive runs continue the cycle over the sources, so each
 * source sends once per SOURCES packets however the runs are cut.
 * Prints one JSON line. Only loopback destinations are accepted.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BATCH 32
#define RBATCH 64
#define HIST_US 100000  /* latency histogram: 1 us buckets up to 100 ms */

static uint64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static uint32_t hist_server[HIST_US + 1], hist_rtt[HIST_US + 1];
static uint64_t received, kods, bogus;

static double percentile(const uint32_t *hist, uint64_t total, double q) {
    if (!total) return -1;
    uint64_t want = (uint64_t)(q * (double)total), seen = 0;
    for (int i = 0; i <= HIST_US; i++) {
        seen += hist[i];
        if (seen > want) return i;
    }
    return HIST_US;
}

static void drain(int fd, struct mmsghdr *msgs, unsigned char bufs[][64]) {
    for (;;) {
        int n = recvmmsg(fd, msgs, RBATCH, MSG_DONTWAIT, NULL);
        if (n <= 0) return;
        uint64_t now = mono_ns();
        for (int i = 0; i < n; i++) {
            unsigned char *p = bufs[i];
            msgs[i].msg_hdr.msg_namelen = 0;
            if (msgs[i].msg_len < 48 || (p[0] & 7) != 4) { bogus++; continue; }
            received++;
            if (p[1] == 0) { kods++; continue; }
            uint64_t org = 0, rx = 0, tx = 0;
            for (int b = 0; b < 8; b++) {
                org = org << 8 | p[24 + b];
                rx = rx << 8 | p[32 + b];
                tx = tx << 8 | p[40 + b];
            }
            int64_t d = (int64_t)(tx - rx);          /* NTP 32.32 fixed point */
            int64_t server_ns = (int64_t)(((__int128)d * 1000000000) >> 32);
            int64_t us = server_ns / 1000;
            if (us < 0) us = 0;
            if (us > HIST_US) us = HIST_US;
            hist_server[us]++;
            int64_t rtt_us = (int64_t)(now - org) / 1000;
            if (rtt_us < 0) rtt_us = 0;
            if (rtt_us > HIST_US) rtt_us = HIST_US;
            hist_rtt[rtt_us]++;
        }
        if (n < RBATCH) return;
    }
}

int main(int argc, char **argv) {
    if (argc < 7) {
        fprintf(stderr, "usage: %s DST PORT RATE DURATION_S SOURCES SRC_PORT [DRAIN_S [FIRST_SOURCE]]\n", argv[0]);
        return 2;
    }
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
    if (inet_pton(AF_INET, argv[1], &dst.sin_addr) != 1 || (ntohl(dst.sin_addr.s_addr) >> 24) != 127) {
        fprintf(stderr, "destination must be an IPv4 loopback address (127.0.0.0/8)\n");
        return 2;
    }
    double rate = atof(argv[3]), duration = atof(argv[4]);
    long sources = atol(argv[5]);
    int src_port = atoi(argv[6]);
    double drain_s = argc > 7 ? atof(argv[7]) : 0.2;
    uint64_t first_source = argc > 8 ? strtoull(argv[8], NULL, 10) : 0;
    if (drain_s < 0 || drain_s > 10) drain_s = 0.2;
    if (rate <= 0 || rate > 1e7 || duration <= 0 || duration > 600 || sources < 1 || sources > 65536L * 224) {
        fprintf(stderr, "bad rate, duration (<= 600 s) or sources (<= %ld)\n", 65536L * 224);
        return 2;
    }
    uint64_t limit = (uint64_t)(rate * duration);   /* bounded in count and in time */

    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int one = 1, big = 64 << 20;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &big, sizeof big);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &big, sizeof big);
    struct sockaddr_in any = {.sin_family = AF_INET, .sin_port = htons(src_port)};
    if (bind(fd, (struct sockaddr *)&any, sizeof any) < 0) { perror("bind"); return 1; }

    static unsigned char pkts[BATCH][48];
    static unsigned char ctrl[BATCH][CMSG_SPACE(sizeof(struct in_pktinfo))];
    static struct iovec iov[BATCH];
    static struct mmsghdr msgs[BATCH];
    static struct in_pktinfo *infos[BATCH];
    for (int i = 0; i < BATCH; i++) {
        memset(pkts[i], 0, 48);
        pkts[i][0] = (0 << 6) | (4 << 3) | 3;   /* LI 0, NTPv4, client */
        pkts[i][2] = 6;                          /* poll 64 s */
        pkts[i][3] = 0xec;                       /* precision */
        iov[i].iov_base = pkts[i];
        iov[i].iov_len = 48;
        msgs[i].msg_hdr.msg_name = &dst;
        msgs[i].msg_hdr.msg_namelen = sizeof dst;
        msgs[i].msg_hdr.msg_iov = &iov[i];
        msgs[i].msg_hdr.msg_iovlen = 1;
        msgs[i].msg_hdr.msg_control = ctrl[i];
        msgs[i].msg_hdr.msg_controllen = sizeof ctrl[i];
        struct cmsghdr *c = CMSG_FIRSTHDR(&msgs[i].msg_hdr);
        c->cmsg_level = IPPROTO_IP;
        c->cmsg_type = IP_PKTINFO;
        c->cmsg_len = CMSG_LEN(sizeof(struct in_pktinfo));
        infos[i] = (struct in_pktinfo *)CMSG_DATA(c);
        memset(infos[i], 0, sizeof *infos[i]);
    }
    static unsigned char rbufs[RBATCH][64];
    static struct iovec riov[RBATCH];
    static struct mmsghdr rmsgs[RBATCH];
    for (int i = 0; i < RBATCH; i++) {
        riov[i].iov_base = rbufs[i];
        riov[i].iov_len = 64;
        rmsgs[i].msg_hdr.msg_iov = &riov[i];
        rmsgs[i].msg_hdr.msg_iovlen = 1;
    }

    uint64_t sent = 0, send_errors = 0, next_source = first_source;
    uint64_t start = mono_ns(), deadline = start + (uint64_t)(duration * 1e9);
    for (;;) {
        uint64_t now = mono_ns();
        if (now >= deadline || sent >= limit) break;
        uint64_t due = (uint64_t)((double)(now - start) * rate / 1e9);
        if (due > limit) due = limit;
        if (due <= sent) { drain(fd, rmsgs, rbufs); continue; }
        int n = (int)(due - sent < BATCH ? due - sent : BATCH);
        for (int i = 0; i < n; i++) {
            uint64_t s = next_source++ % (uint64_t)sources;
            uint32_t p = (uint32_t)(s & 0xffff), host = 16 + (uint32_t)(s >> 16);
            infos[i]->ipi_spec_dst.s_addr = htonl(127u << 24 | p << 8 | host);
            uint64_t t = now;                    /* origin: our send time, opaque to servers */
            for (int b = 7; b >= 0; b--) { pkts[i][40 + b] = t & 0xff; t >>= 8; }
        }
        int done = sendmmsg(fd, msgs, n, 0);
        if (done < 0) { send_errors++; done = 1; }   /* skip one, never spin on an error */
        sent += done;
        drain(fd, rmsgs, rbufs);
    }
    uint64_t sent_end = mono_ns();
    uint64_t stop = sent_end + (uint64_t)(drain_s * 1e9);
    while (mono_ns() < stop) { drain(fd, rmsgs, rbufs); usleep(1000); }
    uint64_t timed = received - kods;
    printf("{\"sent\": %lu, \"send_errors\": %lu, \"received\": %lu, \"kod\": %lu, \"bogus\": %lu, "
           "\"send_seconds\": %.4f, \"server_latency_us\": {\"p50\": %.0f, \"p99\": %.0f, \"p999\": %.0f}, "
           "\"rtt_us\": {\"p50\": %.0f, \"p99\": %.0f, \"p999\": %.0f}}\n",
           (unsigned long)sent, (unsigned long)send_errors, (unsigned long)received, (unsigned long)kods,
           (unsigned long)bogus, (double)(sent_end - start) / 1e9,
           percentile(hist_server, timed, 0.5), percentile(hist_server, timed, 0.99),
           percentile(hist_server, timed, 0.999),
           percentile(hist_rtt, timed, 0.5), percentile(hist_rtt, timed, 0.99),
           percentile(hist_rtt, timed, 0.999));
    return 0;
}
