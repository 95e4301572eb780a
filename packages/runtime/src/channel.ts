// Migration channels as Node duplex streams (wire-format.md §1.1). The main channel carries the
// stream source → destination; the return path is the reverse direction of the same stream, so
// every channel here is a Duplex, even where one side can only ever be empty (`file:`).
//
//   sending side    connectChannel(address)   tcp: unix: fd: exec: file:
//   receiving side  listenChannel(address)    tcp: unix:  (first connection only, then stops listening)

import { spawn, type ChildProcess } from 'node:child_process';
import { close, closeSync, constants as fsConstants, createWriteStream, ftruncateSync, openSync, writeSync, writev } from 'node:fs';
import { access, open } from 'node:fs/promises';
import net from 'node:net';
import { Duplex, type Readable, type Writable } from 'node:stream';
import { formatAddress, toAddress, type MigrationAddress } from './address.ts';
import { ChannelError, RuntimeErrorCode } from './errors.ts';
import { listenServer } from './listen.ts';
import { secureClientSide, type TlsClientOptions } from './tls.ts';

/** Node's static-buffer read mode: `callback(n, buffer)` sees `buffer[0..n)`, valid only during the call. */
export interface OnreadOptions {
  buffer: Uint8Array | (() => Uint8Array);
  /** Return false to pause the socket (resume() it to go on). */
  callback: (bytesWritten: number, buffer: Uint8Array) => boolean;
}

export interface ConnectChannelOptions {
  /** Bound on the tcp/unix connect (ms). Default 10 000. */
  connectTimeoutMs?: number;
  /** Static-buffer reads for tcp:, unix: and fd: channels. */
  onread?: OnreadOptions;
  /** Keep our side writable after the peer ends its side. Default false (Node's default). */
  allowHalfOpen?: boolean;
  /** TCP_NODELAY for tcp: (default true: return-path page requests must not wait for Nagle). */
  noDelay?: boolean;
  /**
   * What to do with an `exec:` command's stderr: keep the last 4 KiB for the error message
   * ('capture', default), pass it through to ours ('inherit'), or drop it ('ignore').
   */
  execStderr?: 'capture' | 'inherit' | 'ignore';
  /**
   * `file:` only: a file written by position (mapped-ram), a {@link PositionedFileChannel} —
   * the stream may skip ahead, and pages are written at their own offsets.
   */
  positioned?: boolean;
  /**
   * TLS over tcp:/unix: (parameter tls-creds): the promise resolves once the handshake has
   * authenticated the destination, within `connectTimeoutMs`. Not with `onread`.
   */
  tls?: TlsClientOptions;
}

export interface ListenChannelOptions {
  /** Read the accepted connection in static-buffer mode (see {@link acceptWithOnread}). */
  onread?: OnreadOptions;
  /** Give up waiting for the connection after this many ms. Default: wait until close(). */
  acceptTimeoutMs?: number;
  /** Keep our side writable after the peer ends its side. Default false. */
  allowHalfOpen?: boolean;
  /** TCP_NODELAY on the accepted tcp connection. Default true. */
  noDelay?: boolean;
}

export interface ChannelListener {
  /** What was actually bound (port 0 → the chosen port). */
  readonly address: MigrationAddress;
  /** The same as text, e.g. `tcp:127.0.0.1:40123`. */
  readonly addressText: string;
  /** The first accepted connection. The listener stops listening once it has one. */
  readonly accepted: Promise<net.Socket>;
  /** Stop listening; `accepted` rejects with LM_ERR_CHANNEL_CLOSED if nothing was accepted yet. */
  close(): Promise<void>;
}

const DEFAULT_CONNECT_TIMEOUT_MS = 10_000;
// Enough of a failing command's stderr to say why; the rest went by already.
const STDERR_TAIL_BYTES = 4096;

