// The source's multifd channels (wire-format.md §7.6): normal pages go out in packets of up to
// 128 pages of one block, each packet a header plus views of guest RAM (one view per run of
// contiguous pages, so a sequential pass costs two iovecs per 512 KiB). Packets rotate over the
// channels. SYNC packets go on every channel where the dialect syncs: at each RAM section's end,
// or once per scan of RAM (dialect.ts). With the 9.0+ dialect zero pages ride in the packets too,
// as offsets the destination zeroes (no data).

import type { Duplex } from 'node:stream';
import {
  MULTIFD_FLAG_SYNC,
  MULTIFD_INIT_LENGTH,
  MULTIFD_PACKET_HEADER_LENGTH,
  MULTIFD_PAGES_PER_PACKET,
  TARGET_PAGE_SIZE,
  writeMultifdInit,
  writeMultifdPacketHeader,
} from '@livemig/protocol';
import { StreamOut } from './stream-out.ts';

interface Channel {
  out: StreamOut;
  /** Buffers of the packets sealed for this channel since its last write. */
  pending: Buffer[];
}

/** A multifd channel's first bytes: its init packet naming the channel. */
export function multifdInitPacket(channelId: number): Buffer {
  const init = Buffer.alloc(MULTIFD_INIT_LENGTH);
  // QEMU compares the UUID with its own (-uuid, all zeros by default); livemig guests have none.
  writeMultifdInit(init, { uuid: new Uint8Array(16), channelId });
  return init;
}

export class MultifdSender {
  private readonly channels: Channel[];
  private next = 0;
  private packetNum = 0;
  // The packet being filled: pages of one block.
  private block = '';
  private mem: Buffer | undefined;
  private readonly offsets = new Float64Array(MULTIFD_PAGES_PER_PACKET);
  private count = 0;
  private readonly zeroOffsets = new Float64Array(MULTIFD_PAGES_PER_PACKET);
  private zeroCount = 0;
  /** Bytes of headers and pages queued so far (sealed or in the open packet). */
  queuedBytes = 0;
  /** Bytes handed to the channels. */
  written = 0;

  /** `initSent`: each channel's init packet went out when it was connected (multifdInitPacket). */
  constructor(streams: readonly Duplex[], { initSent = false }: { initSent?: boolean } = {}) {
    this.channels = streams.map((s, channelId) => {
      const out = new StreamOut(s, 'multifd');
      if (initSent) return { out, pending: [] };
      const init = multifdInitPacket(channelId);
      this.queuedBytes += init.length;
      return { out, pending: [init] };
    });
  }

  get channelCount(): number {
    return this.channels.length;
  }

  /** Queue one normal page (a view of guest RAM is sent: what RAM holds at write time). */
  queuePage(block: string, mem: Buffer, offset: number): void {
    this.makeRoom(block, mem);
    this.offsets[this.count++] = offset;
    this.queuedBytes += TARGET_PAGE_SIZE;
  }

  /** Queue one zero page (an offset only: the destination zeroes it). */
  queueZeroPage(block: string, mem: Buffer, offset: number): void {
    this.makeRoom(block, mem);
    this.zeroOffsets[this.zeroCount++] = offset;
  }

  /** Seal the open packet when it is full or holds another block; count a new packet's header. */
  private makeRoom(block: string, mem: Buffer): void {
    const open = this.count + this.zeroCount;
    if (open === MULTIFD_PAGES_PER_PACKET || (open > 0 && (block !== this.block || mem !== this.mem))) this.seal(0);
    if (this.count + this.zeroCount === 0) this.queuedBytes += MULTIFD_PACKET_HEADER_LENGTH;
    this.block = block;
    this.mem = mem;
  }

  /** Close the open packet and queue a SYNC packet on every channel, without writing yet. */
  queueSync(): void {
    this.seal(MULTIFD_FLAG_SYNC);
  }

  /** Close the open packet (and with SYNC, send a SYNC packet on every channel). */
  private seal(flags: number): void {
    if (this.count + this.zeroCount > 0) {
      const ch = this.channels[this.next]!;
      this.next = (this.next + 1) % this.channels.length;
      const header = Buffer.allocUnsafe(MULTIFD_PACKET_HEADER_LENGTH);
      writeMultifdPacketHeader(header, { flags: 0, packetNum: this.packetNum++, block: this.block }, this.offsets, this.count, this.zeroOffsets, this.zeroCount);
      ch.pending.push(header);
      if (this.count > 0) this.queueRuns(ch);
      this.count = 0;
      this.zeroCount = 0;
    }
    if ((flags & MULTIFD_FLAG_SYNC) !== 0) {
      for (const ch of this.channels) {
        const header = Buffer.allocUnsafe(MULTIFD_PACKET_HEADER_LENGTH);
        writeMultifdPacketHeader(header, { flags: MULTIFD_FLAG_SYNC, packetNum: this.packetNum++, block: '' }, this.offsets, 0);
        ch.pending.push(header);
        this.queuedBytes += MULTIFD_PACKET_HEADER_LENGTH;
      }
    }
  }


  /** The normal pages' data: one view of guest RAM per run of contiguous pages. */
  private queueRuns(ch: Channel): void {
    const mem = this.mem!;
    let runStart = this.offsets[0]!;
    let runEnd = runStart + TARGET_PAGE_SIZE;
    for (let i = 1; i < this.count; i++) {
      const o = this.offsets[i]!;
      if (o === runEnd) {
        runEnd += TARGET_PAGE_SIZE;
        continue;
      }
      ch.pending.push(mem.subarray(runStart, runEnd));
      runStart = o;
      runEnd = o + TARGET_PAGE_SIZE;
    }
    ch.pending.push(mem.subarray(runStart, runEnd));
  }

  /**
   * Hand every sealed packet to its channel (one writev each). Resolves when each channel has at
   * most one batch in flight, as the main channel's StreamOut does.
   */
  async flush(): Promise<void> {
    const writes: Promise<void>[] = [];
    for (const ch of this.channels) {
      if (ch.pending.length === 0) continue;
      const bufs = ch.pending;
      ch.pending = [];
      for (const b of bufs) this.written += b.length;
      writes.push(ch.out.write(bufs));
    }
    if (writes.length > 0) await Promise.all(writes);
  }

  /** End of a RAM section: the open packet goes out, then a SYNC packet on every channel. */
  async sync(): Promise<void> {
    this.seal(MULTIFD_FLAG_SYNC);
    await this.flush();
  }

  /** Everything written out (before the migration may call itself complete). */
  async settle(): Promise<void> {
    await Promise.all(this.channels.map((c) => c.out.settle()));
  }

  /** The first channel failure, if any. */
  get error(): Error | undefined {
    for (const c of this.channels) if (c.out.error !== undefined) return c.out.error;
    return undefined;
  }

  failed(): Promise<Error> {
    return Promise.race(this.channels.map((c) => c.out.failed()));
  }

  destroy(): void {
    for (const c of this.channels) c.out.stream.destroy();
  }

  async end(): Promise<void> {
    await Promise.all(this.channels.map((c) => c.out.end()));
  }
}
