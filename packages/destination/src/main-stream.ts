// The byte pump of the main channel: socket reads (Node's static-buffer mode, one reused 1 MiB
// buffer) → StreamDecoder → guest RAM, one copy per page. Decoder events go to the incoming
// adapter one by one; it says after each whether to decode on (the machine's readsStream).

import type net from 'node:net';
import { native } from '@livemig/native';
import { keepForProcessLife } from '@livemig/runtime';
import type { MainReader } from './channels.ts';
import { warmUpMultifd } from './warm-up.ts';
import type { PostcopyFaults } from './postcopy-faults.ts';
import type { StreamLoader } from './stream-loader.ts';
import {
  BatchWriter,
  coded,
  type DecoderEvent,
  type FaultPath,
  type MigrationError,
  MigCmd,
  NEED_MORE,
  PAGE_RECORD_HEADER,
  PostcopyState,
  RamRecordWriter,
  StreamDecoder,
  type StreamDecoderOptions,
  streamDialect,
  TARGET_PAGE_SIZE,
  writeConfiguration,
  writeEos,
  writeMemSize,
  writeSectionFooter,
  writeSectionHeader,
  writeStreamHeader,
} from '@livemig/protocol';

/**
 * Runs of page records copied into guest RAM by the native addon, one call per run, where it is
 * built (RamRecordDecoderOptions.placePages); else the record loop copies each page.
 */
const PLACE_PAGES = native.available ? native.placePages : undefined;

const READ_BUFFER_BYTES = 1024 * 1024;
/**
 * Page records decoded at start-up (16 MiB): enough for V8 to optimise the per-page path. Cold,
 * a migration's first 32 MiB took ~45 ms in the read callback (~7 ms once warm); warmed, ~19.
 */
const WARM_UP_PAGES = 4096;
/** Pages of each of the warm-up's two blocks (its sections are built once, then sent again and again). */
const WARM_UP_BLOCK_PAGES = 64;
/** Page records per warm-up section: a part section ends with EOS and a footer, as a source's do. */
const WARM_UP_SECTION_PAGES = 48;
/**
 * ZERO records per round for pages of a third block never written: the run a fresh or sparse
 * guest sends most (RamSaver's known-zero runs), which the decoder skips in skipStillZeroRun.
 */
const WARM_UP_ZERO_RUN = 256;
/**
 * Read sizes of the warm-up: large ones as a busy socket gives, and small ones, so that records
 * straddle reads and the reader holds several chunks at once (its slower paths), as on a socket.
 * A path first taken during the migration costs a deoptimisation and a new compile there.
 */
const WARM_UP_VARIED_READS = [262_144, 131_072 + 4_000, 1_500, 65_536 + 100, 8, 9_000, 700, 4_100, 37, 30_011];
/**
 * Between two of those, twenty reads of 12,000 bytes (about three page records, cut at a
 * different place in a record each time): 1,261 reads over the warm-up instead of 362. A 256
 * MiB migration reads ~900 times here, and the code run once per read (StreamDecoder.retainUnread,
 * ByteReader.copyTo) became hot only there, so V8 compiled it during the migration. perf, 256 MiB
 * one-stream migrations into fresh destinations, 8 each way alternating: a compiler thread's CPU
 * inside the migration 17-34 ms (mean 22) before, 2-15 ms (mean 9) with these reads; the warm-up
 * took 60-73 ms against 31-52 (5 starts each).
 */
const WARM_UP_SMALL_READ = 12_000;
const WARM_UP_SMALL_READS_BETWEEN = 20;
const WARM_UP_READS = WARM_UP_VARIED_READS.flatMap((bytes) => [bytes, ...Array<number>(WARM_UP_SMALL_READS_BETWEEN).fill(WARM_UP_SMALL_READ)]);
/** Streams the warm-up decodes, each from its header: the records a stream starts with are decoded a few times too. */
const WARM_UP_STREAMS = 4;
/** Main-channel reads while a vCPU waits for a page far from the background stream (postcopy). */
const FAULT_READ_BYTES = 64 * 1024;

export interface MainStreamHooks {
  /** Whether the machine takes the main channel's bytes at all (not once the stream is complete). */
  takesBytes(): boolean;
  /** Whether to decode on (not while finishing, waiting for multifd SYNCs, paused or ended). */
  readsStream(): boolean;
  /** Where postcopy faults go, once postcopy listens. */
  faultPath(): FaultPath | undefined;
  event(ev: DecoderEvent): void;
  failed(err: unknown): void;
  /** The main connection now. */
  socket(): net.Socket | undefined;
}

