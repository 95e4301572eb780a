// How the source should hand guest pages to a socket: as one view per page (cork + writev of
// page-sized iovecs), copied into reused contiguous buffers (one write per MiB), or as refs
// through the native addon's writeRefs (headers in a buffer, pages in place; what the source
// does). Guest RAM is a SharedArrayBuffer, so the views are measured on SharedArrayBuffer and on a
// plain ArrayBuffer.
//
//   node --import tsx bench/writev-pages.bench.ts [MiB=256] [reps=3]
//
// A forked sink counts bytes over tcp loopback into one reused read buffer (onread) and answers
// one byte at the end; the figures are record bytes ÷ (answer − first write), and the sender's
// CPU time per GiB (steadier than wall time on a loaded machine). Modes alternate within each
// rep, so a loaded machine slows them alike.

import { fork } from 'node:child_process';
import { once } from 'node:events';
import net from 'node:net';
import { fileURLToPath } from 'node:url';
import { native } from '../packages/native/src/index.ts';

const PAGE = 4096;
const HEADER = 8;
const RECORD = HEADER + PAGE;
/** Pages per writev (views) or per contiguous buffer (copies): 1 MiB of records either way. */
const PAGES_PER_BATCH = 256;
/** Contiguous buffers in the copy ring: a few MiB in flight at most. */
const RING = 4;

type Mode = 'views-shared' | 'views-plain' | 'copy-ring-shared' | 'native-refs-shared';
/** native-refs-shared only where the addon is built. */
const MODES: Mode[] = ['views-shared', 'views-plain', 'copy-ring-shared', ...(native.available ? (['native-refs-shared'] as const) : [])];

if (process.argv[2] === '--sink') {
  const port = Number(process.argv[3]);
  const total = Number(process.argv[4]);
  let seen = 0;
  const sock = net.connect({
    port,
    host: '127.0.0.1',
    onread: {
      buffer: Buffer.allocUnsafe(1 << 20),
      callback: (n: number) => {
        seen += n;
        if (seen >= total) sock.end(Buffer.from([1]));
        return true;
      },
    },
  });
  sock.on('error', () => process.exit(1));
  sock.on('close', () => process.exit(0));
} else {
  const mib = Number(process.argv[2] ?? 256);
  const reps = Number(process.argv[3] ?? 3);
  const size = mib << 20;
  const pages = size / PAGE;
  const shared = Buffer.from(new SharedArrayBuffer(size));
  const plain = Buffer.from(new ArrayBuffer(size));
  for (let off = 0; off < size; off += PAGE) shared.fill((off / PAGE) % 251 + 1, off, off + PAGE);
  shared.copy(plain);
  const results = new Map<Mode, { gibps: number[]; cpuMsPerGiB: number[] }>(MODES.map((m) => [m, { gibps: [], cpuMsPerGiB: [] }]));
  for (let rep = 0; rep < reps; rep++) {
    for (const mode of MODES) {
      const r = await once1(mode, mode === 'views-plain' ? plain : shared, pages);
      results.get(mode)!.gibps.push(r.gibps);
      results.get(mode)!.cpuMsPerGiB.push(r.cpuMsPerGiB);
    }
  }
  console.log(`\nguest pages to a tcp loopback socket, ${mib} MiB, ${reps} reps alternating (median [min-max]):`);
  const base = results.get('views-shared')!;
  for (const [mode, r] of results) {
    console.log(
      `  ${mode.padEnd(18)} ${range(r.gibps)} GiB/s (÷ views-shared ${(median(r.gibps) / median(base.gibps)).toFixed(2)}), ` +
        `sender CPU ${range(r.cpuMsPerGiB, 0)} ms/GiB (÷ views-shared ${(median(r.cpuMsPerGiB) / median(base.cpuMsPerGiB)).toFixed(2)})`,
    );
  }
}

function range(xs: number[], digits = 2): string {
  const s = [...xs].sort((a, b) => a - b);
  return `${median(xs).toFixed(digits)} [${s[0]!.toFixed(digits)}-${s.at(-1)!.toFixed(digits)}]`;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)]!;
}

