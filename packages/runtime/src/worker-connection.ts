// A connection a worker thread owns, taken over by file descriptor from the thread that
// accepted or opened it (see detachFd): bytes that thread had read already come first.

import { writevSync } from 'node:fs';
import net from 'node:net';

/** The size of a worker connection's read buffer: a read takes at most this much. */
const READ_BUFFER_BYTES = 256 * 1024;

export interface HandedConnection {
  fd: number;
  tcp: boolean;
  /** Bytes read before the hand-over, handled before anything the descriptor brings. */
  pending: Uint8Array;
}

export class WorkerConnection {
  readonly socket: net.Socket;
  /** Ended, lost or closed: no more reading or writing. */
  done = false;
  /** Called once, just before the descriptor is closed (whatever closes it). */
  onClosing: (() => void) | undefined;
  private readonly onLost: (reason: string) => void;

  private readonly handed: HandedConnection;
  private readonly what: string;
  private readonly onData: (chunk: Buffer) => void;

  /**
   * `onData` gets every chunk (the pending bytes first) once start() is called; `onLost` once,
   * when the connection breaks or `onData` throws (`what` names it in the reason), not after close().
   * A chunk is valid only during the call: its memory is the connection's one read buffer, reused
   * by the next read (a decoder keeps what it has not decoded with retainUnread()).
   */
  constructor(handed: HandedConnection, what: string, onData: (chunk: Buffer) => void, onLost: (reason: string) => void) {
    this.handed = handed;
    this.what = what;
    this.onData = onData;
    this.onLost = onLost;
    // One read buffer for the connection's life: Node's own reads take a fresh 64 KiB allocation
    // each, which a worker's malloc arena gets from the kernel anew (page faults, zeroing) for
    // every small read: a page request, a requested page.
    const socket = new net.Socket({
      fd: handed.fd,
      readable: true,
      writable: true,
      allowHalfOpen: true,
      pauseOnCreate: true,
      onread: {
        buffer: Buffer.allocUnsafeSlow(READ_BUFFER_BYTES),
        callback: (n: number, buf: Uint8Array) => {
          this.deliver(Buffer.from(buf.buffer, buf.byteOffset, n));
          return !this.done;
        },
      },
    } as net.SocketConstructorOpts);
    this.socket = socket;
    if (handed.tcp) socket.setNoDelay(true);
    // Every way the descriptor gets closed goes through _destroy, including Node's own after a
    // read error, which runs before any 'error' listener would.
    const destroy = socket._destroy.bind(socket);
    socket._destroy = (err, cb) => {
      const closing = this.onClosing;
      this.onClosing = undefined;
      closing?.();
      destroy(err, cb);
    };
    socket.on('error', (err) => this.lose(`${what} failed: ${err.message}`));
    socket.on('close', () => this.lose(`${what} was closed by the peer`));
  }

  /** Deliver the pending bytes, then what arrives (call it once the caller's state refers to this). */
  start(): void {
    const p = this.handed.pending;
    if (p.byteLength > 0) this.deliver(Buffer.from(p.buffer, p.byteOffset, p.byteLength));
    if (!this.done) this.socket.resume();
  }

  private deliver(chunk: Buffer): void {
    if (this.done) return;
    try {
      this.onData(chunk);
    } catch (err) {
      this.lose(`${this.what}: ${(err as Error).message}`);
    }
  }

  /**
   * Write `bufs` in order: while nothing is queued in the socket, straight to the descriptor (one
   * writev, none of the stream's machinery on a latency path), and what the kernel does not take
   * now through the socket after it. `written` is called once all is handed over (or failed).
   */
  write(bufs: Uint8Array[], written?: () => void): void {
    const s = this.socket;
    let first = 0;
    if (s.writableLength === 0 && !s.destroyed && bufs.length > 0) {
      let n = 0;
      try {
        n = writevSync(this.handed.fd, bufs);
      } catch {
        // EAGAIN: the send buffer is full, and the socket waits for room. Anything else: the
        // socket's own write below fails the same way and reports it.
      }
      while (first < bufs.length && n >= bufs[first]!.length) n -= bufs[first++]!.length;
      if (first === bufs.length) {
        written?.();
        return;
      }
      if (n > 0) bufs[first] = bufs[first]!.subarray(n);
    }
    s.cork();
    for (let i = first; i < bufs.length; i++) {
      if (i === bufs.length - 1 && written !== undefined) s.write(bufs[i]!, () => written());
      else s.write(bufs[i]!);
    }
    s.uncork();
  }

  /** The connection broke: close it and report `reason` (once). */
  lose(reason: string): void {
    if (this.done) return;
    this.done = true;
    this.socket.destroy();
    this.onLost(reason);
  }

  /** Close it on purpose (nothing is reported). */
  close(): void {
    this.done = true;
    this.socket.destroy();
  }
}
