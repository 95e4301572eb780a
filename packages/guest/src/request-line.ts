// The fault request line: a vCPU that faults writes its page request to the connection itself,
// one write syscall from its own thread, instead of handing the fault to the thread that owns the
// connection. On a loaded 2-core machine that hand-off (ring, wake the owner, the owner writes)
// cost about 75 µs at the median and milliseconds at the tail.
//
// The owner publishes the connection's file descriptor with two request templates (the first
// request on a connection names the block, later ones need not). Writers take a lock word, so
// requests never interleave, and the owner takes it too before it retracts the descriptor: no
// write ever reaches a descriptor after its connection is closed. Nothing here knows the wire
// format: a template is bytes with a big-endian 64-bit address at a given offset.
//
//   Int32Array on SAB: [LOCK holder+1 or 0][FD or -1][NAMED][FAILED][ADDR_OFFSET][NAMING_LEN][PLAIN_LEN]
//                      [REQUESTS][BYTES][SHUT] · · ·  then the naming template, then the plain one.
//   requested (Int32Array on SAB): one bit per page of the main block, cleared on each publish.

import { writeSync } from 'node:fs';
import { isPageReceived } from './page-bitmap.ts';

const LOCK = 0;
const FD = 1;
const NAMED = 2;
const FAILED = 3;
const ADDR_OFFSET = 4;
const NAMING_LEN = 5;
const PLAIN_LEN = 6;
const REQUESTS = 7;
const BYTES = 8;
const SHUT = 9;
const HEADER_WORDS = 16;
/** The guest page size (protocol's TARGET_PAGE_SIZE; vCPU threads load this module without protocol). */
const PAGE_BYTES = 4096;
/** Room for each template (a request naming a 255-byte block fits). */
const TEMPLATE_MAX = 320;

/** Who holds the lock: vCPU i is i; the owner is OWNER. */
export const LINE_OWNER = 0x7fff;

/** How long a writer keeps trying a connection that takes no bytes before it gives the line up. */
export const LINE_WRITE_TIMEOUT_MS = 1_000;

/** The owner waits this long for the lock before it takes it over (see ownerLock). */
const OWNER_LOCK_MS = 2 * LINE_WRITE_TIMEOUT_MS;

/** Why the line was given up (the FAILED word). */
export const LineFailure = { NONE: 0, STALLED: 1, WRITE_ERROR: 2 } as const;

/** What requestPage did. */
export const LineResult = {
  /** The request is written. */
  SENT: 0,
  /** Another request for the page is on this connection already, or the page is here. */
  DUPLICATE: 1,
  /** No connection is published (or the lock is stuck): hand the fault over some other way. */
  UNAVAILABLE: 2,
} as const;

/** A new line, closed (no descriptor is published). */
export function createRequestLine(): SharedArrayBuffer {
  const line = new SharedArrayBuffer(HEADER_WORDS * 4 + 2 * TEMPLATE_MAX);
  new Int32Array(line, 0, HEADER_WORDS)[FD] = -1;
  return line;
}

/** A thread's view of a line; each thread makes its own. */
export class RequestLine {
  private readonly words: Int32Array;
  private readonly naming: Uint8Array;
  private readonly plain: Uint8Array;
  private readonly requested: Int32Array;
  private readonly received: Int32Array;
  private readonly holder: number;
  /** This thread's request bytes (a template with the address filled in). */
  private readonly scratch = new Uint8Array(TEMPLATE_MAX);
  private readonly scratchView = new DataView(this.scratch.buffer);
  private readonly nap = new Int32Array(new SharedArrayBuffer(4));

  constructor(line: SharedArrayBuffer, requested: SharedArrayBuffer, received: SharedArrayBuffer, holder: number) {
    this.words = new Int32Array(line, 0, HEADER_WORDS);
    this.naming = new Uint8Array(line, HEADER_WORDS * 4, TEMPLATE_MAX);
    this.plain = new Uint8Array(line, HEADER_WORDS * 4 + TEMPLATE_MAX, TEMPLATE_MAX);
    this.requested = new Int32Array(requested);
    this.received = new Int32Array(received);
    this.holder = holder + 1;
  }

  /** Why the line was given up since the last publish (LineFailure). */
  get failure(): number {
    return Atomics.load(this.words, FAILED);
  }

  /** Requests written on a line, and their bytes, since it was created. */
  static written(line: SharedArrayBuffer): { requests: number; bytes: number } {
    const words = new Int32Array(line, 0, HEADER_WORDS);
    return { requests: Atomics.load(words, REQUESTS) >>> 0, bytes: Atomics.load(words, BYTES) >>> 0 };
  }

