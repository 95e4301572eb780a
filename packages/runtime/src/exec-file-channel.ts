// The sending side of `exec:` and `file:` channels: a Duplex over a child's stdin/stdout, or over
// a file written in order. (A file written by position is positioned-file-channel.ts.)

import { spawn, type ChildProcess } from 'node:child_process';
import { constants as fsConstants, createWriteStream } from 'node:fs';
import { open } from 'node:fs/promises';
import { Duplex, type Readable, type Writable } from 'node:stream';
import { ChannelError, RuntimeErrorCode } from './errors.ts';

// Enough of a failing command's stderr to say why; the rest went by already.
const STDERR_TAIL_BYTES = 4096;

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

export async function spawnExec(command: string, text: string, stderr: 'capture' | 'inherit' | 'ignore'): Promise<Duplex> {
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

export async function openFile(path: string, offset: number, text: string): Promise<Duplex> {
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
