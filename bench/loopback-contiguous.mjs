#!/usr/bin/env node
// loopback-contiguous.mjs: the loopback ceiling for a sender that writes contiguous buffers, as
// livemig's source now does (page records copied into ~1 MiB slabs, one writev of a few). The
// shared loopback-limit.mjs writes one view per page (cork:256), a slower way to send that
// livemig left behind, so it no longer bounds us from above; this script does.
//
// Each run forks two fresh Node processes: a sender owning SIZE bytes of non-zero "guest RAM",
// and a receiver that reads with a static 1 MiB buffer (net.connect onread) and copies every byte
// into a SIZE-byte destination touched beforehand (as livemig's destination prefaults its RAM).
// The sender writes 1 MiB subarrays of its RAM (no copy: the ceiling of the write path alone),
// with two queued at most (waiting for 'drain' past that); the receiver answers one byte once it has all of
// them. The figure is SIZE / (that byte's arrival - the first write), taken by the sender.
//
//   node bench/loopback-contiguous.mjs [--size 256M] [--reps 3] [--json]
// Plain Node >= 20, no dependencies.

import { fork } from 'node:child_process';
import net from 'node:net';
import { once } from 'node:events';
import { fileURLToPath } from 'node:url';

const CHUNK = 1024 * 1024;
const GiB = 1024 ** 3;

function parseSize(text) {
  const m = /^(\d+)([MG])$/.exec(text);
  if (m === null) throw new Error(`--size: "${text}" is not a size like 256M or 1G`);
  return Number(m[1]) * (m[2] === 'G' ? GiB : 1024 * 1024);
}

function arg(name, otherwise) {
  const i = process.argv.indexOf(name);
  return i < 0 ? otherwise : process.argv[i + 1];
}

async function sender(size) {
  const ram = Buffer.alloc(size, 0x5a);
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  process.send({ port: server.address().port });
  const [sock] = await once(server, 'connection');
  sock.setNoDelay(true);
  const acked = once(sock, 'data');
  const started = performance.now();
  for (let off = 0; off < size; off += CHUNK) {
    // Two writes queued at most, as livemig's source keeps one batch in flight while it encodes the next.
    if (!sock.write(ram.subarray(off, Math.min(size, off + CHUNK))) && sock.writableLength >= 2 * CHUNK) await once(sock, 'drain');
  }
  await acked;
  const ms = performance.now() - started;
  sock.destroy();
  server.close();
  process.send({ gibps: size / GiB / (ms / 1000) });
}

async function receiver(size, port) {
  const dest = Buffer.alloc(size);
  dest.fill(1);
  dest.fill(0);
  const readBuffer = Buffer.allocUnsafe(CHUNK);
  let got = 0;
  const sock = net.connect({
    port,
    host: '127.0.0.1',
    onread: {
      buffer: readBuffer,
      callback(n, buf) {
        buf.copy(dest, got, 0, n);
        got += n;
        if (got === size) sock.end(Buffer.from([1]));
      },
    },
  });
  await once(sock, 'close');
  process.exit(0);
}

async function oneRun(size) {
  const self = fileURLToPath(import.meta.url);
  const send = fork(self, ['--role', 'sender', '--size', String(size)]);
  try {
    const [{ port }] = await once(send, 'message');
    const recv = fork(self, ['--role', 'receiver', '--size', String(size), '--port', String(port)]);
    const [{ gibps }] = await once(send, 'message');
    await once(recv, 'exit');
    return gibps;
  } finally {
    send.kill();
  }
}

const role = arg('--role', 'main');
if (role === 'sender') await sender(Number(arg('--size')));
else if (role === 'receiver') await receiver(Number(arg('--size')), Number(arg('--port')));
else {
  const size = parseSize(arg('--size', '256M'));
  const reps = Number(arg('--reps', '3'));
  const figures = [];
  for (let i = 0; i < reps; i++) figures.push(await oneRun(size));
  const s = [...figures].sort((a, b) => a - b);
  const gibps = { median: s[Math.floor(s.length / 2)], min: s[0], max: s[s.length - 1] };
  if (process.argv.includes('--json')) console.log(JSON.stringify({ size, reps, gibps }));
  else console.log(`1 MiB contiguous writes → onread copy into prefaulted RAM, ${size / (1024 * 1024)} MiB: ${gibps.median.toFixed(2)} GiB/s [${gibps.min.toFixed(2)}-${gibps.max.toFixed(2)}]`);
  process.exit(0);
}