  /**
   * Ask for a page on the published connection, unless it was asked for there already. Called by
   * a vCPU after it has said which page it waits for, so an owner that publishes a new connection
   * meanwhile asks for it itself.
   */
  requestPage(page: number): number {
    if (Atomics.load(this.words, FD) < 0 || Atomics.load(this.words, SHUT) === 1) return LineResult.UNAVAILABLE;
    // A vCPU that finds the line busy for long hands its fault to the owner, which waits its turn.
    if (!this.lock(this.holder === LINE_OWNER + 1 ? OWNER_LOCK_MS : 5)) return LineResult.UNAVAILABLE;
    try {
      const fd = Atomics.load(this.words, FD);
      if (fd < 0 || Atomics.load(this.words, SHUT) === 1) return LineResult.UNAVAILABLE;
      if (isPageReceived(this.received, page)) return LineResult.DUPLICATE;
      const bit = 1 << (page & 31);
      if ((Atomics.or(this.requested, page >> 5, bit) & bit) !== 0) return LineResult.DUPLICATE;
      const named = Atomics.load(this.words, NAMED) === 1;
      const len = Atomics.load(this.words, named ? PLAIN_LEN : NAMING_LEN);
      this.scratch.set((named ? this.plain : this.naming).subarray(0, len));
      const at = Atomics.load(this.words, ADDR_OFFSET);
      const address = page * PAGE_BYTES;
      this.scratchView.setUint32(at, Math.floor(address / 2 ** 32));
      this.scratchView.setUint32(at + 4, address >>> 0);
      const failure = this.write(fd, len);
      if (failure !== LineFailure.NONE) {
        // Part of a request may be on the wire: the connection is unusable from here on.
        Atomics.store(this.words, FAILED, failure);
        Atomics.store(this.words, FD, -1);
        return LineResult.UNAVAILABLE;
      }
      Atomics.store(this.words, NAMED, 1);
      Atomics.add(this.words, REQUESTS, 1);
      Atomics.add(this.words, BYTES, len);
      return LineResult.SENT;
    } finally {
      this.unlock();
    }
  }

  /**
   * Owner: requests go to this connection from now on (`naming` names the block; `plain` is sent
   * once it has been named). Nothing is asked for on it yet.
   */
  publish(fd: number, naming: Uint8Array, plain: Uint8Array, addressOffset: number): void {
    if (naming.length > TEMPLATE_MAX || plain.length > TEMPLATE_MAX) throw new RangeError('page request template too long');
    this.ownerLock();
    try {
      if (Atomics.load(this.words, SHUT) === 1) return;
      this.requested.fill(0);
      this.naming.set(naming);
      this.plain.set(plain);
      Atomics.store(this.words, NAMING_LEN, naming.length);
      Atomics.store(this.words, PLAIN_LEN, plain.length);
      Atomics.store(this.words, ADDR_OFFSET, addressOffset);
      Atomics.store(this.words, NAMED, 0);
      Atomics.store(this.words, FAILED, LineFailure.NONE);
      Atomics.store(this.words, FD, fd);
    } finally {
      this.unlock();
    }
  }

  /** Owner: no more requests on the published connection; once this returns it may be closed. */
  retract(): void {
    this.ownerLock();
    Atomics.store(this.words, FD, -1);
    this.unlock();
  }

  /**
   * Main thread, before it ends the owner (which may be stuck holding the lock): nothing is
   * written on the line from now on, so the owner's end may close the descriptor. Returns false
   * while a vCPU is still mid-request (bounded by LINE_WRITE_TIMEOUT_MS): call it again shortly.
   */
  static shut(line: SharedArrayBuffer): boolean {
    const words = new Int32Array(line, 0, HEADER_WORDS);
    Atomics.store(words, SHUT, 1);
    // A vCPU takes the lock and then looks at SHUT: once none holds it, none will write.
    const held = Atomics.load(words, LOCK);
    return held === 0 || held === LINE_OWNER + 1;
  }

  /** Main thread: a new owner may publish (after shut() and the old owner's end). */
  static reopen(line: SharedArrayBuffer): void {
    const words = new Int32Array(line, 0, HEADER_WORDS);
    Atomics.store(words, FD, -1);
    // An owner that was ended may have held the lock; a vCPU that holds it lets go by itself.
    if (Atomics.compareExchange(words, LOCK, LINE_OWNER + 1, 0) === LINE_OWNER + 1) Atomics.notify(words, LOCK);
    Atomics.store(words, SHUT, 0);
  }

  /**
   * The owner's lock: a holder lets go within LINE_WRITE_TIMEOUT_MS, so one that has not after
   * OWNER_LOCK_MS is gone (a vCPU thread ended mid-request) and its lock is taken over.
   */
  private ownerLock(): void {
    if (!this.lock(OWNER_LOCK_MS)) Atomics.store(this.words, LOCK, this.holder);
  }

  private lock(timeoutMs: number): boolean {
    const deadline = performance.now() + timeoutMs;
    for (;;) {
      const held = Atomics.compareExchange(this.words, LOCK, 0, this.holder);
      if (held === 0) return true;
      if (performance.now() >= deadline) return false;
      Atomics.wait(this.words, LOCK, held, 1);
    }
  }

  private unlock(): void {
    Atomics.store(this.words, LOCK, 0);
    Atomics.notify(this.words, LOCK, 1);
  }

  /** Write the scratch bytes whole, waiting out a full send buffer for a bounded time. */
  private write(fd: number, len: number): number {
    let off = 0;
    let deadline = 0;
    while (off < len) {
      try {
        off += writeSync(fd, this.scratch, off, len - off);
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'EAGAIN') return LineFailure.WRITE_ERROR;
        const now = performance.now();
        if (deadline === 0) deadline = now + LINE_WRITE_TIMEOUT_MS;
        else if (now >= deadline) return LineFailure.STALLED;
        Atomics.wait(this.nap, 0, 0, 1);
      }
    }
    return LineFailure.NONE;
  }
}