/**
 * Open the sending side of a channel. tcp:/unix: connect within `connectTimeoutMs`; `fd:N` wraps
 * an inherited socket or pipe; `exec:CMD` runs `/bin/sh -c CMD` (we write its stdin and read its
 * stdout; a non-zero exit destroys the stream with LM_ERR_EXEC_FAILED); `file:PATH[,offset=N]`
 * truncates PATH to N bytes and writes from there (its readable side is empty).
 */
export async function connectChannel(
  address: string | MigrationAddress,
  options: ConnectChannelOptions = {},
): Promise<Duplex> {
  const addr = toAddress(address);
  const text = formatAddress(addr);
  if (options.onread !== undefined && (addr.transport === 'exec' || addr.transport === 'file')) {
    throw new ChannelError(RuntimeErrorCode.UNSUPPORTED_TRANSPORT, `onread is not available for ${addr.transport}: channels`);
  }
  if (options.tls !== undefined) {
    if (addr.transport !== 'tcp' && addr.transport !== 'unix') {
      throw new ChannelError(RuntimeErrorCode.UNSUPPORTED_TRANSPORT, `TLS (tls-creds) needs a tcp: or unix: migration address, not ${addr.transport}:`);
    }
    const tls = options.tls;
    if (options.onread !== undefined) throw new ChannelError(RuntimeErrorCode.INVALID_ARGUMENT, 'onread cannot read through TLS (use pumpOnread)');
    const socket = await connectSocket(addr, text, options);
    // QEMU checks the URI's host when tls-hostname is empty.
    const hostname = tls.hostname !== undefined && tls.hostname !== '' ? tls.hostname : addr.transport === 'tcp' ? addr.host : undefined;
    return secureClientSide(socket, { creds: tls.creds, hostname }, text, options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS);
  }
  switch (addr.transport) {
    case 'tcp':
    case 'unix':
      return connectSocket(addr, text, options);
    case 'fd':
      return openFd(addr.fd, text, options);
    case 'exec':
      return spawnExec(addr.command, text, options.execStderr ?? 'capture');
    case 'file':
      return options.positioned === true ? openPositionedFile(addr.path, addr.offset, text) : openFile(addr.path, addr.offset, text);
    case 'defer':
      throw new ChannelError(RuntimeErrorCode.UNSUPPORTED_TRANSPORT, 'cannot connect to "defer": it is a destination-only address');
  }
}

function connectSocket(
  addr: Extract<MigrationAddress, { transport: 'tcp' | 'unix' }>,
  text: string,
  options: ConnectChannelOptions,
): Promise<net.Socket> {
  if (addr.transport === 'tcp' && addr.port === 0) {
    throw new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot connect to ${text}: port 0 is only for listening`);
  }
  const timeoutMs = options.connectTimeoutMs ?? DEFAULT_CONNECT_TIMEOUT_MS;
  return new Promise((resolve, reject) => {
    const common: net.ConnectOpts & { allowHalfOpen?: boolean } = { allowHalfOpen: options.allowHalfOpen ?? false };
    if (options.onread !== undefined) common.onread = options.onread;
    const socket =
      addr.transport === 'tcp'
        ? net.connect({ ...common, host: addr.host === '' ? 'localhost' : addr.host, port: addr.port, noDelay: options.noDelay ?? true })
        : net.connect({ ...common, path: addr.path });
    const timer = setTimeout(() => {
      socket.off('connect', onConnect).off('error', onError);
      socket.destroy();
      reject(new ChannelError(RuntimeErrorCode.CHANNEL_TIMEOUT, `connect to ${text} timed out after ${timeoutMs} ms`));
    }, timeoutMs);
    const onConnect = (): void => {
      clearTimeout(timer);
      socket.off('error', onError);
      resolve(socket);
    };
    const onError = (err: Error): void => {
      clearTimeout(timer);
      socket.off('connect', onConnect);
      socket.destroy();
      reject(new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `connect to ${text} failed: ${err.message}`, { cause: err }));
    };
    socket.once('connect', onConnect).once('error', onError);
  });
}

function openFd(fd: number, text: string, options: ConnectChannelOptions): net.Socket {
  // SocketConstructorOpts lacks `onread` in @types/node 20, but the constructor honours it.
  const ctorOptions: net.SocketConstructorOpts & { onread?: OnreadOptions } = {
    fd,
    readable: true,
    writable: true,
    allowHalfOpen: options.allowHalfOpen ?? false,
  };
  if (options.onread !== undefined) ctorOptions.onread = options.onread;
  try {
    return new net.Socket(ctorOptions);
  } catch (err) {
    // A regular file, a closed fd or a tty: net.Socket only wraps sockets and pipes.
    throw new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot use ${text}: ${(err as Error).message}`, { cause: err });
  }
}

