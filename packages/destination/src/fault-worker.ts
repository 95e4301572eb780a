// The destination's postcopy fault thread (livemig source with postcopy-preempt): it owns the
// preempt connection. vCPUs write their page requests on it themselves, through the request line
// this thread publishes (guest's request-line.ts); the thread asks only for what they could not
// (faults queued in the ring while the line was busy or closed, and after a recovery every page a
// vCPU waits for). The pages that come back are placed and their vCPUs woken here, all without
// the main thread, which is busy with the background stream (on a loaded machine each event-loop
// hop there costs ms).
// The thread starts with the migration and takes a connection when postcopy listens (and a new
// one after each recovery), so no fault waits for a thread to boot.

import { parentPort, workerData } from 'node:worker_threads';
import { claimPage, drainFaultRing, LINE_OWNER, LINE_WRITE_TIMEOUT_MS, LineFailure, raiseThreadPriority, RequestLine, setPageReceived, waitForFaultRing, wakeArrived } from '@livemig/guest';
import { BatchWriter, NEED_MORE, RamRecordDecoder, RamRecordWriter, type RamTarget, TARGET_PAGE_SIZE, writeRpReqPages } from '@livemig/protocol';
import { WorkerConnection } from '@livemig/runtime';
import { FaultCounter, type FaultThreadCommand, type FaultWorkerData, type FaultWorkerMessage } from './fault-thread.ts';

const d = workerData as FaultWorkerData;
// Latency first: run ahead of the busy main thread when the process may (see raiseThreadPriority).
if (!raiseThreadPriority(d.realtime) && d.realtime) new Float64Array(d.counters)[FaultCounter.REALTIME_REFUSED] = 1;
const port = parentPort!;
interface LocalBlock {
  idstr: string;
  bytes: Uint8Array;
  received: Int32Array;
  claimed: Int32Array;
  waiting: Int32Array;
}
/** The warm-up's made-up pages and rounds (see warmUp). */
const WARM_UP_PAGES = 4;
const WARM_UP_ROUNDS = 64;
const local: LocalBlock[] = d.blocks.map((b) => ({
  idstr: b.idstr,
  bytes: new Uint8Array(b.memory),
  received: new Int32Array(b.received),
  claimed: new Int32Array(b.claimed),
  waiting: new Int32Array(b.waiting),
}));
const main = local[0]!;
const counters = new Float64Array(d.counters);
const ring = new Int32Array(d.faultRing);
let streamToLocal: number[] = [];

const target: RamTarget = {
  attachBlocks(blocks) {
    streamToLocal = blocks.map((b) => local.findIndex((l) => l.idstr === b.idstr));
    return streamToLocal.map((i) => (i >= 0 ? local[i]!.bytes : undefined));
  },
  acceptPage(block, pageOffset) {
    const l = local[streamToLocal[block]!]!;
    return claimPage(l.claimed, l.received, pageOffset / TARGET_PAGE_SIZE);
  },
  pagePlaced(block, pageOffset) {
    const l = local[streamToLocal[block]!]!;
    setPageReceived(l.received, pageOffset / TARGET_PAGE_SIZE);
    counters[FaultCounter.PREEMPT_PAGES]!++;
  },
};

/** The connection in use. */
let link: WorkerConnection | undefined;
/** Requests go out on the request line: vCPUs write their own, this thread those it must make. */
const line = new RequestLine(d.requestLine, d.requested, main.received.buffer as SharedArrayBuffer, LINE_OWNER);

/** A single-page request for page 0 of the main block, naming the block or not (the line's templates). */
function requestTemplate(naming: boolean): Uint8Array {
  const w = new BatchWriter({ slabSize: 512 });
  writeRpReqPages(w, 0, TARGET_PAGE_SIZE, naming ? main.idstr : undefined);
  return w.flushConcat();
}
const NAMING_TEMPLATE = requestTemplate(true);
const PLAIN_TEMPLATE = requestTemplate(false);
/** Where a request's big-endian 64-bit start address is (after the 2-byte type and 2-byte length). */
const REQUEST_ADDRESS_OFFSET = 4;

function post(m: FaultWorkerMessage): void {
  port.postMessage(m);
}

/**
 * Place the pages in `chunk` (after what `decoder` kept of earlier chunks) and wake the vCPUs
 * waiting for them; true once the channel's EOS came.
 */
function placeRecords(decoder: RamRecordDecoder, chunk: Buffer, blocks: readonly LocalBlock[]): boolean {
  decoder.push(chunk);
  const ended = decoder.next() !== NEED_MORE;
  decoder.retainUnread();
  for (const b of blocks) wakeArrived(b.received, b.waiting, d.waiterSlots);
  return ended;
}

