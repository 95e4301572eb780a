#!/usr/bin/env python3
"""An emulated WAN link between two TUN devices, at packet level (e2e/wan.test.ts).

The kernels here lack the netem qdisc ("Specified qdisc kind is unknown", no module to load),
so delay and loss cannot come from tc. This process plays the wire instead: it creates two TUN
devices (the test moves each into its own network namespace), reads every IP packet one side's
kernel sends and hands it to the other side's kernel after a one-way delay, at a line rate, with
seeded random loss and a drop-tail queue, so the TCP between the namespaces really sees RTT,
loss and queueing and really retransmits.

usage: wan-link.py TUN_A TUN_B --delay-ms D --loss P --rate-bps R --queue-bytes Q --seed S

stdin takes commands, one a line: "down" (drop every packet: a blackhole, nothing closes),
"up" (forward again), "stats" (print the counters). Prints "ready" once both devices exist, and
the counters as one JSON line on "stats" and at exit (stdin closed, SIGTERM).
"""

import argparse
import fcntl
import heapq
import json
import os
import random
import select
import signal
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TUN = 0x0001
IFF_NO_PI = 0x1000
MTU_READ = 65536


def open_tun(name):
    fd = os.open('/dev/net/tun', os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack('16sH', name.encode(), IFF_TUN | IFF_NO_PI))
    return fd


def main():
    p = argparse.ArgumentParser()
    p.add_argument('tun_a')
    p.add_argument('tun_b')
    p.add_argument('--delay-ms', type=float, default=10.0)
    p.add_argument('--loss', type=float, default=0.0)
    p.add_argument('--rate-bps', type=float, default=1e9)
    p.add_argument('--queue-bytes', type=int, default=4 * 2**20)
    p.add_argument('--seed', type=int, default=1)
    a = p.parse_args()

    fds = [open_tun(a.tun_a), open_tun(a.tun_b)]
    rnd = random.Random(a.seed)
    delay = a.delay_ms / 1000.0
    # Per direction: when the wire is next free (serialisation at the line rate) and the bytes queued.
    wire_free = [0.0, 0.0]
    queued = [0, 0]
    pending = []  # heap of (deliver_at, seq, direction, packet)
    seq = 0
    stats = {'forwarded': [0, 0], 'lost': [0, 0], 'queue_drops': [0, 0], 'blackholed': [0, 0], 'bytes': [0, 0]}
    link_up = True
    stop = False

    def on_term(_signum, _frame):
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_term)
    print('ready', flush=True)
    stdin_fd = sys.stdin.fileno()
    watched = [fds[0], fds[1], stdin_fd]
    line = b''
    while not stop:
        now = time.monotonic()
        timeout = 0.05 if not pending else max(0.0, min(0.05, pending[0][0] - now))
        try:
            readable, _, _ = select.select(watched, [], [], timeout)
        except InterruptedError:
            continue
        now = time.monotonic()
        for fd in readable:
            if fd == stdin_fd:
                chunk = os.read(stdin_fd, 4096)
                if not chunk:
                    stop = True
                    break
                line += chunk
                while b'\n' in line:
                    cmd, line = line.split(b'\n', 1)
                    cmd = cmd.strip().decode()
                    if cmd == 'down':
                        link_up = False
                    elif cmd == 'up':
                        link_up = True
                    elif cmd == 'stats':
                        print(json.dumps(stats), flush=True)
                continue
            d = 0 if fd == fds[0] else 1
            # Drain what the kernel has for this side (bounded, so the other side is not starved).
            for _ in range(64):
                try:
                    packet = os.read(fd, MTU_READ)
                except BlockingIOError:
                    break
                if not link_up:
                    stats['blackholed'][d] += 1
                    continue
                if a.loss > 0 and rnd.random() < a.loss:
                    stats['lost'][d] += 1
                    continue
                if queued[d] + len(packet) > a.queue_bytes:
                    stats['queue_drops'][d] += 1
                    continue
                start = max(now, wire_free[d])
                wire_free[d] = start + len(packet) * 8 / a.rate_bps
                queued[d] += len(packet)
                seq += 1
                heapq.heappush(pending, (wire_free[d] + delay, seq, d, packet))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, d, packet = heapq.heappop(pending)
            queued[d] -= len(packet)
            if not link_up:
                # Packets on the wire when the link went down are lost too.
                stats['blackholed'][d] += 1
                continue
            try:
                os.write(fds[1 - d], packet)
                stats['forwarded'][d] += 1
                stats['bytes'][d] += len(packet)
            except OSError:
                # The receiving device is down or gone (namespace removed): the packet is lost.
                stats['lost'][d] += 1
    print(json.dumps(stats), flush=True)


if __name__ == '__main__':
    main()