/**
 * A Duplex whose writes go to `sink` (batched writes stay batched: _writev corks the sink).
 * Subclasses decide what the readable side carries.
 */
abstract class SinkDuplex extends Duplex {
  protected readonly sink: Writable;

  constructor(sink: Writable) {
    // allowHalfOpen: the end of our readable side must not end the writes.
    super({ allowHalfOpen: true });
    this.sink = sink;
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, cb: (err?: Error | null) => void): void {
    this.sink.write(chunk, (err) => this.settleWrite(err, cb));
  }

  override _writev(chunks: Array<{ chunk: Buffer }>, cb: (err?: Error | null) => void): void {
    const sink = this.sink;
    const last = chunks.length - 1;
    sink.cork();
    for (let i = 0; i < last; i++) sink.write((chunks[i] as { chunk: Buffer }).chunk);
    sink.write((chunks[last] as { chunk: Buffer }).chunk, (err) => this.settleWrite(err, cb));
    sink.uncork();
  }

  override _final(cb: (err?: Error | null) => void): void {
    this.sink.end((err?: Error | null) => this.settleWrite(err, cb));
  }

  protected settleWrite(err: Error | null | undefined, cb: (err?: Error | null) => void): void {
    cb(err ?? null);
  }
}

/** `exec:` channel: writes go to the child's stdin, reads come from its stdout. */
class ExecChannel extends SinkDuplex {
  readonly child: ChildProcess;
  readonly #text: string;
  readonly #stdout: Readable;
  #stderrTail: Buffer[] = [];
  #stderrBytes = 0;
  /** Resolved at the child's 'close' with the failure to report, or null for a clean exit. */
  readonly #exited: Promise<Error | null>;

