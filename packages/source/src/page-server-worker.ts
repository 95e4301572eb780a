// The source's postcopy page server thread (see page-server.ts): page requests arrive on the
// preempt connection (from a livemig destination) or from the main thread (the return path),
// and each page goes out on the preempt connection at once, read from the stopped guest's RAM.

import net from 'node:net';
import { parentPort, workerData } from 'node:worker_threads';
import {
  BatchWriter,
  decodeRequestBatch,
  NEED_MORE_RP,
  RamRecordWriter,
  REQUEST_BATCH_KIND,
  RP_LIVEMIG_EXT,
  ReturnPathDecoder,
  RpMsg,
  TARGET_PAGE_SIZE,
} from '@livemig/protocol';
import { raiseThreadPriority } from '@livemig/guest';
import { type PageServerCommand, type PageServerData, type PageServerMessage, Ring, ringDrain, ringPush, ServerCounter } from './page-server.ts';

const d = workerData as PageServerData;
// Latency first: run ahead of the busy main thread when the process may (see raiseThreadPriority).
raiseThreadPriority();
const port = parentPort!;
const blocks = d.blocks.map((b) => ({ idstr: b.idstr, length: b.length, bytes: Buffer.from(b.memory, 0, b.length) }));
const byName = new Map(blocks.map((b, i) => [b.idstr, i]));
const forward = new Int32Array(d.forward);
const served = new Int32Array(d.served);
const counters = new Float64Array(d.counters);

interface Link {
  socket: net.Socket;
  w: BatchWriter;
  rec: RamRecordWriter;
  rp: ReturnPathDecoder;
  done: boolean;
}
let link: Link | undefined;

function post(m: PageServerMessage): void {
  port.postMessage(m);
}

function lost(l: Link, reason: string): void {
  if (l.done) return;
  l.done = true;
  l.socket.destroy();
  post({ kind: 'closed', reason });
}

function serve(l: Link, block: number, page: number): void {
  const b = blocks[block];
  if (b === undefined || (page + 1) * TARGET_PAGE_SIZE > b.length) throw new Error(`page request for page ${page} outside block ${block}`);
  // The guest is stopped: what RAM holds now is what goes (a view, no copy).
  l.rec.page(l.w, b.idstr, page * TARGET_PAGE_SIZE, b.bytes, page * TARGET_PAGE_SIZE, true);
}

function flush(l: Link): void {
  if (l.w.totalBytes === 0 || l.done) return;
  const bufs = l.w.flush();
  l.socket.cork();
  for (const b of bufs) {
    counters[ServerCounter.BYTES]! += b.length;
    l.socket.write(b);
  }
  l.socket.uncork();
}

function attach(m: Extract<PageServerCommand, { kind: 'attach' }>): void {
  const socket = new net.Socket({ fd: m.fd, readable: true, writable: true, allowHalfOpen: true });
  if (m.tcp) socket.setNoDelay(true);
  const l: Link = { socket, w: new BatchWriter({ slabSize: 64 * 1024 }), rec: new RamRecordWriter(), rp: new ReturnPathDecoder({ livemigExtensions: true }), done: false };
  link = l;
  const requestedHere = (name: string, page: number): void => {
    const block = byName.get(name);
    if (block === undefined) throw new Error(`page request for unknown block "${name}"`);
    serve(l, block, page);
    ringPush(served, block, page);
  };
  const onData = (chunk: Buffer): void => {
    if (l.done) return;
    try {
      l.rp.push(chunk);
      for (let m = l.rp.next(); m !== NEED_MORE_RP; m = l.rp.next()) {
        if (m.type === RpMsg.REQ_PAGES || m.type === RpMsg.REQ_PAGES_ID) {
          counters[ServerCounter.REQUESTS]!++;
          for (let p = m.start! / TARGET_PAGE_SIZE; p < (m.start! + m.pageLength!) / TARGET_PAGE_SIZE; p++) requestedHere(m.block!, p);
        } else if (m.type === RP_LIVEMIG_EXT && m.payload![0] === REQUEST_BATCH_KIND) {
          counters[ServerCounter.REQUESTS]!++;
          decodeRequestBatch(m.payload!, requestedHere);
        } else throw new Error(`unexpected message ${m.name} on the preempt channel`);
      }
      flush(l);
    } catch (err) {
      lost(l, `preempt channel: ${(err as Error).message}`);
    }
  };
  if (m.pending.byteLength > 0) onData(Buffer.from(m.pending.buffer, m.pending.byteOffset, m.pending.byteLength));
  socket.on('data', onData);
  socket.on('error', (err) => lost(l, `preempt channel failed: ${err.message}`));
  socket.on('close', () => lost(l, 'the destination closed the preempt channel'));
}

port.on('message', (m: PageServerCommand) => {
  if (m.kind === 'attach') {
    attach(m);
    return;
  }
  const l = link;
  link = undefined;
  if (l === undefined || l.done) {
    post({ kind: m.kind === 'end' ? 'ended' : 'detached' });
    return;
  }
  l.done = true;
  if (m.kind === 'detach') {
    l.socket.destroy();
    post({ kind: 'detached' });
    return;
  }
  // QEMU 7.2's preempt channel ends with an EOS word.
  l.w.be64(0x10);
  l.done = false;
  flush(l);
  l.done = true;
  l.socket.end(() => post({ kind: 'ended' }));
  setTimeout(() => l.socket.destroy(), 5_000).unref();
});

// Requests from the main thread (the return path), served on the attached connection.
const waitAsync = (Atomics as unknown as { waitAsync(a: Int32Array, i: number, v: number, t: number): { async: boolean; value: Promise<string> | string } })
  .waitAsync;
for (;;) {
  const tail = Atomics.load(forward, Ring.TAIL);
  if (tail === Atomics.load(forward, Ring.HEAD) || link === undefined || link.done) {
    const r = waitAsync(forward, Ring.TAIL, tail, 200);
    if (r.async) await r.value;
    if (link === undefined || link.done) await new Promise((r) => setTimeout(r, 5));
    continue;
  }
  const l = link;
  try {
    ringDrain(forward, (block, page) => serve(l, block, page));
    flush(l);
  } catch (err) {
    lost(l, (err as Error).message);
  }
}
