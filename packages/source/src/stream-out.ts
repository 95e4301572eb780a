// Socket glue for the outgoing stream: one cork/writev per batch, backpressure honoured by
// waiting for an earlier batch's write to complete (one batch in flight while the next is
// encoded), and the stream's failure surfaced as one error.
//
// A batch with guest pages by reference (RefBatch) goes to a plain TCP or unix socket through the
// native addon's writev while Node has nothing queued on it: the kernel copies each page from
// guest RAM, with no copy into a slab and no Node write entry per page. When the socket is full,
// Node writes the next chunk (it waits for room as for any write) and the native writev goes on
// after it, so ordering, backpressure and errors stay Node's. Elsewhere (TLS, files, no addon)
// the refs go to Node as views.
//
// With `writerThread` (multifd channels) the batches go to a native writer thread of the
// channel's own instead, from the first batch that finds Node's queue empty: it writes them in
// order, waits for room itself and reports each batch once written, so the kernel's copy of the
// pages runs beside the main thread and every channel on a core of its own. From then on every
// write of the stream goes through that thread (Node writes nothing more on it until end()).

import { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import { TLSSocket } from 'node:tls';
import { type ChannelWriter, native } from '@livemig/native';
import { type ChannelRole, type RefBatch, refBatchBuffers, TransportError } from '@livemig/protocol';
import { socketFd } from '@livemig/runtime';

const NO_REFS = new Float64Array(0);
const NO_SOURCES: readonly ArrayBufferView[] = [];

export class StreamOut {
  readonly stream: Duplex;
  /** Bytes handed to the stream. */
  written = 0;
  /** Bytes the kernel has taken (whole batches): progress that proves the link still drains. */
  accepted = 0;
  private failure: Error | undefined;
  private readonly waiters = new Set<(err?: Error) => void>();
  /** Settles with the failure, once (shared by every wait that races against it). */
  private readonly failure$: Promise<Error>;

  /**
   * `role` names the connection in the errors it reports. `peerEndIsLoss`: the peer never ends
   * the connection before we do (its end is a failure even when every byte was written).
   */
  constructor(stream: Duplex, role: ChannelRole, options: { peerEndIsLoss?: boolean; writerThread?: boolean } = {}) {
    this.stream = stream;
    this.failure$ = new Promise((resolve) => this.waiters.add((e) => resolve(e!)));
    stream.on('error', (err: Error) => this.fail(TransportError.lost(role, `the ${role} channel failed: ${err.message}${tlsHint(stream, err)}`, err)));
    stream.on('close', () => {
      // A stream we ended and that wrote everything (file:, exec:) closes as it should. A peer's
      // FIN ends our side too (Node's allowHalfOpen: false) and finishes it: where the peer
      // never closes first (a main channel with a return path: SHUT comes before its FIN), that
      // is a lost link, not an end. Node finishes a stream whose bytes all went through the
      // writer thread: batches that thread had not written yet are lost too.
      const peerEnded = !this.endedHere && options.peerEndIsLoss === true;
      // The thread writes on a duplicate of the descriptor: the socket is closed once it stops.
      this.closeWriter();
      if (peerEnded || !stream.writableFinished || this.threadBatches.length > 0) {
        this.fail(TransportError.lost(role, peerEnded ? `the ${role} channel was closed by the peer` : `the ${role} channel was closed`));
      }
    });
    this.role = role;
    if (stream.destroyed) this.fail(TransportError.lost(role, `the ${role} channel was closed`));
    this.takesRefs = native.available && stream instanceof Socket && !(stream instanceof TLSSocket);
    this.wantsWriterThread = this.takesRefs && options.writerThread === true;
  }

  /**
   * Whether batches with refs go out through the native writev (a plain socket and the addon
   * built): pages are then best queued by reference (BatchWriter.view) rather than copied.
   */
  readonly takesRefs: boolean;
  /** Bytes the native writev handed to the kernel, and the batches it could not finish. */
  nativeBytes = 0;
  nativePartial = 0;

  private readonly role: ChannelRole;
  private readonly wantsWriterThread: boolean;
  /** The channel's writer thread, once a batch opened it (closed with the stream, or at end()). */
  private writer: ChannelWriter | undefined;
  /** Batches handed to the writer thread and not yet reported written, oldest first. */
  private readonly threadBatches: { bytes: number; taken: () => void; written: (() => void) | undefined }[] = [];
  /** Batches the writer thread has reported written. */
  private threadWritten = 0;
  /** end() was called: a close after everything was written is the end we asked for. */
  private endedHere = false;

  get error(): Error | undefined {
    return this.failure;
  }

  /** Fail every pending and future write (cancel, peer error). */
  fail(err: Error): void {
    if (this.failure !== undefined) return;
    this.failure = err;
    for (const w of this.waiters) w(err);
    this.waiters.clear();
  }

  /** Wait until the stream fails (or forever, if it does not): for racing against other waits. */
  failed(): Promise<Error> {
    return this.failure$;
  }

  /** Batches handed to the stream and not yet written out, oldest first. */
  private readonly inFlight: Promise<void>[] = [];

  /**
   * Write a batch as one writev. Resolves once at most `maxInFlight` batches are still queued:
   * with one batch in flight the next is encoded while the kernel drains this one, instead of
   * the two taking turns. `written` runs once the kernel has taken the whole batch (not after a
   * failure): then its memory may be reused (BatchWriter.recycle).
   */
  async write(buffers: readonly Buffer[], maxInFlight = 1, written?: () => void): Promise<void> {
    this.refuseClosed();
    if (this.failure !== undefined) throw this.failure;
    if (buffers.length === 0) return;
    if (this.writer !== undefined) return this.writeOnThread(this.writer, buffers, NO_REFS, 0, NO_SOURCES, maxInFlight, written);
    const s = this.stream;
    let done!: () => void;
    const taken = new Promise<void>((resolve) => (done = resolve));
    s.cork();
    const last = buffers.length - 1;
    let batchBytes = 0;
    for (const b of buffers) batchBytes += b.length;
    for (let i = 0; i <= last; i++) {
      const b = buffers[i]!;
      if (i === last) {
        s.write(b, (err) => {
          done();
          if (err == null) {
            this.accepted += batchBytes;
            written?.();
          }
        });
      }
      else s.write(b);
      this.written += b.length;
    }
    s.uncork();
    this.inFlight.push(taken);
    while (this.inFlight.length > maxInFlight) {
      const oldest = this.inFlight.shift()!;
      await Promise.race([oldest, this.failed()]);
      if (this.failure !== undefined) throw this.failure;
    }
    if (this.failure !== undefined) throw this.failure;
  }

  /**
   * Write a flushed batch (BatchWriter.flushRefs) as write() does; `written` runs once all of it
   * has been taken, as there. Through the native writev, a full socket is waited for by Node: it
   * writes the next chunk once the kernel has room, and the native writev goes on after it, so
   * nothing is copied; such a batch resolves once it is all written.
   */
  async writeBatch(batch: RefBatch, maxInFlight = 1, written?: () => void): Promise<void> {
    if (batch.refCount === 0) return this.write(batch.pieces, maxInFlight, written);
    this.refuseClosed();
    if (this.failure !== undefined) throw this.failure;
    const thread = this.writer ?? (this.wantsWriterThread ? this.openWriter() : undefined);
    if (thread !== undefined) return this.writeOnThread(thread, batch.pieces, batch.refs, batch.refCount, batch.sources, maxInFlight, written);
    let fd = this.idleFd();
    if (fd === undefined) return this.write(refBatchBuffers(batch), maxInFlight, written);
    let done = 0;
    for (;;) {
      done += this.writeNative(fd, batch, done);
      if (done === batch.bytes) break;
      // The socket is full (or failed: Node's write meets that too and reports it as usual).
      this.nativePartial++;
      const chunk = refBatchBuffers(batch, done, 1);
      await this.write(chunk, 0);
      done += chunk[0]!.length;
      if (done === batch.bytes) break;
      fd = this.idleFd();
      if (fd === undefined) {
        await this.write(refBatchBuffers(batch, done), 0);
        break;
      }
    }
    written?.();
  }

  /**
   * A write to a stream already closed (its 'close' event may be still to come) is a lost link:
   * Node would drop it with no error event, and a migration would send on into nothing.
   */
  private refuseClosed(): void {
    if (this.stream.destroyed && this.failure === undefined) this.fail(TransportError.lost(this.role, `the ${this.role} channel was closed`));
  }

  /** The writer thread, when Node has nothing queued on the socket (undefined otherwise: this batch goes through Node). */
  private openWriter(): ChannelWriter | undefined {
    const fd = this.idleFd();
    if (fd === undefined) return undefined;
    this.writer = native.openChannelWriter(fd, (n, errno) => this.threadReported(n, errno));
    return this.writer;
  }

  /** Hand a batch to the writer thread; resolves as write() does (at most `maxInFlight` batches still queued). */
  private async writeOnThread(
    thread: ChannelWriter,
    pieces: readonly ArrayBufferView[],
    refs: Float64Array,
    refCount: number,
    sources: readonly ArrayBufferView[],
    maxInFlight: number,
    written: (() => void) | undefined,
  ): Promise<void> {
    const bytes = thread.push(pieces, refs, refCount, sources);
    this.written += bytes;
    this.inFlight.push(new Promise<void>((taken) => this.threadBatches.push({ bytes, taken, written })));
    while (this.inFlight.length > maxInFlight) {
      const oldest = this.inFlight.shift()!;
      await Promise.race([oldest, this.failed()]);
      if (this.failure !== undefined) throw this.failure;
    }
    if (this.failure !== undefined) throw this.failure;
  }

  /** The writer thread's report: `count` batches written since it opened; `errno` once it failed. */
  private threadReported(count: number, errno: string | undefined): void {
    while (this.threadWritten < count) {
      const b = this.threadBatches.shift()!;
      this.threadWritten++;
      this.accepted += b.bytes;
      this.nativeBytes += b.bytes;
      b.written?.();
      b.taken();
    }
    if (errno !== undefined) {
      this.fail(TransportError.lost(this.role, `the ${this.role} channel failed: write ${errno}`));
      this.stream.destroy();
    }
  }

  /** Stop the writer thread; what it wrote before it stopped counts as written, even if its report had not come. */
  private closeWriter(): void {
    const w = this.writer;
    if (w === undefined) return;
    this.writer = undefined;
    const written = w.close();
    if (written !== undefined) this.threadReported(written, undefined);
  }

  /** The native writev of `batch` from byte `skip`: the bytes the kernel took (0 on a socket error). */
  private writeNative(fd: number, batch: RefBatch, skip: number): number {
    let taken = 0;
    try {
      taken = native.writeRefs(fd, batch.pieces, batch.refs, batch.refCount, batch.sources, skip);
    } catch (err) {
      // A socket error: Node's own write of what is left meets it too and reports it. Anything
      // else (a batch writeRefs refuses) is a bug, not the link's failure.
      if (typeof (err as { errno?: unknown }).errno !== 'string') throw err;
    }
    this.written += taken;
    this.accepted += taken;
    this.nativeBytes += taken;
    return taken;
  }

  /**
   * The socket's descriptor when the native writev may write to it now: nothing of ours queued
   * in Node (so the bytes keep their order), not corked, open.
   */
  private idleFd(): number | undefined {
    if (!this.takesRefs) return undefined;
    const s = this.stream as Socket;
    if (s.writableLength !== 0 || s.writableCorked !== 0 || s.destroyed || s.writableEnded || s.connecting) return undefined;
    return socketFd(s);
  }

  /** Wait until everything handed over has been written (or the stream failed). */
  async settle(): Promise<void> {
    while (this.inFlight.length > 0) await Promise.race([this.inFlight.shift()!, this.failed()]);
    if (this.failure !== undefined) throw this.failure;
  }

  /** Finish our side and wait until everything was flushed (file: and exec: channels). */
  async end(): Promise<void> {
    if (this.failure !== undefined) throw this.failure;
    if (this.writer !== undefined) {
      // Node writes (its FIN) only after the thread has written everything and stopped.
      await this.settle();
      this.closeWriter();
    }
    this.endedHere = true;
    await new Promise<void>((resolve, reject) => {
      this.stream.end(() => resolve());
      this.waiters.add((err) => reject(err ?? TransportError.lost(this.role, `the ${this.role} channel closed before it was flushed`)));
    });
  }
}

/**
 * With TLS 1.3 the client's handshake is over before the server has judged its certificate: a
 * destination that refuses it (verify-peer, tls-authz) just closes, and we see EPIPE/ECONNRESET.
 */
function tlsHint(stream: Duplex, err: Error): string {
  const errno = (err as NodeJS.ErrnoException).code;
  if ((stream as { encrypted?: boolean }).encrypted !== true || (errno !== 'EPIPE' && errno !== 'ECONNRESET')) return '';
  return ' (over TLS: the destination may have refused this source\'s certificate or tls-authz; its log names why)';
}