  constructor(child: ChildProcess, text: string) {
    if (child.stdin === null || child.stdout === null) throw new Error('exec channel needs piped stdin and stdout');
    super(child.stdin);
    this.child = child;
    this.#text = text;
    const stdout = child.stdout;
    this.#stdout = stdout;
    stdout.on('data', (chunk: Buffer) => {
      if (!this.push(chunk)) stdout.pause();
    });
    // EPIPE and friends are reported with the exit status (see settleWrite), which says more.
    child.stdin.on('error', () => {});
    child.stderr?.on('data', (chunk: Buffer) => this.#keepStderr(chunk));
    this.#exited = new Promise((resolve) => {
      child.once('close', (code: number | null, signal: NodeJS.Signals | null) => {
        if (code === 0) resolve(null);
        else resolve(this.#exitError(code, signal));
      });
    });
    child.on('error', (err) => {
      this.destroy(new ChannelError(RuntimeErrorCode.EXEC_FAILED, `${text}: ${err.message}`, { cause: err }));
    });
    void this.#exited.then((err) => {
      // The readable side ends only once the exit status is known, so a reader that saw 'end'
      // knows the command succeeded.
      if (err === null) this.push(null);
      else this.destroy(err);
    });
  }

  override _read(): void {
    this.#stdout.resume();
  }

  protected override settleWrite(err: Error | null | undefined, cb: (err?: Error | null) => void): void {
    if (err === null || err === undefined) {
      cb(null);
      return;
    }
    // A write failed because the command went away: wait for its status and report that.
    void this.#exited.then((exitErr) =>
      cb(
        exitErr ??
          new ChannelError(RuntimeErrorCode.EXEC_FAILED, `${this.#text}: write to the command failed: ${err.message}`, {
            cause: err,
          }),
      ),
    );
  }

  override _destroy(err: Error | null, cb: (err: Error | null) => void): void {
    // SIGTERM to the shell, as QEMU does on cancel; our ends of all three pipes close so a
    // grandchild that keeps them open cannot keep this process alive.
    if (this.child.exitCode === null && this.child.signalCode === null) this.child.kill('SIGTERM');
    this.child.stdin?.destroy();
    this.child.stdout?.destroy();
    this.child.stderr?.destroy();
    cb(err);
  }

  #keepStderr(chunk: Buffer): void {
    this.#stderrTail.push(chunk);
    this.#stderrBytes += chunk.length;
    while (this.#stderrBytes - (this.#stderrTail[0]?.length ?? 0) >= STDERR_TAIL_BYTES) {
      this.#stderrBytes -= (this.#stderrTail.shift() as Buffer).length;
    }
  }

  #exitError(code: number | null, signal: NodeJS.Signals | null): ChannelError {
    const how = code !== null ? `exited with status ${code}` : `was killed by ${signal ?? 'a signal'}`;
    let tail = Buffer.concat(this.#stderrTail).toString('utf8');
    if (tail.length > STDERR_TAIL_BYTES) tail = tail.slice(-STDERR_TAIL_BYTES);
    tail = tail.trim();
    return new ChannelError(RuntimeErrorCode.EXEC_FAILED, `${this.#text} ${how}${tail === '' ? '' : `: ${tail}`}`);
  }
}

async function spawnExec(command: string, text: string, stderr: 'capture' | 'inherit' | 'ignore'): Promise<Duplex> {
  const child = spawn('/bin/sh', ['-c', command], {
    stdio: ['pipe', 'pipe', stderr === 'capture' ? 'pipe' : stderr],
  });
  await new Promise<void>((resolve, reject) => {
    const onSpawn = (): void => {
      child.off('error', onError);
      resolve();
    };
    const onError = (err: Error): void => {
      child.off('spawn', onSpawn);
      reject(new ChannelError(RuntimeErrorCode.EXEC_FAILED, `${text}: cannot run /bin/sh: ${err.message}`, { cause: err }));
    };
    child.once('spawn', onSpawn).once('error', onError);
  });
  return new ExecChannel(child, text);
}

/** `file:` channel: write-only; the readable side ends at once. */
class FileChannel extends SinkDuplex {
  constructor(sink: Writable) {
    super(sink);
    sink.on('error', (err) => this.destroy(err));
    this.push(null);
    // Flowing, so 'end' is emitted without a reader and finished()/'close' work as for sockets.
    this.resume();
  }

  override _read(): void {}

  override _final(cb: (err?: Error | null) => void): void {
    // Report completion once the descriptor is closed, not merely when the last write returned.
    this.sink.once('close', () => cb(null));
    this.sink.end();
  }

  override _destroy(err: Error | null, cb: (err: Error | null) => void): void {
    this.sink.destroy();
    cb(err);
  }
}

async function openFile(path: string, offset: number, text: string): Promise<Duplex> {
  // As QEMU 9.0+ does: O_CREAT|O_WRONLY, 0600, then ftruncate(offset) so bytes before the offset
  // (a header someone else wrote) survive and anything after it does not, then write from offset.
  let handle;
  try {
    handle = await open(path, fsConstants.O_CREAT | fsConstants.O_WRONLY, 0o600);
  } catch (err) {
    throw new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot open ${text}: ${(err as Error).message}`, { cause: err });
  }
  try {
    await handle.truncate(offset);
  } catch (err) {
    await handle.close().catch(() => {});
    throw new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot truncate ${text} to offset ${offset}: ${(err as Error).message}`, {
      cause: err,
    });
  }
  return new FileChannel(createWriteStream('', { fd: handle, start: offset, autoClose: true }));
}