/**
 * The placing path run over a made-up preempt stream before the first real page: a fresh thread
 * would compile the record decoder while the guest waits for its first fault. Its pages land in
 * a scratch block of its own, with its own bitmaps; nothing is counted or woken.
 */
function warmUp(): void {
  const bytes = new Uint8Array(new SharedArrayBuffer(WARM_UP_PAGES * TARGET_PAGE_SIZE));
  const scratch: LocalBlock = { idstr: 'warm-up', bytes, received: new Int32Array(new SharedArrayBuffer(4)), claimed: new Int32Array(new SharedArrayBuffer(4)), waiting: new Int32Array(new SharedArrayBuffer(d.waiterSlots * 4)) };
  const scratchTarget: RamTarget = {
    attachBlocks: () => [bytes],
    acceptPage: (_block, pageOffset) => claimPage(scratch.claimed, scratch.received, pageOffset / TARGET_PAGE_SIZE),
    pagePlaced: (_block, pageOffset) => setPageReceived(scratch.received, pageOffset / TARGET_PAGE_SIZE),
  };
  const w = new BatchWriter({ slabSize: 64 * 1024 });
  const rec = new RamRecordWriter();
  for (let p = 0; p < WARM_UP_PAGES; p++) rec.page(w, scratch.idstr, p * TARGET_PAGE_SIZE, bytes, p * TARGET_PAGE_SIZE);
  const stream = w.flushConcat();
  const streamBlocks = [{ idstr: scratch.idstr, length: bytes.length }];
  for (let round = 0; round < WARM_UP_ROUNDS; round++) {
    scratch.received[0] = 0;
    scratch.claimed[0] = 0;
    const decoder = RamRecordDecoder.forPreemptChannel(scratchTarget, streamBlocks);
    // Split inside a record, as reads may.
    const cut = 1 + (round % (stream.length - 1));
    placeRecords(decoder, stream.subarray(0, cut), [scratch]);
    placeRecords(decoder, stream.subarray(cut), [scratch]);
  }
}

function attach(m: Extract<FaultThreadCommand, { kind: 'attach' }>): void {
  const decoder = RamRecordDecoder.forPreemptChannel(target, m.streamBlocks);
  const conn: WorkerConnection = new WorkerConnection(
    m,
    'preempt channel',
    (chunk) => {
      if (placeRecords(decoder, chunk, local)) {
        // Its EOS: every page of this channel is placed; the source closes it.
        conn.done = true;
        post({ kind: 'eof' });
      }
    },
    (reason) => post({ kind: 'closed', reason }),
  );
  link = conn;
  line.publish(m.fd, NAMING_TEMPLATE, PLAIN_TEMPLATE, REQUEST_ADDRESS_OFFSET);
  // No request reaches the descriptor once it is closed, whoever closes it.
  conn.onClosing = () => line.retract();
  conn.start();
  // After a recovery the requests in flight are lost: ask again for every page a vCPU waits for.
  const waitingNow: number[] = [];
  for (let i = 0; i < d.waiterSlots; i++) {
    const p = Atomics.load(main.waiting, i) - 1;
    if (p >= 0) waitingNow.push(p);
  }
  request(waitingNow);
}

warmUp();
port.on('message', (m: FaultThreadCommand) => {
  if (m.kind === 'attach') attach(m);
  else if (m.kind === 'detach') {
    // Placement is synchronous in a data event: between events nothing is half placed.
    link?.close();
    link = undefined;
    post({ kind: 'detached' });
  }
});

function request(pages: Iterable<number>): void {
  for (const page of pages) line.requestPage(page);
}

const faulted = new Uint32Array(256);
for (;;) {
  await waitForFaultRing(ring, 200);
  // A writer gave the line up (the connection took no bytes, or failed): the link is broken.
  const failure = line.failure;
  if (link !== undefined && !link.done && failure !== LineFailure.NONE) {
    link.lose(
      failure === LineFailure.STALLED
        ? `preempt channel: took no page request for ${LINE_WRITE_TIMEOUT_MS} ms`
        : 'preempt channel: a page request could not be written',
    );
  }
  // Faults wait in the ring while no connection is attached (a pause): the next one asks.
  if (link === undefined || link.done) {
    await new Promise((r) => setTimeout(r, 5));
    continue;
  }
  const n = drainFaultRing(ring, faulted);
  if (n === 0) await new Promise((r) => setImmediate(r)); // a slot reserved, not written yet
  else request(faulted.subarray(0, n));
}
