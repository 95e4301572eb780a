// The sending side of a `file:` channel written by position (mapped-ram, QEMU 9.0+).

import { close, closeSync, constants as fsConstants, ftruncateSync, openSync, writeSync, writev } from 'node:fs';
import { Duplex } from 'node:stream';
import { ChannelError, RuntimeErrorCode } from './errors.ts';

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

export async function openPositionedFile(path: string, offset: number, text: string): Promise<Duplex> {
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