/**
 * A `file:` channel written by position: the stream's bytes go at `position` (advancing), the
 * stream can skip ahead (`skipTo`) over a region written out of line, and `writeAt` puts bytes at
 * any offset (mapped-ram's pages and bitmaps, QEMU 9.0+). Out-of-line writes are synchronous
 * pwrites on the same descriptor; skipTo must come when every stream write so far has completed.
 */
export class PositionedFileChannel extends Duplex {
  readonly fd: number;
  /** File offset of the next stream byte. */
  position: number;
  private readonly text: string;

  constructor(fd: number, start: number, text: string) {
    super({ allowHalfOpen: true });
    this.fd = fd;
    this.position = start;
    this.text = text;
    this.push(null);
    this.resume();
  }

  override _read(): void {}

  override _writev(chunks: Array<{ chunk: Buffer }>, cb: (err?: Error | null) => void): void {
    const bufs = chunks.map((c) => c.chunk);
    let bytes = 0;
    for (const b of bufs) bytes += b.length;
    const at = this.position;
    this.position += bytes;
    writev(this.fd, bufs, at, (err) => cb(err === null ? null : new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `write to ${this.text} failed: ${err.message}`, { cause: err })));
  }

  override _write(chunk: Buffer, _encoding: BufferEncoding, cb: (err?: Error | null) => void): void {
    this._writev([{ chunk }], cb);
  }

  /** The stream goes on at `offset` (after a region written out of line). */
  skipTo(offset: number): void {
    if (offset < this.position) throw new ChannelError(RuntimeErrorCode.INVALID_ARGUMENT, `cannot skip back from ${this.position} to ${offset} in ${this.text}`);
    this.position = offset;
  }

  /** Write `buf` at file offset `offset`, now (a page run or a bitmap). */
  writeAt(buf: Uint8Array, offset: number): void {
    for (let done = 0; done < buf.length; ) done += writeSync(this.fd, buf, done, buf.length - done, offset + done);
  }

  override _final(cb: (err?: Error | null) => void): void {
    close(this.fd, (err) => cb(err));
  }

  override _destroy(err: Error | null, cb: (err: Error | null) => void): void {
    if (!this.writableFinished) close(this.fd, () => cb(err));
    else cb(err);
  }
}