async function once1(mode: Mode, ram: Buffer, pages: number): Promise<{ gibps: number; cpuMsPerGiB: number }> {
  const server = net.createServer();
  server.listen(0, '127.0.0.1');
  await once(server, 'listening');
  const port = (server.address() as net.AddressInfo).port;
  const total = pages * RECORD;
  const sink = fork(fileURLToPath(import.meta.url), ['--sink', String(port), String(total)], { execArgv: ['--import', 'tsx'] });
  try {
    const [sock] = (await once(server, 'connection')) as [net.Socket];
    server.close();
    const answered = once(sock, 'data');
    const cpu0 = process.cpuUsage();
    const t0 = performance.now();
    if (mode === 'copy-ring-shared') await sendCopies(sock, ram, pages);
    else if (mode === 'native-refs-shared') await sendRefs(sock, ram, pages);
    else await sendViews(sock, ram, pages);
    await answered;
    const secs = (performance.now() - t0) / 1000;
    const cpu = process.cpuUsage(cpu0);
    sock.destroy();
    const gib = total / 2 ** 30;
    return { gibps: gib / secs, cpuMsPerGiB: (cpu.user + cpu.system) / 1000 / gib };
  } finally {
    sink.kill();
  }
}

function header(buf: Buffer, at: number, pageOffset: number): void {
  buf.writeUInt32BE(Math.floor(pageOffset / 2 ** 32), at);
  buf.writeUInt32BE((pageOffset | 0x28) >>> 0, at + 4);
}

/** cork, header view + page view per page, uncork: one writev of 512 iovecs per batch. */
async function sendViews(sock: net.Socket, ram: Buffer, pages: number): Promise<void> {
  for (let p = 0; p < pages; p += PAGES_PER_BATCH) {
    const n = Math.min(PAGES_PER_BATCH, pages - p);
    const headers = Buffer.allocUnsafe(n * HEADER);
    sock.cork();
    for (let k = 0; k < n; k++) {
      const off = (p + k) * PAGE;
      header(headers, k * HEADER, off);
      sock.write(headers.subarray(k * HEADER, k * HEADER + HEADER));
      sock.write(ram.subarray(off, off + PAGE));
    }
    sock.uncork();
    if (sock.writableNeedDrain) await once(sock, 'drain');
  }
}

/** Records copied into a ring of contiguous 1 MiB buffers, one write each, reused once written. */
async function sendCopies(sock: net.Socket, ram: Buffer, pages: number): Promise<void> {
  const ring = Array.from({ length: RING }, () => Buffer.allocUnsafeSlow(PAGES_PER_BATCH * RECORD));
  const free = [...ring];
  let wake: (() => void) | undefined;
  for (let p = 0; p < pages; p += PAGES_PER_BATCH) {
    while (free.length === 0) await new Promise<void>((r) => (wake = r));
    const buf = free.pop()!;
    const n = Math.min(PAGES_PER_BATCH, pages - p);
    let at = 0;
    for (let k = 0; k < n; k++) {
      const off = (p + k) * PAGE;
      header(buf, at, off);
      ram.copy(buf, at + HEADER, off, off + PAGE);
      at += RECORD;
    }
    sock.write(at === buf.length ? buf : buf.subarray(0, at), () => {
      free.push(buf);
      wake?.();
      wake = undefined;
    });
  }
}

/**
 * Headers in a ring of buffers, each page a ref into RAM (five numbers), one writeRefs per
 * batch; a full socket is waited for by Node's write of the next chunk, as StreamOut does.
 */
async function sendRefs(sock: net.Socket, ram: Buffer, pages: number): Promise<void> {
  const fd = (sock as unknown as { _handle: { fd: number } })._handle.fd;
  const headers = Buffer.allocUnsafeSlow(PAGES_PER_BATCH * HEADER);
  const refs = new Float64Array(PAGES_PER_BATCH * 5);
  const sources = [ram];
  for (let p = 0; p < pages; p += PAGES_PER_BATCH) {
    const n = Math.min(PAGES_PER_BATCH, pages - p);
    for (let k = 0; k < n; k++) {
      const off = (p + k) * PAGE;
      header(headers, k * HEADER, off);
      const r = k * 5;
      refs[r] = 0;
      refs[r + 1] = (k + 1) * HEADER;
      refs[r + 2] = 0;
      refs[r + 3] = off;
      refs[r + 4] = PAGE;
    }
    const piece = headers.subarray(0, n * HEADER);
    const total = n * RECORD;
    let done = native.writeRefs(fd, [piece], refs, n, sources);
    while (done < total) {
      // The socket is full: the next header or page through Node, which waits for room.
      const at = done % RECORD;
      const k = Math.floor(done / RECORD);
      const chunk = at < HEADER ? piece.subarray(k * HEADER + at, (k + 1) * HEADER) : ram.subarray((p + k) * PAGE + at - HEADER, (p + k + 1) * PAGE);
      await new Promise<void>((resolve) => sock.write(chunk, () => resolve()));
      done += chunk.length;
      if (done < total) done += native.writeRefs(fd, [piece], refs, n, sources, done);
    }
  }
}