export class MainStream implements MainReader {
  /** When the main channel last brought bytes (the keepalive's measurement, ms). */
  lastByteAtMs = 0;
  private decoder: StreamDecoder;
  private readonly faults: PostcopyFaults;
  private readonly loader: StreamLoader;
  private readonly hooks: MainStreamHooks;
  private readonly readBuffer = Buffer.allocUnsafeSlow(READ_BUFFER_BYTES + 8);
  /**
   * readBuffer from byte 0 … 7: a read lands so that the page data in it sits at the same offset
   * mod 8 as its place in guest RAM. V8 copies into shared memory word by word only then; else
   * ByteReader.copyTo goes through a bounce buffer (~550 against ~400 ns a page here).
   */
  private readonly alignedReads = Array.from({ length: 8 }, (_, shift) => this.readBuffer.subarray(shift, shift + READ_BUFFER_BYTES));
  /** The start of readBuffer: where reads go while a vCPU waits for a page (postcopy). */
  private readonly readSlice = this.readBuffer.subarray(0, FAULT_READ_BYTES);

  constructor(faults: PostcopyFaults, loader: StreamLoader, hooks: MainStreamHooks) {
    this.faults = faults;
    this.loader = loader;
    this.hooks = hooks;
    this.decoder = this.makeDecoder();
    this.warmUp();
    warmUpMultifd();
  }