async function openPositionedFile(path: string, offset: number, text: string): Promise<Duplex> {
  // A plain descriptor, owned and closed by the channel (a FileHandle would close it on GC).
  let fd = -1;
  try {
    fd = openSync(path, fsConstants.O_CREAT | fsConstants.O_WRONLY, 0o600);
    ftruncateSync(fd, offset);
  } catch (err) {
    if (fd >= 0) closeSync(fd);
    throw new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot open ${text} for writing: ${(err as Error).message}`, { cause: err });
  }
  return new PositionedFileChannel(fd, offset, text);
}

/**
 * Listen for the receiving side of a channel on `tcp:` or `unix:`. Resolves as soon as the address
 * is bound; `accepted` resolves with the first connection, after which the listener closes.
 */
export async function listenChannel(
  address: string | MigrationAddress,
  options: ListenChannelOptions = {},
): Promise<ChannelListener> {
  const addr = toAddress(address);
  const onread = options.onread;
  const server = net.createServer({ allowHalfOpen: options.allowHalfOpen ?? false, pauseOnConnect: onread !== undefined });
  const bound = await listenServer(server, addr);
  const text = formatAddress(bound);
  const noDelay = options.noDelay ?? true;

  let settled = false;
  let timer: NodeJS.Timeout | undefined;
  let rejectAccept: (err: Error) => void = () => {};
  const accepted = new Promise<net.Socket>((resolve, reject) => {
    rejectAccept = (err) => {
      if (settled) return;
      settled = true;
      server.off('connection', onConnection);
      reject(err);
    };
    const onConnection = (socket: net.Socket): void => {
      if (settled) {
        socket.destroy();
        return;
      }
      settled = true;
      if (timer !== undefined) clearTimeout(timer);
      server.off('connection', onConnection);
      server.close();
      try {
        const s = onread === undefined ? socket : adoptWithOnread(socket, onread, { allowHalfOpen: options.allowHalfOpen ?? false });
        if (bound.transport === 'tcp') s.setNoDelay(noDelay);
        resolve(s);
      } catch (err) {
        socket.destroy();
        reject(err);
      }
    };
    server.on('connection', onConnection);
  });
  // The caller may never look at `accepted` (e.g. it closes the listener first).
  accepted.catch(() => {});
  if (options.acceptTimeoutMs !== undefined) {
    const ms = options.acceptTimeoutMs;
    timer = setTimeout(() => {
      rejectAccept(new ChannelError(RuntimeErrorCode.CHANNEL_TIMEOUT, `no connection on ${text} within ${ms} ms`));
      server.close();
    }, ms);
  }

  return {
    address: bound,
    addressText: text,
    accepted,
    close: () =>
      new Promise<void>((resolve) => {
        if (timer !== undefined) clearTimeout(timer);
        rejectAccept(new ChannelError(RuntimeErrorCode.CHANNEL_CLOSED, `listener on ${text} closed before a connection arrived`));
        if (!server.listening) {
          resolve();
          return;
        }
        server.close(() => resolve());
      }),
  };
}

/**
 * Wait for the first connection on `server` and hand it back reading in static-buffer mode.
 * `server` must have been created with `{ pauseOnConnect: true }`, so no byte is read into a
 * buffer of Node's own before the switch. Later connections are left to other listeners.
 */
export function acceptWithOnread(
  server: net.Server,
  onread: OnreadOptions,
  options: { timeoutMs?: number; allowHalfOpen?: boolean } = {},
): Promise<net.Socket> {
  if ((server as net.Server & { pauseOnConnect?: boolean }).pauseOnConnect !== true) {
    return Promise.reject(
      new ChannelError(RuntimeErrorCode.INVALID_ARGUMENT, 'acceptWithOnread needs a server created with { pauseOnConnect: true }'),
    );
  }
  return new Promise((resolve, reject) => {
    let timer: NodeJS.Timeout | undefined;
    const cleanup = (): void => {
      if (timer !== undefined) clearTimeout(timer);
      server.off('connection', onConnection).off('close', onClose);
    };
    const onConnection = (socket: net.Socket): void => {
      cleanup();
      try {
        resolve(adoptWithOnread(socket, onread, { allowHalfOpen: options.allowHalfOpen ?? true }));
      } catch (err) {
        socket.destroy();
        reject(err);
      }
    };
    const onClose = (): void => {
      cleanup();
      reject(new ChannelError(RuntimeErrorCode.CHANNEL_CLOSED, 'server closed before a connection arrived'));
    };
    server.on('connection', onConnection).once('close', onClose);
    if (options.timeoutMs !== undefined) {
      const ms = options.timeoutMs;
      timer = setTimeout(() => {
        cleanup();
        reject(new ChannelError(RuntimeErrorCode.CHANNEL_TIMEOUT, `no connection within ${ms} ms`));
      }, ms);
    }
  });
}

/**
 * Take a connected socket's file descriptor away from this thread, for a worker thread to own
 * (`new net.Socket({ fd })` there). Reading stops; bytes already read but not consumed (a socket
 * without a 'data' listener keeps them) are returned, to be handled before what the fd brings.
 * The handle is left orphaned, never closed here: the worker closes the descriptor. Relies on
 * the private `_handle` (Node 20).
 */
export function detachFd(socket: net.Socket): { fd: number; pending: Buffer } {
  const s = socket as net.Socket & { _handle: { fd?: number; readStop?(): number } | null };
  const handle = s._handle;
  const fd = handle?.fd;
  if (handle === null || typeof fd !== 'number' || fd < 0) {
    throw new ChannelError(RuntimeErrorCode.INVALID_ARGUMENT, 'socket has no file descriptor to hand over (closed, or not a Unix socket or TCP connection)');
  }
  handle.readStop?.();
  // Without its handle the socket cannot start reading again (read() below would otherwise), and
  // destroy() only does the bookkeeping (a server's connection count).
  s._handle = null;
  const chunks: Buffer[] = [];
  for (let c = socket.read() as Buffer | null; c !== null; c = socket.read() as Buffer | null) chunks.push(c);
  s.destroy();
  return { fd, pending: Buffer.concat(chunks) };
}

/**
 * Re-wrap a paused, freshly accepted socket so it reads in static-buffer mode. Node only takes
 * `onread` at construction, so the libuv handle moves to a new net.Socket (works on Node 20; it
 * relies on the private `_handle`). Writes on the result go out on the same connection.
 */
export function adoptWithOnread(
  socket: net.Socket,
  onread: OnreadOptions,
  options: { allowHalfOpen?: boolean } = {},
): net.Socket {
  const old = socket as net.Socket & { _handle: unknown };
  const handle = old._handle;
  if (handle === null || handle === undefined) {
    throw new ChannelError(RuntimeErrorCode.INVALID_ARGUMENT, 'socket has no handle to adopt (already closed or adopted)');
  }
  old._handle = null;
  // With its handle gone, destroy() only does the bookkeeping: the server's connection count
  // drops (so server.close() can finish) and nothing is closed underneath us.
  old.destroy();
  const ctorOptions = {
    handle,
    readable: true,
    writable: true,
    allowHalfOpen: options.allowHalfOpen ?? true,
    onread,
  } as unknown as net.SocketConstructorOpts;
  const adopted = new net.Socket(ctorOptions);
  adopted.resume();
  return adopted;
}

/**
 * An incoming stream from a file (`file:PATH[,offset=N]`, QEMU 9.0+) or a command's output
 * (`exec:CMD`), as a readable socket: a child process (`cat`/`tail`, or `/bin/sh -c CMD`) writes it
 * into a pipe, so the destination reads it exactly as it reads a connection (onread, backpressure,
 * 'end' when it is all there).
 */
export async function openIncomingPipe(
  address: Extract<MigrationAddress, { transport: 'file' | 'exec' }>,
): Promise<{ stdout: net.Socket; child: ChildProcess; text: string }> {
  const text = formatAddress(address);
  let argv: string[];
  if (address.transport === 'file') {
    try {
      await access(address.path, fsConstants.R_OK);
    } catch (err) {
      throw new ChannelError(RuntimeErrorCode.CHANNEL_OPEN, `cannot open ${text}: ${(err as Error).message}`, { cause: err });
    }
    argv = address.offset === 0 ? ['cat', '--', address.path] : ['tail', '-c', `+${address.offset + 1}`, '--', address.path];
  } else {
    argv = ['/bin/sh', '-c', address.command];
  }
  const child = spawn(argv[0]!, argv.slice(1), { stdio: ['ignore', 'pipe', 'inherit'] });
  await new Promise<void>((resolve, reject) => {
    child.once('spawn', resolve).once('error', (err) => reject(new ChannelError(RuntimeErrorCode.EXEC_FAILED, `${text}: cannot run ${argv[0]}: ${err.message}`, { cause: err })));
  });
  return { stdout: child.stdout as net.Socket, child, text };
}
