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
  writePageRequests,
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

/** The warm-up's made-up block: its pages, and rounds of requests for them (see warmUp). */
const WARM_UP_BLOCK = 'warm-up';
const WARM_UP_PAGES = 4;
const WARM_UP_ROUNDS = 64;

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

/** Every page request in `chunk` (and what `rp` kept of earlier chunks), each page to `onPage`; requests counted in `tally`. */
function decodeRequests(rp: ReturnPathDecoder, chunk: Buffer, onPage: (block: string, page: number) => void, tally: Float64Array): void {
  rp.push(chunk);
  for (let r = rp.next(); r !== NEED_MORE_RP; r = rp.next()) {
    if (r.type === RpMsg.REQ_PAGES || r.type === RpMsg.REQ_PAGES_ID) {
      tally[ServerCounter.REQUESTS]!++;
      for (let p = r.start! / TARGET_PAGE_SIZE; p < (r.start! + r.pageLength!) / TARGET_PAGE_SIZE; p++) onPage(r.block!, p);
    } else if (r.type === RP_LIVEMIG_EXT && r.payload![0] === REQUEST_BATCH_KIND) {
      tally[ServerCounter.REQUESTS]!++;
      decodeRequestBatch(r.payload!, onPage);
    } else throw new StateError('postcopy-active', r.name, `unexpected message ${r.name} on the preempt channel`);
  }
  rp.retainUnread();
}

/**
 * The request path run over made-up requests before any real one: a fresh thread would compile
 * the return-path decoder and the record writer while the guest waits on the destination for its
 * first fault. The pages are a scratch block's, the bytes go nowhere, nothing is counted.
 */
function warmUp(): void {
  const scratch = Buffer.alloc(WARM_UP_PAGES * TARGET_PAGE_SIZE);
  const requests = new BatchWriter({ slabSize: 4096 });
  const naming = { named: false };
  for (let p = 0; p < WARM_UP_PAGES; p++) writePageRequests(requests, WARM_UP_BLOCK, [p], false, naming);
  writePageRequests(requests, WARM_UP_BLOCK, [0, 1, 3, 2], true, naming);
  const stream = requests.flushConcat();
  const tally = new Float64Array(counters.length);
  const l = { w: new BatchWriter({ slabSize: 64 * 1024 }), rec: new RamRecordWriter() };
  const onPage = (_block: string, page: number): void => void l.rec.page(l.w, WARM_UP_BLOCK, page * TARGET_PAGE_SIZE, scratch, page * TARGET_PAGE_SIZE);
  for (let round = 0; round < WARM_UP_ROUNDS; round++) {
    // Split inside a message, as reads may.
    const rp = new ReturnPathDecoder({ livemigExtensions: true });
    const cut = 1 + (round % (stream.length - 1));
    decodeRequests(rp, stream.subarray(0, cut), onPage, tally);
    decodeRequests(rp, stream.subarray(cut), onPage, tally);
    l.w.recycle(l.w.flush());
  }
  l.w.release();
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
      decodeRequests(rp, chunk, requestedHere, counters);
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

warmUp();
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