  /**
   * Decode a made-up stream into blocks of shared memory of its own, through the reads and the
   * decoder the migration uses, so that its first megabytes find that code optimised: part
   * sections of page records over two blocks (named and CONTINUE records), ZERO records for pages
   * never written and for pages written, a run of ZERO records over a third block never written,
   * EOS and footers, read in pieces that split records wherever a socket may. Costs ~60-75 ms
   * once, when the process starts, before a source can connect. With only page records in large
   * reads, each migration deoptimised readRecords, copyTo and be32 and compiled them again: 256
   * MiB, 8 runs each interleaved, medians: CPU (all destination threads) 135 → 88 ms, total-time
   * 151 → 130 ms. Without the zero runs, an all-zero guest's 65 536 ZERO records were skipped by
   * unoptimised code, then two compiler threads took both cores from the main thread while they
   * optimised it (e2e/warm-up.test.ts keeps all of it so).
   */
  private warmUp(): void {
    const w = new BatchWriter();
    const rec = new RamRecordWriter();
    const page = Buffer.alloc(TARGET_PAGE_SIZE, 0xa5);
    const blockBytes = WARM_UP_BLOCK_PAGES * TARGET_PAGE_SIZE;
    writeStreamHeader(w);
    writeConfiguration(w, { machineType: 'none' });
    writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
    const zeroBlockBytes = WARM_UP_ZERO_RUN * TARGET_PAGE_SIZE;
    writeMemSize(w, [
      { idstr: 'warm-up-a', length: blockBytes },
      { idstr: 'warm-up-b', length: blockBytes },
      { idstr: 'warm-up-z', length: zeroBlockBytes },
    ]);
    writeEos(w);
    writeSectionFooter(w, 2);
    const head = w.flushConcat();
    const roundStart = w.totalBytes;
    // One round of sections: consecutive pages of block a and, after every fourth, a page of
    // block b (each switch names its block), a ZERO record for a page of b never written
    // (skipped) and one for a page of a that was (cleared). The runs of a's pages between go to
    // the native placer where it is built: the switches keep the record loop hot enough to be
    // optimised too.
    let pagesInRound = 0;
    for (let p = 0, inSection = 0; p < WARM_UP_BLOCK_PAGES; p++, inSection++) {
      if (inSection === 0) writeSectionHeader(w, { kind: 'part', sectionId: 2 });
      const at = p * TARGET_PAGE_SIZE;
      rec.page(w, 'warm-up-a', at, page, 0);
      pagesInRound++;
      if (p % 4 === 3) {
        rec.page(w, 'warm-up-b', at, page, 0);
        rec.zeroPage(w, 'warm-up-b', ((p + 1) % WARM_UP_BLOCK_PAGES) * TARGET_PAGE_SIZE);
        rec.zeroPage(w, 'warm-up-a', at);
        pagesInRound++;
      }
      if (inSection === WARM_UP_SECTION_PAGES - 1 || p === WARM_UP_BLOCK_PAGES - 1) {
        writeEos(w);
        writeSectionFooter(w, 2);
        rec.forgetBlock();
        inSection = -1;
      }
    }
    // Then a section of one run of ZERO records over block z, whose pages are never written.
    writeSectionHeader(w, { kind: 'part', sectionId: 2 });
    rec.zeroPage(w, 'warm-up-z', 0);
    // Where its CONTINUE records start (each a header word and the fill byte).
    const continuedZerosAt = w.totalBytes - roundStart;
    const continuedZeroBytes = PAGE_RECORD_HEADER + 1;
    rec.zeroPages(w, 'warm-up-z', TARGET_PAGE_SIZE, WARM_UP_ZERO_RUN - 1);
    writeEos(w);
    writeSectionFooter(w, 2);
    rec.forgetBlock();
    const round = w.flushConcat();
    w.release();
    const memory = [blockBytes, blockBytes, zeroBlockBytes].map((bytes) => Buffer.from(new SharedArrayBuffer(bytes)));
    const rounds = Math.ceil(WARM_UP_PAGES / WARM_UP_STREAMS / pagesInRound);
    // Each stream's first reads end where a page's data starts (after the part section's header
    // and a named record's), then where the next one's does (a page wholly in the next chunk),
    // then 4 and 2 bytes into a record's header (a header across chunks).
    const firstData = head.length + 5 + 8 + 1 + 'warm-up-a'.length;
    const firstReads = [firstData, PAGE_RECORD_HEADER + TARGET_PAGE_SIZE, TARGET_PAGE_SIZE + 4, TARGET_PAGE_SIZE + 6];
    // And in the first round, a read ends between a CONTINUE ZERO record's word and its fill byte
    // (the fifth CONTINUE record's), which the record loop then reads from the next chunk.
    const zeroFillCut = head.length + continuedZerosAt + 4 * continuedZeroBytes + PAGE_RECORD_HEADER;
    let read = 0;
    for (let stream = 0; stream < WARM_UP_STREAMS; stream++) {
      for (const m of memory) m.fill(0);
      const decoder = new StreamDecoder({ ram: { attachBlocks: () => memory }, postcopyPageHooks: true, zeroedMemory: true, placePages: PLACE_PAGES });
      // It stays reachable (with its options, target and memory): the code it optimises would
      // be thrown away with it.
      keepForProcessLife(decoder);
      const total = head.length + rounds * round.length;
      let source = head;
      let at = 0;
      for (let sent = 0, inStream = 0; sent < total; read++, inStream++) {
        const into = this.alignedReads[decoder.bufferedBytes & 7]!;
        let n = 0;
        let want = Math.min(firstReads[inStream] ?? WARM_UP_READS[read % WARM_UP_READS.length]!, total - sent);
        if (sent < zeroFillCut && sent + want > zeroFillCut) want = zeroFillCut - sent;
        while (n < want) {
          if (at === source.length) {
            source = round;
            at = 0;
          }
          const take = Math.min(want - n, source.length - at);
          source.copy(into, n, at, at + take);
          n += take;
          at += take;
        }
        sent += n;
        decoder.push(into.subarray(0, n));
        while (decoder.next() !== NEED_MORE);
        decoder.retainUnread();
      }
    }
  }

  get bytesReceived(): number {
    return this.decoder.streamOffset + this.decoder.bufferedBytes;
  }

  get ramBlocks(): StreamDecoder['ramBlocks'] {
    return this.decoder.ramBlocks;
  }

  /** A postcopy recovery channel: a new stream without header, in the state we were in. */
  restartForRecovery(): void {
    this.decoder = this.makeDecoder(this.decoder);
    this.lastByteAtMs = performance.now();
  }

