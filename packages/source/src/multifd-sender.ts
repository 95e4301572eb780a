// The source's multifd channels (wire-format.md §7.6): normal pages go out in packets of up to
// 128 pages of one block. Each channel encodes its packets' headers into its own reused slabs and
// queues the pages' data as views of guest RAM, one per run of contiguous pages (no copy): a
// packet of 128 contiguous pages is a header and one 512 KiB view. Measured on a two-core AMD
// EPYC machine, 1 GiB random guest, 2 channels, 3 × 3 interleaved runs: source main thread
// 273 against 366 ms per GiB with the pages copied into slabs, total 368 against 433 ms per GiB.
// Packets rotate over the channels. SYNC packets go on every channel where the dialect syncs: at each RAM section's end,
// or once per scan of RAM (dialect.ts). With the 9.0+ dialect zero pages ride in the packets too,
// as offsets the destination zeroes (no data).

import type { Duplex } from 'node:stream';
import { native } from '@livemig/native';
import {
  BatchWriter,
  SlabPool,
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
  /** The packets sealed for this channel since its last write: headers in slabs reused once written, pages as views. */
  w: BatchWriter;
}

/**
 * A channel's slabs hold only packet headers (~1 KiB each; the pages are views of RAM): 64 KiB
 * holds the headers of a few dozen packets, many batches' worth.
 */
const CHANNEL_SLAB_BYTES = 64 * 1024;
/**
 * Free channel slabs, shared by every channel of one migration after another: a source that
 * migrates again reuses them. The pool holds only slabs a migration used.
 */
const CHANNEL_SLABS = new SlabPool(CHANNEL_SLAB_BYTES, 1024 * 1024);

/** The multifd channels' slabs in this process: allocated so far, and free in the pool now. */
export function multifdSlabFigures(): { allocated: number; free: number } {
  return { allocated: CHANNEL_SLABS.allocated, free: CHANNEL_SLABS.free.length };
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
  /** Where each packet's header is encoded before it is copied into its channel's slab. */
  private readonly header = Buffer.alloc(MULTIFD_PACKET_HEADER_LENGTH);

  /** `initSent`: each channel's init packet went out when it was connected (multifdInitPacket). */
  constructor(streams: readonly Duplex[], { initSent = false }: { initSent?: boolean } = {}) {
    this.channels = streams.map((s, channelId) => {
      const ch: Channel = { out: new StreamOut(s, 'multifd', { writerThread: true }), w: new BatchWriter({ slabSize: CHANNEL_SLAB_BYTES, pool: CHANNEL_SLABS }) };
      if (!initSent) {
        const init = multifdInitPacket(channelId);
        ch.w.bytes(init);
        this.queuedBytes += init.length;
      }
      return ch;
    });
  }

  get channelCount(): number {
    return this.channels.length;
  }

  /** Slabs the channels have allocated so far: flat in the steady state (written slabs are reused). */
  get slabsAllocated(): number {
    let n = 0;
    for (const c of this.channels) n += c.w.slabsAllocated;
    return n;
  }

  /** Queue one normal page (its packet refers to guest RAM when sealed, see viewRuns). */
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
      writeMultifdPacketHeader(this.header, { flags: 0, packetNum: this.packetNum++, block: this.block }, this.offsets, this.count, this.zeroOffsets, this.zeroCount);
      ch.w.bytes(this.header);
      if (this.count > 0) this.viewRuns(ch.w);
      this.count = 0;
      this.zeroCount = 0;
    }
    if ((flags & MULTIFD_FLAG_SYNC) !== 0) {
      for (const ch of this.channels) {
        writeMultifdPacketHeader(this.header, { flags: MULTIFD_FLAG_SYNC, packetNum: this.packetNum++, block: '' }, this.offsets, 0);
        ch.w.bytes(this.header);
        this.queuedBytes += MULTIFD_PACKET_HEADER_LENGTH;
      }
    }
  }


  /**
   * The normal pages' data, as one view of guest RAM per run of contiguous pages. What goes out
   * is what RAM holds when the channel writes it: their bits were cleared before, so a guest write
   * from here on sends the page again, and a stopped guest's pages are final.
   */
  private viewRuns(w: BatchWriter): void {
    const mem = this.mem!;
    let runStart = this.offsets[0]!;
    let runEnd = runStart + TARGET_PAGE_SIZE;
    for (let i = 1; i < this.count; i++) {
      const o = this.offsets[i]!;
      if (o === runEnd) {
        runEnd += TARGET_PAGE_SIZE;
        continue;
      }
      w.view(mem, runStart, runEnd - runStart);
      runStart = o;
      runEnd = o + TARGET_PAGE_SIZE;
    }
    w.view(mem, runStart, runEnd - runStart);
  }

  /**
   * Hand every sealed packet to its channel (one writev each). Resolves when each channel has at
   * most one batch in flight, as the main channel's StreamOut does.
   */
  async flush(): Promise<void> {
    const writes: Promise<void>[] = [];
    for (const ch of this.channels) {
      const batch = ch.w.flushRefs();
      if (batch.bytes === 0) continue;
      this.written += batch.bytes;
      const w = ch.w;
      writes.push(ch.out.writeBatch(batch, 1, () => w.recycle(batch.pieces)));
    }
    if (writes.length > 0) await Promise.all(writes);
  }

  /**
   * Every sealed packet written at once to `fd` with the native writev, past the channels'
   * streams: the start-up warm-up's packets go to /dev/null this way (warm-up.ts).
   */
  writeSealedTo(fd: number): void {
    for (const ch of this.channels) {
      const batch = ch.w.flushRefs();
      // Counted as flush() counts (a field only flush() wrote would change this object's map).
      this.written += batch.bytes;
      if (batch.bytes > 0) native.writeRefs(fd, batch.pieces, batch.refs, batch.refCount, batch.sources, 0);
      ch.w.recycle(batch.pieces);
    }
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

  /** The migration is over: each channel's slabs go back to the shared pool (writer.ts release()). */
  release(): void {
    for (const c of this.channels) c.w.release();
  }

  destroy(): void {
    for (const c of this.channels) c.out.stream.destroy();
  }

  async end(): Promise<void> {
    await Promise.all(this.channels.map((c) => c.out.end()));
  }
}
