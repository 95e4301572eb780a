// The source's postcopy page server thread (see page-server.ts): page requests arrive on the
// preempt connection (from a livemig destination) or from the main thread (the return path),
// and each page goes out on the preempt connection at once, read from the stopped guest's RAM.

import { parentPort, workerData } from 'node:worker_threads';
import {
  BatchWriter,
  decodeRequestBatch,
  ErrorCode,
  ProtocolError,
  StateError,
  NEED_MORE_RP,
  RamRecordWriter,
  REQUEST_BATCH_KIND,
  RP_LIVEMIG_EXT,
  ReturnPathDecoder,
  RpMsg,
  TARGET_PAGE_SIZE,
} from '@livemig/protocol';
import { raiseThreadPriority, waitOnWord } from '@livemig/guest';
import { WorkerConnection } from '@livemig/runtime';
import { type PageServerCommand, type PageServerData, type PageServerMessage, Ring, ringDrain, ringPush, ServerCounter } from './page-server.ts';

const d = workerData as PageServerData;
// Latency first: run ahead of the busy main thread when the process may (see raiseThreadPriority).
if (!raiseThreadPriority(d.realtime) && d.realtime) new Float64Array(d.counters)[ServerCounter.REALTIME_REFUSED] = 1;
const port = parentPort!;
const blocks = d.blocks.map((b) => ({ idstr: b.idstr, length: b.length, bytes: Buffer.from(b.memory, 0, b.length) }));
const byName = new Map(blocks.map((b, i) => [b.idstr, i]));
const forward = new Int32Array(d.forward);
const served = new Int32Array(d.served);
const counters = new Float64Array(d.counters);

interface Link {
  conn: WorkerConnection;
  w: BatchWriter;
  rec: RamRecordWriter;
  /** The writer's totalBytes (bytes encoded since its creation) at the last flush. */
  flushedBytes: number;
}
let link: Link | undefined;

function post(m: PageServerMessage): void {
  port.postMessage(m);
}

function serve(l: Link, block: number, page: number): void {
  const b = blocks[block];
  if (b === undefined || (page + 1) * TARGET_PAGE_SIZE > b.length) throw new ProtocolError(ErrorCode.ILLEGAL_RAM_OFFSET, `page request for page ${page} outside block ${block}`, { pageOffset: page * TARGET_PAGE_SIZE });
  // Copied into the writer's slab, header and page together: a view of RAM would cost two
  // objects and two iovecs per page (the sealed header, the view) for a 4 KiB memcpy saved.
  l.rec.page(l.w, b.idstr, page * TARGET_PAGE_SIZE, b.bytes, page * TARGET_PAGE_SIZE);
}

/** Write what was encoded, as one writev; `written` is called once it is handed over (or failed). */
function flush(l: Link, written?: () => void): void {
  if (l.w.totalBytes === l.flushedBytes) {
    written?.();
    return;
  }
  // totalBytes counts from the writer's creation: only what this batch added is new.
  counters[ServerCounter.BYTES]! += l.w.totalBytes - l.flushedBytes;
  l.flushedBytes = l.w.totalBytes;
  const batch = l.w.flush();
  // Once the kernel has the batch (or the connection is gone) its slabs serve the next one.
  l.conn.write(batch, () => {
    l.w.recycle(batch);
    written?.();
  });
}

function attach(m: Extract<PageServerCommand, { kind: 'attach' }>): void {
  const rp = new ReturnPathDecoder({ livemigExtensions: true });
  const requestedHere = (name: string, page: number): void => {
    const block = byName.get(name);
    if (block === undefined) throw new ProtocolError(ErrorCode.UNKNOWN_BLOCK, `page request for unknown block "${name}"`, { block: name });
    serve(l, block, page);
    ringPush(served, block, page);
  };
  const conn = new WorkerConnection(
    m,
    'preempt channel',
    (chunk) => {
      rp.push(chunk);
      for (let r = rp.next(); r !== NEED_MORE_RP; r = rp.next()) {
        if (r.type === RpMsg.REQ_PAGES || r.type === RpMsg.REQ_PAGES_ID) {
          counters[ServerCounter.REQUESTS]!++;
          for (let p = r.start! / TARGET_PAGE_SIZE; p < (r.start! + r.pageLength!) / TARGET_PAGE_SIZE; p++) requestedHere(r.block!, p);
        } else if (r.type === RP_LIVEMIG_EXT && r.payload![0] === REQUEST_BATCH_KIND) {
          counters[ServerCounter.REQUESTS]!++;
          decodeRequestBatch(r.payload!, requestedHere);
        } else throw new StateError('postcopy-active', r.name, `unexpected message ${r.name} on the preempt channel`);
      }
      rp.retainUnread();
      flush(l);
    },
    (reason) => post({ kind: 'closed', reason }),
  );
  const l: Link = { conn, w: new BatchWriter({ slabSize: 64 * 1024 }), rec: new RamRecordWriter(), flushedBytes: 0 };
  link = l;
  conn.start();
}

port.on('message', (m: PageServerCommand) => {
  if (m.kind === 'attach') {
    attach(m);
    return;
  }
  const l = link;
  link = undefined;
  if (l === undefined || l.conn.done) {
    post({ kind: m.kind === 'end' ? 'ended' : 'detached' });
    return;
  }
  if (m.kind === 'detach') {
    l.conn.close();
    post({ kind: 'detached' });
    return;
  }
  // QEMU 7.2's preempt channel ends with an EOS word; then our side closes.
  l.conn.done = true;
  l.w.be64(0x10);
  flush(l, () => post({ kind: 'ended' }));
  l.conn.socket.end();
  setTimeout(() => l.conn.socket.destroy(), 5_000).unref();
});

// The handlers are in place: the switchover to postcopy may go ahead (postcopy-sender.ts).
post({ kind: 'ready' });

// Requests from the main thread (the return path), served on the attached connection.
for (;;) {
  const tail = Atomics.load(forward, Ring.TAIL);
  if (tail === Atomics.load(forward, Ring.HEAD) || link === undefined || link.conn.done) {
    await waitOnWord(forward, Ring.TAIL, tail, 200);
    if (link === undefined || link.conn.done) await new Promise((r) => setTimeout(r, 5));
    continue;
  }
  const l = link;
  try {
    ringDrain(forward, (block, page) => serve(l, block, page));
    flush(l);
  } catch (err) {
    l.conn.lose((err as Error).message);
  }
}