  /** A decoder for the first connection, or for a postcopy recovery channel. */
  private makeDecoder(resume?: StreamDecoder): StreamDecoder {
    const options: StreamDecoderOptions = {
      ram: this.faults.mainTarget(),
      postcopyPageHooks: true,
      // QEMU 10.0 sources send SWITCHOVER_START (command 11) before the final state.
      maxCommand: MigCmd.SWITCHOVER_START + 1,
      deviceLayout: (s, kind) => this.loader.deviceLayout(s, kind),
      // Machine types up to 2.3 send no footers (nor a configuration record).
      expectFooters: streamDialect(this.loader.machineType).sectionFooters,
      // Guest RAM is fresh (never run) until the stream has been loaded.
      zeroedMemory: resume === undefined,
      placePages: PLACE_PAGES,
    };
    if (resume !== undefined) {
      options.resume = { postcopyState: PostcopyState.RUNNING, sections: resume.knownSections(), blocks: resume.ramBlocks };
      options.startOffset = 0;
    }
    return new StreamDecoder(options);
  }

  /**
   * Where the main channel's next read lands. With a preempt channel read here, while a vCPU waits
   * for a page, reads shrink to FAULT_READ_BYTES so the event loop gets to the fault path (its
   * request, the preempt channel) after ~50 µs of background decoding, not a megabyte's worth.
   */
  readonly buffer = (): Buffer => {
    // The undecoded bytes end a record short; a page record's data starts 8 bytes (its word)
    // after the record's start, so in a run of page records (4,104 bytes each) every page's
    // data is then 8-aligned. Other records only cost the bounce copy until the next read.
    this.readInto = this.urgentFault() ? this.readSlice : this.alignedReads[this.decoder.bufferedBytes & 7]!;
    return this.readInto;
  };
  /** What buffer() gave last: the next callback's bytes are at its start. */
  private readInto: Buffer = this.readBuffer;

  private urgentFault(): boolean {
    const faults = this.hooks.faultPath();
    return faults !== undefined && this.faults.readsPreemptHere && this.faults.urgent(faults);
  }

  /** onread callback: the bytes are valid only during this call. */
  readonly callback = (n: number): boolean => {
    if (!this.hooks.takesBytes()) return false;
    this.lastByteAtMs = performance.now();
    try {
      this.decoder.push(this.readInto.subarray(0, n));
      const drained = this.drainEvents();
      const faults = this.hooks.faultPath();
      if (faults !== undefined) this.faults.afterRead(faults);
      // Keep only the undecoded tail: the read buffer is reused by the next read.
      this.decoder.retainUnread();
      if (!drained) return false;
      const socket = this.hooks.socket();
      // (With or without a preempt channel: the yield is for the fault path's request too.)
      if (socket !== undefined && faults !== undefined && this.faults.urgent(faults)) {
        // Postcopy: libuv reads up to 32 buffers in a row; while a vCPU waits for a page, let
        // the fault path (its page request, the preempt channel) in after every read.
        setImmediate(() => {
          if (this.hooks.socket() === socket && this.hooks.readsStream()) socket.resume();
        });
        return false;
      }
      return true;
    } catch (err) {
      this.hooks.failed(err);
      return false;
    }
  };

  /**
   * Bytes read off the connection before it became the main channel (the handshake check): they
   * are decoded first. Returns false when the socket must stay paused (as the onread callback).
   */
  feed(bytes: Buffer): boolean {
    if (!this.hooks.takesBytes()) return false;
    this.lastByteAtMs = performance.now();
    try {
      this.decoder.push(bytes);
      const drained = this.drainEvents();
      this.decoder.retainUnread();
      return drained;
    } catch (err) {
      this.hooks.failed(err);
      return false;
    }
  }

  /** Handle the decoder's events until it needs bytes (true) or the machine stops reading (false: pause the socket). */
  private drainEvents(): boolean {
    if (!this.hooks.readsStream()) return false;
    for (let ev = this.decoder.next(); ev !== NEED_MORE; ev = this.decoder.next()) {
      this.hooks.event(ev);
      if (!this.hooks.readsStream()) return false;
    }
    return true;
  }

  /** Multifd: the channels' SYNCs are in; decode what is buffered and read on. */
  resumeReading(): void {
    try {
      const socket = this.hooks.socket();
      if (this.drainEvents() && socket !== undefined) {
        this.decoder.retainUnread();
        socket.resume();
      }
    } catch (err) {
      this.hooks.failed(err);
    }
  }

  /** The source ended its side: undefined when the stream was complete, else the decoder's reason. */
  end(): MigrationError | undefined {
    try {
      this.decoder.end();
      return undefined;
    } catch (err) {
      return coded(err) as MigrationError;
    }
  }
}
