// The destination's postcopy fault thread (livemig source with postcopy-preempt): it owns the
// preempt connection. vCPU faults become page requests written on that connection, and the pages
// that come back on it are placed and their vCPUs woken, all without the main thread, which is
// busy with the background stream (on a loaded machine each event-loop hop there costs ms).
// The thread starts with the migration and takes a connection when postcopy listens (and a new
// one after each recovery), so no fault waits for a thread to boot.

import { parentPort, workerData } from 'node:worker_threads';
import { claimPage, drainFaultRing, isPageReceived, raiseThreadPriority, setPageReceived, waitForFaultRing, wakeArrived } from '@livemig/guest';
import { BatchWriter, NEED_MORE, PostcopyState, type RamTarget, type RequestNaming, StreamDecoder, writePageRequests } from '@livemig/protocol';
import { WorkerConnection } from '@livemig/runtime';
import { FaultCounter, type FaultThreadCommand, type FaultWorkerData, type FaultWorkerMessage } from './fault-thread.ts';

const d = workerData as FaultWorkerData;
// Latency first: run ahead of the busy main thread when the process may (see raiseThreadPriority).
raiseThreadPriority();
const port = parentPort!;
const local = d.blocks.map((b) => ({
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
    return claimPage(l.claimed, l.received, pageOffset / 4096);
  },
  pagePlaced(block, pageOffset) {
    const l = local[streamToLocal[block]!]!;
    setPageReceived(l.received, pageOffset / 4096);
    counters[FaultCounter.PREEMPT_PAGES]!++;
  },
};

/** The connection in use, with the requests made on it. */
interface Link {
  conn: WorkerConnection;
  /** Pages requested and not yet received (duplicate faults on one page make one request). */
  requested: Set<number>;
  naming: RequestNaming;
}
let link: Link | undefined;

function post(m: FaultWorkerMessage): void {
  port.postMessage(m);
}

function attach(m: Extract<FaultThreadCommand, { kind: 'attach' }>): void {
  const decoder = new StreamDecoder({ ram: target, bareRam: true, resume: { postcopyState: PostcopyState.RUNNING, sections: [], blocks: m.streamBlocks } });
  const conn: WorkerConnection = new WorkerConnection(
    m,
    'preempt channel',
    (chunk) => {
      decoder.push(chunk);
      for (let ev = decoder.next(); ev !== NEED_MORE; ev = decoder.next()) {
        if (ev.kind === 'eof') {
          // Every page of this channel is placed; the source closes it.
          conn.done = true;
          post({ kind: 'eof' });
        }
      }
      decoder.retainUnread();
      for (const b of local) wakeArrived(b.received, b.waiting, d.waiterSlots);
    },
    (reason) => post({ kind: 'closed', reason }),
  );
  link = { conn, requested: new Set(), naming: { named: false } };
  conn.start();
  // After a recovery the requests in flight are lost: ask again for every page a vCPU waits for.
  const waitingNow: number[] = [];
  for (let i = 0; i < d.waiterSlots; i++) {
    const p = Atomics.load(main.waiting, i) - 1;
    if (p >= 0) waitingNow.push(p);
  }
  request(waitingNow);
}

port.on('message', (m: FaultThreadCommand) => {
  if (m.kind === 'attach') attach(m);
  else if (m.kind === 'detach') {
    // Placement is synchronous in a data event: between events nothing is half placed.
    link?.conn.close();
    link = undefined;
    post({ kind: 'detached' });
  }
});

const isReceived = (page: number): boolean => isPageReceived(main.received, page);

function request(pages: Iterable<number>): void {
  const l = link;
  if (l === undefined || l.conn.done) return;
  const fresh: number[] = [];
  for (const page of pages) {
    if (isReceived(page) || l.requested.has(page)) continue;
    l.requested.add(page);
    fresh.push(page);
  }
  if (fresh.length === 0) return;
  const w = new BatchWriter({ slabSize: 4096 });
  counters[FaultCounter.REQUEST_BYTES]! += writePageRequests(w, main.idstr, fresh, true, l.naming);
  counters[FaultCounter.REQUESTED_PAGES]! += fresh.length;
  l.conn.socket.write(w.flushConcat());
}

const faulted = new Uint32Array(256);
for (;;) {
  await waitForFaultRing(ring, 200);
  // Faults wait in the ring while no connection is attached (a pause): the next one asks.
  if (link === undefined || link.conn.done) {
    await new Promise((r) => setTimeout(r, 5));
    continue;
  }
  const n = drainFaultRing(ring, faulted);
  if (n === 0) await new Promise((r) => setImmediate(r)); // a slot reserved, not written yet
  else request(faulted.subarray(0, n));
  for (const p of link?.requested ?? []) if (isReceived(p)) link!.requested.delete(p);
}
