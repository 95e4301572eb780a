// Socket glue for the outgoing stream: one cork/writev per batch, backpressure honoured with one
// awaited 'drain' per batch, and the stream's failure surfaced as one error.

import type { Duplex } from 'node:stream';

export class StreamClosedError extends Error {
  readonly code = 'LM_ERR_CHANNEL_CLOSED';
}

export class StreamOut {
  readonly stream: Duplex;
  /** Bytes handed to the stream. */
  written = 0;
  private failure: Error | undefined;
  private readonly waiters = new Set<(err?: Error) => void>();
  private drainWaiter: (() => void) | undefined;

  constructor(stream: Duplex) {
    this.stream = stream;
    stream.on('drain', () => this.drainWaiter?.());
    stream.on('error', (err: Error) => this.fail(err));
    stream.on('close', () => this.fail(new StreamClosedError('the migration channel was closed')));
  }

  get error(): Error | undefined {
    return this.failure;
  }

  /** Fail every pending and future write (cancel, peer error). */
  fail(err: Error): void {
    if (this.failure !== undefined) return;
    this.failure = err;
    this.drainWaiter?.();
    for (const w of this.waiters) w(err);
    this.waiters.clear();
  }

  /** Wait until the stream fails (or forever, if it does not): for racing against other waits. */
  failed(): Promise<Error> {
    if (this.failure !== undefined) return Promise.resolve(this.failure);
    return new Promise((resolve) => this.waiters.add((e) => resolve(e!)));
  }

  /** Write a batch as one writev; resolves when the stream can take more. */
  async write(buffers: readonly Buffer[]): Promise<void> {
    if (this.failure !== undefined) throw this.failure;
    if (buffers.length === 0) return;
    const s = this.stream;
    let ok = true;
    s.cork();
    for (const b of buffers) {
      ok = s.write(b);
      this.written += b.length;
    }
    // Uncork on the next tick would batch more, but one batch is already ~256 KiB.
    s.uncork();
    if (!ok) await this.drain();
    if (this.failure !== undefined) throw this.failure;
  }

  private drain(): Promise<void> {
    if (this.failure !== undefined || !this.stream.writableNeedDrain) return Promise.resolve();
    return new Promise((resolve) => {
      this.drainWaiter = () => {
        this.drainWaiter = undefined;
        resolve();
      };
    });
  }

  /** Finish our side and wait until everything was flushed (file: and exec: channels). */
  async end(): Promise<void> {
    if (this.failure !== undefined) throw this.failure;
    await new Promise<void>((resolve, reject) => {
      this.stream.end(() => resolve());
      this.waiters.add((err) => reject(err ?? new StreamClosedError('channel closed before it was flushed')));
    });
  }
}
