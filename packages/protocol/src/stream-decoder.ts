// Incremental decoder of a QEMU_VM_FILE stream (wire-format.md §§2–6, 10).
//
//   push(chunk) … next() → event | NEED_MORE … end()
//
//   HEADER → CONFIG? → RECORD ─┬─ START/FULL/PART/END → RAM records | device data → FOOTER → RECORD
//                              ├─ COMMAND (PACKAGED: records of the blob at depth 1) → RECORD
//                              └─ EOF → AFTER_EOF → VMDESCRIPTION? → DONE
//
// Every record is peeked whole before any of it is consumed, so a short read leaves no partial
// state and any chunking (one byte at a time included) yields the same events. Every length read
// off the wire is checked against a limit before anything is allocated for it.
//
// Page data is not turned into events: the decoder copies each page once, from the receive
// chunk straight into the block memory the RamTarget handed it, and counts records per block.

import { inflateSync } from 'node:zlib';
import { checkCommandHeader, decodeCommand, type CommandInfo, COMMAND_HEADER_LENGTH } from './command.ts';
import {
  ENCODING_FLAG_XBZRLE,
  MIG_CMD_MAX_7_2,
  MigCmd,
  PostcopyState,
  type PostcopyStateValue,
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  QEMU_VM_FILE_VERSION_COMPAT,
  RAM_SECTION_VERSION,
  RamFlag,
  RecordType,
  type SectionKind,
  TARGET_PAGE_SIZE,
} from './constants.ts';
import { ErrorCode, type ErrorCodeValue, ProtocolError } from './errors.ts';
import { COMPRESS_PAGE_MAX, type RamBlockInfo } from './ram.ts';
import { ByteReader } from './reader.ts';
import { FOOTER_LENGTH } from './stream.ts';
import { xbzrleDecode, xbzrleLastFault } from './xbzrle.ts';

export const NEED_MORE: unique symbol = Symbol('need more bytes');
export type NeedMore = typeof NEED_MORE;

/** Where decoded pages go. */
export interface RamTarget {
  /**
   * The stream's block list arrived (MEM_SIZE). Return each block's memory (at least its
   * length), or undefined to count its pages without storing them. Throw a ConfigError to
   * refuse the list.
   */
  attachBlocks(blocks: readonly RamBlockInfo[], streamOffset: number): readonly (Uint8Array | undefined)[];
  /** A page was written (called once per ZERO/PAGE/XBZRLE/COMPRESS record that acceptPage did not refuse). */
  pagePlaced?(blockIndex: number, pageOffset: number): void;
  /**
   * Whether to write this page at all (postcopy: a page the guest already has and may have
   * changed since must not be overwritten by a late copy). Called before each page is placed.
   */
  acceptPage?(blockIndex: number, pageOffset: number): boolean;
}

export interface SectionIdentity {
  sectionId: number;
  idstr: string;
  instanceId: number;
  versionId: number;
}

export interface RamSectionStats {
  zero: number;
  normal: number;
  xbzrle: number;
  compressed: number;
  /** Page records that named their block. */
  named: number;
  /** Page records with CONTINUE. */
  continued: number;
  multifdFlush: number;
  eosOffset: number;
}

export interface SectionRecord extends SectionIdentity {
  sectionKind: SectionKind;
  /** Offset of the type byte. */
  offset: number;
  dataOffset: number;
  dataLength: number;
  /** Offset of the footer, or -1 when the stream has no footers. */
  footerOffset: number;
  /** Offset after the footer. */
  end: number;
  depth: number;
  /** RAM sections: record counts. */
  ram?: RamSectionStats;
  /** Device sections: a copy of the data. */
  data?: Buffer;
  /** How a device section's length was found. */
  layout?: 'declared' | 'footer-scan';
}

export interface ConfigurationRecord {
  offset: number;
  end: number;
  machineType: string;
  subsections: { offset: number; name: string; version: number }[];
  capabilities?: string[];
  uuid?: string;
  targetPageBits?: number;
}

export type DecoderEvent =
  | { kind: 'header'; offset: number; version: number }
  | ({ kind: 'configuration' } & ConfigurationRecord)
  | { kind: 'sectionStart'; section: SectionIdentity; sectionKind: SectionKind; offset: number; dataOffset: number; depth: number }
  | { kind: 'ramBlocks'; offset: number; total: number; blocks: RamBlockInfo[] }
  | ({ kind: 'sectionEnd' } & SectionRecord)
  | { kind: 'command'; offset: number; depth: number; command: CommandInfo }
  | { kind: 'packageEnd'; offset: number; reason: 'eof' | 'run' | 'exhausted' }
  | { kind: 'eof'; offset: number; depth: number }
  | { kind: 'vmdescription'; offset: number; length: number; json: string };

export interface BlockStats {
  idstr: string;
  length: number;
  zeroPages: number;
  normalPages: number;
  xbzrlePages: number;
  compressedPages: number;
}

/**
 * Length of a device section's data when its layout is known (a VMDESCRIPTION, or a device of
 * ours); 'be32-prefixed': the data is a be32 length and that many bytes (livemig's own
 * variable-size devices); undefined: find the footer by scanning.
 */
export type DeviceLayout = (section: SectionIdentity) => number | 'be32-prefixed' | undefined;

export interface StreamDecoderOptions {
  ram?: RamTarget;
  deviceLayout?: DeviceLayout;
  /** Sections carry footers (machine types newer than 2.3). Default true. */
  expectFooters?: boolean;
  /** Largest device section data accepted, bytes. Default 16 MiB. */
  maxSectionBytes?: number;
  /** Largest VMDESCRIPTION accepted, bytes. Default 16 MiB. */
  maxVmdescBytes?: number;
  /** Largest total RAM a block list may announce, bytes. Default 1 TiB. */
  maxRamBytes?: number;
  /** Most RAM blocks in a block list. Default 1024. */
  maxRamBlocks?: number;
  /** Most distinct sections. Default 65536. */
  maxSections?: number;
  /** First command number refused: 11 for QEMU 7.2 (default), 12 to accept SWITCHOVER_START. */
  maxCommand?: number;
  /** Capability x-ignore-shared (else learned from the configuration record). */
  ignoreShared?: boolean;
  /**
   * Start without header and configuration (a postcopy recovery channel), in this postcopy
   * state, with these already known sections and blocks.
   */
  resume?: { postcopyState: PostcopyStateValue; sections: readonly SectionIdentity[]; blocks: readonly RamBlockInfo[] };
  /** Offset of the first byte pushed (for a resumed channel). Default 0. */
  startOffset?: number;
  /**
   * A postcopy preempt channel: bare RAM records (no header, sections or footers) for the blocks
   * of `resume`, ended by one EOS.
   */
  bareRam?: boolean;
  /**
   * The memory attachBlocks returns is all zero to begin with (a fresh destination): a ZERO
   * record for a page this stream never wrote is then skipped instead of clearing 4 KiB.
   */
  zeroedMemory?: boolean;
  /**
   * Call the target's acceptPage/pagePlaced only once this stream's postcopy state is LISTENING
   * (a destination: precopy pays nothing per page for them). Default false: for every page.
   */
  postcopyPageHooks?: boolean;
}

/** Decoder states. */
const S = {
  HEADER: 0,
  CONFIG: 1,
  RECORD: 2,
  RAM: 3,
  DEVICE: 4,
  FOOTER: 5,
  SKIP_PACKAGE: 6,
  AFTER_EOF: 7,
  DONE: 8,
} as const;
type S = (typeof S)[keyof typeof S];

interface OpenSection extends SectionIdentity {
  sectionKind: SectionKind;
  offset: number;
  dataOffset: number;
  isRam: boolean;
  stats: RamSectionStats | undefined;
  declaredLength: number | undefined;
  /** The data starts with its own be32 length (declaredLength is set once that is read). */
  prefixed: boolean;
  layout: 'declared' | 'footer-scan';
  scanFrom: number;
}

const TYPE_MASK = TARGET_PAGE_SIZE - 1;
const EMPTY_STATS = (): RamSectionStats => ({
  zero: 0,
  normal: 0,
  xbzrle: 0,
  compressed: 0,
  named: 0,
  continued: 0,
  multifdFlush: 0,
  eosOffset: -1,
});

export class StreamDecoder {
  private readonly r: ByteReader;
  private readonly ram: RamTarget | undefined;
  private readonly deviceLayout: DeviceLayout | undefined;
  private readonly expectFooters: boolean;
  private readonly maxSectionBytes: number;
  private readonly maxVmdescBytes: number;
  private readonly maxRamBytes: number;
  private readonly maxRamBlocks: number;
  private readonly maxSections: number;
  private readonly maxCommand: number;
  private ignoreShared: boolean;

  private state: S = S.HEADER;
  private failure: ProtocolError | undefined;

  private readonly sections = new Map<number, SectionIdentity>();
  private cur: OpenSection | undefined;
  private depth = 0;
  private packageEnd = Infinity;
  private packageEndReason: 'eof' | 'run' | 'exhausted' = 'exhausted';

  private blocks: RamBlockInfo[] = [];
  private blockIndex = new Map<string, number>();
  private memory: (Uint8Array | undefined)[] = [];
  /** With zeroedMemory: per block, one bit per page this stream wrote non-zero bytes to. */
  private written: (Uint32Array | undefined)[] = [];
  private readonly zeroedMemory: boolean;
  private readonly bareRam: boolean;
  private readonly postcopyPageHooks: boolean;
  private stats: BlockStats[] = [];
  /** Index of the block named last on this channel; -1 before any. */
  private lastBlock = -1;
  private readonly scratch = Buffer.allocUnsafeSlow(COMPRESS_PAGE_MAX);
  private readonly scratchPage = Buffer.allocUnsafeSlow(TARGET_PAGE_SIZE);

  /** Destination postcopy sub-state as the commands so far imply it. */
  postcopyState: PostcopyStateValue = PostcopyState.NONE;
  /** The configuration record, once read. */
  configuration: ConfigurationRecord | undefined;

  constructor(options: StreamDecoderOptions = {}) {
    this.r = new ByteReader(options.startOffset ?? 0);
    this.ram = options.ram;
    this.deviceLayout = options.deviceLayout;
    this.expectFooters = options.expectFooters ?? true;
    this.maxSectionBytes = options.maxSectionBytes ?? 16 * 1024 * 1024;
    this.maxVmdescBytes = options.maxVmdescBytes ?? 16 * 1024 * 1024;
    this.maxRamBytes = options.maxRamBytes ?? 2 ** 40;
    this.maxRamBlocks = options.maxRamBlocks ?? 1024;
    this.maxSections = options.maxSections ?? 65536;
    this.maxCommand = options.maxCommand ?? MIG_CMD_MAX_7_2;
    this.ignoreShared = options.ignoreShared ?? false;
    this.zeroedMemory = options.zeroedMemory ?? false;
    this.bareRam = options.bareRam ?? false;
    this.postcopyPageHooks = options.postcopyPageHooks ?? false;
    if (options.resume !== undefined) {
      this.state = S.RECORD;
      this.postcopyState = options.resume.postcopyState;
      for (const s of options.resume.sections) this.sections.set(s.sectionId, s);
      this.installBlocks(options.resume.blocks.map((b) => ({ ...b })), options.startOffset ?? 0);
      if (this.bareRam) {
        this.cur = {
          sectionId: -1,
          idstr: 'ram',
          instanceId: 0,
          versionId: 4,
          sectionKind: 'part',
          offset: 0,
          dataOffset: 0,
          isRam: true,
          stats: EMPTY_STATS(),
          declaredLength: undefined,
          prefixed: false,
          layout: 'declared',
          scanFrom: 0,
        };
        this.state = S.RAM;
      }
    }
  }

  /** Stream offset of the next unread byte. */
  get streamOffset(): number {
    return this.r.streamOffset;
  }

  /** Bytes buffered but not yet decoded. */
  get bufferedBytes(): number {
    return this.r.available;
  }

  /** True once the final EOF (and VMDESCRIPTION, if any) has been read. */
  get finished(): boolean {
    return this.state === S.AFTER_EOF || this.state === S.DONE;
  }

  get ramBlocks(): readonly RamBlockInfo[] {
    return this.blocks;
  }

  /** Page-record counts per block so far. */
  blockStats(): readonly BlockStats[] {
    return this.stats;
  }

  knownSections(): SectionIdentity[] {
    return [...this.sections.values()];
  }

  /** Forget the last named block (a new channel: the next page record must name its block). */
  forgetBlock(): void {
    this.lastBlock = -1;
  }

  push(chunk: Uint8Array): void {
    if (this.failure !== undefined) throw this.failure;
    this.r.push(chunk);
  }

  /**
   * Copy the buffered, undecoded bytes out of the pushed chunks, so that the caller may reuse
   * their memory (a socket's static read buffer). Call after next() returned NEED_MORE.
   */
  retainUnread(): void {
    this.r.retainUnread();
  }

  /** The next event, or NEED_MORE when the buffered bytes hold no complete record. */
  next(): DecoderEvent | NeedMore {
    if (this.failure !== undefined) throw this.failure;
    try {
      return this.step();
    } catch (err) {
      if (err instanceof ProtocolError) this.failure = err;
      throw err;
    }
  }

  /** No more input will come: throws TRUNCATED when the stream stopped inside a record. */
  end(): void {
    if (this.failure !== undefined) throw this.failure;
    if ((this.state === S.AFTER_EOF || this.state === S.DONE) && this.r.available === 0) return;
    const where = this.describeState();
    this.failure = new ProtocolError(
      ErrorCode.TRUNCATED,
      `stream ended inside ${where} (${this.r.available} bytes of it buffered)`,
      this.context(this.r.streamOffset),
    );
    throw this.failure;
  }

  // ---- internals ------------------------------------------------------------------------------

  private step(): DecoderEvent | NeedMore {
    for (;;) {
      switch (this.state) {
        case S.HEADER:
          return this.readHeader();
        case S.CONFIG: {
          const ev = this.readConfiguration();
          if (ev === null) continue;
          return ev;
        }
        case S.RECORD: {
          const ev = this.readRecord();
          if (ev === null) continue;
          return ev;
        }
        case S.RAM: {
          const ev = this.readRamRecords();
          if (ev === null) continue;
          return ev;
        }
        case S.DEVICE: {
          const more = this.readDeviceData();
          if (more === NEED_MORE) return NEED_MORE;
          continue;
        }
        case S.FOOTER:
          return this.readFooter();
        case S.SKIP_PACKAGE: {
          const left = this.packageEnd - this.r.streamOffset;
          const n = Math.min(left, this.r.available);
          this.r.skip(n);
          if (n < left) return NEED_MORE;
          return this.leavePackage(this.packageEndReason);
        }
        case S.AFTER_EOF:
          return this.readAfterEof();
        case S.DONE:
          if (this.r.available > 0) {
            // The message names the first byte, not a count, so it is the same in any chunking.
            const first = this.r.u8(0).toString(16).padStart(2, '0');
            throw new ProtocolError(ErrorCode.TRAILING_DATA, `byte 0x${first} after the end of the stream (after EOF and VMDESCRIPTION)`, {
              streamOffset: this.r.streamOffset,
            });
          }
          return NEED_MORE;
      }
    }
  }

  /** True when n bytes (relative) are buffered; throws if a package would be overrun. */
  private need(n: number): boolean {
    if (this.r.streamOffset + n > this.packageEnd) {
      throw new ProtocolError(
        ErrorCode.PACKAGE_OVERRUN,
        `record runs past the end of its PACKAGED blob (blob ends at ${this.packageEnd})`,
        this.context(this.r.streamOffset),
      );
    }
    return this.r.available >= n;
  }

  private context(streamOffset: number): { streamOffset: number; sectionId?: number; idstr?: string } {
    const c = this.cur;
    return c === undefined ? { streamOffset } : { streamOffset, sectionId: c.sectionId, idstr: c.idstr };
  }

  private fail(code: ErrorCodeValue, message: string, relOffset = 0, extra: { block?: string; pageOffset?: number } = {}): never {
    throw new ProtocolError(code, message, { ...this.context(this.r.streamOffset + relOffset), ...extra });
  }

  private describeState(): string {
    switch (this.state) {
      case S.HEADER:
        return 'the stream header';
      case S.CONFIG:
        return 'the configuration record';
      case S.RECORD:
        return this.depth > 0 ? 'a record of a PACKAGED blob' : 'a record (no EOF seen)';
      case S.RAM:
        return `a RAM record of section ${this.cur?.sectionId} "${this.cur?.idstr}"`;
      case S.DEVICE:
        return `the data of section ${this.cur?.sectionId} "${this.cur?.idstr}"`;
      case S.FOOTER:
        return `the footer of section ${this.cur?.sectionId} "${this.cur?.idstr}"`;
      case S.SKIP_PACKAGE:
        return 'a PACKAGED blob';
      default:
        return 'the VMDESCRIPTION';
    }
  }

  private readHeader(): DecoderEvent | NeedMore {
    const r = this.r;
    if (r.available >= 4 && r.be32(0) !== QEMU_VM_FILE_MAGIC) {
      const got = r.be32(0).toString(16).padStart(8, '0');
      this.fail(ErrorCode.BAD_MAGIC, `not a QEMU migration stream: magic 0x${got}, expected 0x5145564d ("QEVM")`);
    }
    if (r.available < 8) return NEED_MORE;
    const version = r.be32(4);
    if (version !== QEMU_VM_FILE_VERSION) {
      this.fail(
        ErrorCode.UNSUPPORTED_VERSION,
        version === QEMU_VM_FILE_VERSION_COMPAT
          ? 'stream version 2 (the obsolete pre-1.0 format) is not supported'
          : `stream version ${version} is not supported (only version 3)`,
        4,
      );
    }
    r.skip(8);
    this.state = S.CONFIG;
    return { kind: 'header', offset: 0, version };
  }

  /** Configuration record if present; null when there is none (go on with records). */
  private readConfiguration(): DecoderEvent | NeedMore | null {
    const r = this.r;
    if (r.available < 1) return NEED_MORE;
    if (r.u8(0) !== RecordType.CONFIGURATION) {
      this.state = S.RECORD;
      return null;
    }
    if (r.available < 5) return NEED_MORE;
    const nameLen = r.be32(1);
    if (nameLen > 255) this.fail(ErrorCode.BAD_CONFIGURATION, `machine type name of ${nameLen} bytes (at most 255)`, 1);
    let k = 5 + nameLen;
    if (r.available < k + 1) return NEED_MORE;
    const rec: ConfigurationRecord = {
      offset: r.streamOffset,
      end: 0,
      machineType: r.latin1(5, nameLen),
      subsections: [],
    };
    while (r.u8(k) === RecordType.SUBSECTION) {
      if (r.available < k + 2) return NEED_MORE;
      const n = r.u8(k + 1);
      if (r.available < k + 2 + n + 4) return NEED_MORE;
      const name = r.latin1(k + 2, n);
      if (!name.startsWith('configuration/')) break;
      const body = k + 2 + n + 4;
      const subStart = k;
      switch (name) {
        case 'configuration/target-page-bits':
          if (r.available < body + 4) return NEED_MORE;
          rec.targetPageBits = r.be32(body);
          k = body + 4;
          break;
        case 'configuration/uuid':
          if (r.available < body + 16) return NEED_MORE;
          rec.uuid = uuidString(r.copyOut(body, 16));
          k = body + 16;
          break;
        case 'configuration/capabilities': {
          if (r.available < body + 4) return NEED_MORE;
          const count = r.be32(body);
          if (count > 64) this.fail(ErrorCode.BAD_CONFIGURATION, `configuration lists ${count} capabilities (at most 64)`, body);
          let p = body + 4;
          const caps: string[] = [];
          for (let i = 0; i < count; i++) {
            if (r.available < p + 1) return NEED_MORE;
            const cn = r.u8(p);
            if (r.available < p + 1 + cn) return NEED_MORE;
            caps.push(r.latin1(p + 1, cn));
            p += 1 + cn;
          }
          rec.capabilities = caps;
          k = p;
          break;
        }
        default:
          this.fail(ErrorCode.BAD_CONFIGURATION, `unknown configuration subsection "${name}"`, k);
      }
      rec.subsections.push({ offset: r.streamOffset + subStart, name, version: r.be32(subStart + 2 + n) });
      if (r.available < k + 1) return NEED_MORE;
    }
    rec.end = r.streamOffset + k;
    r.skip(k);
    if (rec.capabilities?.includes('x-ignore-shared') === true) this.ignoreShared = true;
    this.configuration = rec;
    this.state = S.RECORD;
    return { kind: 'configuration', ...rec };
  }

  /** One top-level (or package) record header; null when the state changed without an event. */
  private readRecord(): DecoderEvent | NeedMore | null {
    const r = this.r;
    if (this.depth > 0 && r.streamOffset === this.packageEnd) return this.leavePackage('exhausted');
    if (!this.need(1)) return NEED_MORE;
    const offset = r.streamOffset;
    const type = r.u8(0);
    switch (type) {
      case RecordType.EOF:
        r.skip(1);
        if (this.depth > 0) {
          this.packageEndReason = 'eof';
          this.state = S.SKIP_PACKAGE;
          return { kind: 'eof', offset, depth: this.depth };
        }
        this.state = S.AFTER_EOF;
        if (this.postcopyState >= PostcopyState.LISTENING) this.postcopyState = PostcopyState.END;
        return { kind: 'eof', offset, depth: 0 };
      case RecordType.SECTION_START:
      case RecordType.SECTION_FULL: {
        if (!this.need(6)) return NEED_MORE;
        const n = r.u8(5);
        if (n === 0) this.fail(ErrorCode.EMPTY_IDSTR, 'section header with an empty idstr', 5);
        if (!this.need(6 + n + 8)) return NEED_MORE;
        const sectionId = r.be32(1);
        const idstr = r.latin1(6, n);
        const instanceId = r.be32(6 + n);
        const versionId = r.be32(10 + n);
        const isRam = idstr === 'ram' && instanceId === 0;
        if (isRam && versionId !== RAM_SECTION_VERSION) {
          this.fail(ErrorCode.UNSUPPORTED_SECTION_VERSION, `"ram" section version ${versionId} (only version 4 is supported)`, 10 + n);
        }
        if (!this.sections.has(sectionId) && this.sections.size >= this.maxSections) {
          this.fail(ErrorCode.LIMIT_EXCEEDED, `more than ${this.maxSections} sections`);
        }
        const identity: SectionIdentity = { sectionId, idstr, instanceId, versionId };
        this.sections.set(sectionId, identity);
        r.skip(14 + n);
        return this.openSection(type === RecordType.SECTION_START ? 'start' : 'full', identity, offset, isRam);
      }
      case RecordType.SECTION_PART:
      case RecordType.SECTION_END: {
        if (!this.need(5)) return NEED_MORE;
        const sectionId = r.be32(1);
        const identity = this.sections.get(sectionId);
        if (identity === undefined) {
          this.fail(ErrorCode.UNKNOWN_SECTION, `${type === RecordType.SECTION_PART ? 'PART' : 'END'} section for unknown section id ${sectionId}`);
        }
        r.skip(5);
        const isRam = identity.idstr === 'ram' && identity.instanceId === 0;
        return this.openSection(type === RecordType.SECTION_PART ? 'part' : 'end', identity, offset, isRam);
      }
      case RecordType.COMMAND:
        return this.readCommand();
      default:
        this.fail(
          ErrorCode.UNKNOWN_RECORD_TYPE,
          type === RecordType.VMDESCRIPTION
            ? 'VMDESCRIPTION before the final EOF'
            : `unknown record type 0x${type.toString(16).padStart(2, '0')}`,
        );
    }
  }

  private openSection(kind: SectionKind, id: SectionIdentity, offset: number, isRam: boolean): DecoderEvent {
    const dataOffset = this.r.streamOffset;
    let declared: number | undefined;
    let prefixed = false;
    if (!isRam) {
      const layout = this.deviceLayout?.(id);
      if (layout === 'be32-prefixed') prefixed = true;
      else declared = layout;
      if (declared !== undefined && declared > this.maxSectionBytes) {
        throw new ProtocolError(
          ErrorCode.LIMIT_EXCEEDED,
          `device section data of ${declared} bytes exceeds the ${this.maxSectionBytes}-byte limit`,
          { streamOffset: dataOffset, sectionId: id.sectionId, idstr: id.idstr },
        );
      }
    }
    this.cur = {
      ...id,
      sectionKind: kind,
      offset,
      dataOffset,
      isRam,
      stats: isRam ? EMPTY_STATS() : undefined,
      declaredLength: declared,
      prefixed,
      layout: declared === undefined && !prefixed ? 'footer-scan' : 'declared',
      scanFrom: 0,
    };
    this.state = isRam ? S.RAM : S.DEVICE;
    return { kind: 'sectionStart', section: id, sectionKind: kind, offset, dataOffset, depth: this.depth };
  }

  private readCommand(): DecoderEvent | NeedMore {
    const r = this.r;
    if (!this.need(COMMAND_HEADER_LENGTH)) return NEED_MORE;
    const offset = r.streamOffset;
    const cmd = r.be16(1);
    const len = r.be16(3);
    checkCommandHeader(cmd, len, offset, this.maxCommand);
    if (!this.need(COMMAND_HEADER_LENGTH + len)) return NEED_MORE;
    const command = decodeCommand(cmd, r.copyOut(COMMAND_HEADER_LENGTH, len), offset);
    this.applyPostcopyRules(command, offset);
    r.skip(COMMAND_HEADER_LENGTH + len);
    const depth = this.depth;
    if (cmd === MigCmd.PACKAGED) {
      if (this.depth > 0) {
        throw new ProtocolError(ErrorCode.UNEXPECTED_COMMAND, 'PACKAGED inside a PACKAGED blob', { streamOffset: offset });
      }
      this.depth = 1;
      this.packageEnd = r.streamOffset + command.blobLength!;
    } else if (cmd === MigCmd.POSTCOPY_RUN && this.depth > 0) {
      // RUN ends the package parse; whatever follows inside the blob is never looked at.
      this.packageEndReason = 'run';
      this.state = S.SKIP_PACKAGE;
    }
    return { kind: 'command', offset, depth, command };
  }

  private applyPostcopyRules(c: CommandInfo, offset: number): void {
    const s = this.postcopyState;
    const refuse = (): never => {
      throw new ProtocolError(
        ErrorCode.UNEXPECTED_COMMAND,
        `${c.name} is not allowed in postcopy state ${POSTCOPY_STATE_NAMES[s]}`,
        { streamOffset: offset },
      );
    };
    switch (c.cmd) {
      case MigCmd.POSTCOPY_ADVISE:
        if (s !== PostcopyState.NONE) refuse();
        this.postcopyState = PostcopyState.ADVISE;
        break;
      case MigCmd.POSTCOPY_RAM_DISCARD:
        if (s !== PostcopyState.ADVISE && s !== PostcopyState.DISCARD) refuse();
        this.postcopyState = PostcopyState.DISCARD;
        break;
      case MigCmd.POSTCOPY_LISTEN:
        if (s !== PostcopyState.ADVISE && s !== PostcopyState.DISCARD) refuse();
        this.postcopyState = PostcopyState.LISTENING;
        break;
      case MigCmd.POSTCOPY_RUN:
        if (s !== PostcopyState.LISTENING) refuse();
        this.postcopyState = PostcopyState.RUNNING;
        break;
    }
  }

  private leavePackage(reason: 'eof' | 'run' | 'exhausted'): DecoderEvent {
    const offset = this.packageEnd;
    this.depth = 0;
    this.packageEnd = Infinity;
    this.packageEndReason = 'exhausted';
    this.state = S.RECORD;
    return { kind: 'packageEnd', offset, reason };
  }

  /** RAM records until EOS; returns an event (ramBlocks) or null when the footer is next. */
  private readRamRecords(): DecoderEvent | NeedMore | null {
    const r = this.r;
    const stats = this.cur!.stats!;
    const listening = this.postcopyState >= PostcopyState.LISTENING;
    const hooks = listening || !this.postcopyPageHooks;
    const placed = hooks ? this.ram?.pagePlaced : undefined;
    const accept = hooks ? this.ram?.acceptPage : undefined;
    for (;;) {
      if (!this.need(8)) return NEED_MORE;
      const hi = r.be32(0);
      const lo = r.be32(4);
      const flags = lo & TYPE_MASK;
      const type = flags & ~RamFlag.CONTINUE;
      const pageOffset = hi * 0x100000000 + (lo - flags);
      if (type === RamFlag.EOS) {
        stats.eosOffset = r.streamOffset;
        r.skip(8);
        if (this.bareRam) {
          // A preempt channel ends with its EOS.
          this.state = S.DONE;
          return { kind: 'eof', offset: stats.eosOffset, depth: 0 };
        }
        this.state = S.FOOTER;
        return null;
      }
      let body: number;
      switch (type) {
        case RamFlag.ZERO:
          body = 1;
          break;
        case RamFlag.PAGE:
          body = TARGET_PAGE_SIZE;
          break;
        case RamFlag.XBZRLE:
        case RamFlag.COMPRESS_PAGE:
          body = -1; // read below, after the block name
          break;
        case RamFlag.MEM_SIZE:
          if (listening) this.badFlag(flags, 'once postcopy is listening');
          return this.readMemSize(pageOffset, hi);
        case RamFlag.MULTIFD_FLUSH:
          if (listening) this.badFlag(flags, 'once postcopy is listening');
          r.skip(8);
          stats.multifdFlush++;
          continue;
        default:
          this.badFlag(flags, '');
      }
      if (listening && type !== RamFlag.ZERO && type !== RamFlag.PAGE) this.badFlag(flags, 'once postcopy is listening');
      // Block: named, or the one named last on this channel.
      let k = 8;
      let block: number;
      const named = (flags & RamFlag.CONTINUE) === 0;
      if (named) {
        if (!this.need(9)) return NEED_MORE;
        const n = r.u8(8);
        if (!this.need(9 + n)) return NEED_MORE;
        const name = r.latin1(9, n);
        const idx = this.blockIndex.get(name);
        if (idx === undefined) this.fail(ErrorCode.UNKNOWN_BLOCK, `RAM record names unknown block "${name}"`, 0, { block: name });
        block = idx;
        k = 9 + n;
      } else {
        if (this.lastBlock < 0) this.fail(ErrorCode.CONTINUE_WITHOUT_BLOCK, 'RAM record with CONTINUE before any block was named');
        block = this.lastBlock;
      }
      if (body < 0) {
        if (type === RamFlag.XBZRLE) {
          if (!this.need(k + 3)) return NEED_MORE;
          const enc = r.u8(k);
          if (enc !== ENCODING_FLAG_XBZRLE) this.fail(ErrorCode.BAD_XBZRLE, `XBZRLE encoding flag 0x${enc.toString(16)} (expected 0x01)`, k);
          const encLen = r.be16(k + 1);
          if (encLen > TARGET_PAGE_SIZE) this.fail(ErrorCode.BAD_XBZRLE, `XBZRLE length ${encLen} exceeds the page size`, k + 1);
          body = 3 + encLen;
        } else {
          if (!this.need(k + 4)) return NEED_MORE;
          const clen = r.be32(k);
          if (clen === 0 || clen > COMPRESS_PAGE_MAX) {
            this.fail(ErrorCode.LIMIT_EXCEEDED, `compressed page of ${clen} bytes (at most ${COMPRESS_PAGE_MAX})`, k);
          }
          body = 4 + clen;
        }
      }
      const total = k + body;
      if (!this.need(total)) return NEED_MORE;
      const info = this.blocks[block]!;
      if (hi >= 0x200000 || pageOffset + TARGET_PAGE_SIZE > info.length) {
        this.fail(
          ErrorCode.ILLEGAL_RAM_OFFSET,
          `RAM offset 0x${pageOffset.toString(16)} is outside block "${info.idstr}" (length 0x${info.length.toString(16)})`,
          0,
          { block: info.idstr, pageOffset },
        );
      }
      let mem = this.memory[block];
      const bs = this.stats[block]!;
      // A page refused (postcopy: another thread placed it, or is placing it) is not reported placed.
      let accepted = true;
      if (accept !== undefined && mem !== undefined && !accept.call(this.ram, block, pageOffset)) {
        mem = undefined;
        accepted = false;
      }
      const written = this.written[block];
      if (written !== undefined) {
        const page = pageOffset / TARGET_PAGE_SIZE;
        const bit = 1 << (page & 31);
        if (type === RamFlag.ZERO && r.u8(k) === 0 && (written[page >>> 5]! & bit) === 0) {
          // Still zero since the start: nothing to clear.
          stats.zero++;
          bs.zeroPages++;
          if (named) {
            stats.named++;
            this.lastBlock = block;
          } else stats.continued++;
          r.skip(total);
          if (placed !== undefined && accepted) placed.call(this.ram, block, pageOffset);
          continue;
        }
        written[page >>> 5] = written[page >>> 5]! | bit;
      }
      switch (type) {
        case RamFlag.ZERO:
          if (mem !== undefined) mem.fill(r.u8(k), pageOffset, pageOffset + TARGET_PAGE_SIZE);
          stats.zero++;
          bs.zeroPages++;
          break;
        case RamFlag.PAGE:
          if (mem !== undefined) r.copyTo(k, TARGET_PAGE_SIZE, mem, pageOffset);
          stats.normal++;
          bs.normalPages++;
          break;
        case RamFlag.XBZRLE: {
          const encLen = body - 3;
          const src = r.span(k + 3, encLen, this.scratch);
          const at = r.spanOffset;
          let dst: Uint8Array = this.scratchPage;
          let dstOffset = 0;
          if (mem !== undefined) {
            dst = mem;
            dstOffset = pageOffset;
          }
          if (xbzrleDecode(src, at, encLen, dst, dstOffset, TARGET_PAGE_SIZE) < 0) {
            this.fail(ErrorCode.BAD_XBZRLE, `malformed XBZRLE page: ${xbzrleLastFault}`, k + 3, { block: info.idstr, pageOffset });
          }
          stats.xbzrle++;
          bs.xbzrlePages++;
          break;
        }
        case RamFlag.COMPRESS_PAGE: {
          const clen = body - 4;
          const src = r.span(k + 4, clen, this.scratch);
          let page: Buffer;
          try {
            page = inflateSync(src.subarray(r.spanOffset, r.spanOffset + clen), { maxOutputLength: TARGET_PAGE_SIZE });
          } catch (cause) {
            throw new ProtocolError(ErrorCode.BAD_COMPRESSED_PAGE, `compressed page does not inflate: ${(cause as Error).message}`, {
              ...this.context(r.streamOffset + k + 4),
              block: info.idstr,
              pageOffset,
              cause,
            });
          }
          if (page.length !== TARGET_PAGE_SIZE) {
            this.fail(ErrorCode.BAD_COMPRESSED_PAGE, `compressed page inflates to ${page.length} bytes, not a page`, k + 4, {
              block: info.idstr,
              pageOffset,
            });
          }
          if (mem !== undefined) mem.set(page, pageOffset);
          stats.compressed++;
          bs.compressedPages++;
          break;
        }
      }
      if (named) {
        stats.named++;
        this.lastBlock = block;
      } else {
        stats.continued++;
      }
      r.skip(total);
      if (placed !== undefined && accepted) placed.call(this.ram, block, pageOffset);
    }
  }

  private badFlag(flags: number, why: string): never {
    const names: string[] = [];
    for (const [name, bit] of Object.entries(RamFlag)) if ((flags & bit) !== 0) names.push(name);
    this.fail(
      ErrorCode.UNKNOWN_RAM_FLAG,
      `RAM record flags 0x${flags.toString(16).padStart(3, '0')} (${names.join('|') || 'none'}) are not a valid record type${why ? ' ' + why : ''}`,
    );
  }

  private readMemSize(total: number, hi: number): DecoderEvent | NeedMore {
    const r = this.r;
    if (hi >= 0x200000 || total > this.maxRamBytes) {
      this.fail(ErrorCode.LIMIT_EXCEEDED, `block list announces ${hi >= 0x200000 ? 'over 2^53' : total} bytes of RAM (limit ${this.maxRamBytes})`);
    }
    const extra = this.ignoreShared ? 8 : 0;
    const blocks: RamBlockInfo[] = [];
    const seen = new Set<string>();
    let left = total;
    let k = 8;
    while (left > 0) {
      if (blocks.length >= this.maxRamBlocks) this.fail(ErrorCode.LIMIT_EXCEEDED, `block list has more than ${this.maxRamBlocks} blocks`, k);
      if (!this.need(k + 1)) return NEED_MORE;
      const n = r.u8(k);
      if (n === 0) this.fail(ErrorCode.EMPTY_IDSTR, 'block list entry with an empty name', k);
      if (!this.need(k + 1 + n + 8 + extra)) return NEED_MORE;
      const idstr = r.latin1(k + 1, n);
      const length = r.be64(k + 1 + n);
      if (length < 0 || length > left || length % TARGET_PAGE_SIZE !== 0 || seen.has(idstr)) {
        this.fail(
          ErrorCode.BAD_MEM_SIZE,
          seen.has(idstr)
            ? `block "${idstr}" listed twice`
            : length % TARGET_PAGE_SIZE !== 0 && length > 0 && length <= left
              ? `block "${idstr}" length 0x${length.toString(16)} is not page aligned`
              : `block "${idstr}" length ${length < 0 ? '≥ 2^53' : length} exceeds the ${left} bytes the list has left`,
          k,
          { block: idstr },
        );
      }
      const info: RamBlockInfo = { idstr, length };
      if (extra > 0) info.gpa = r.be64(k + 1 + n + 8);
      blocks.push(info);
      seen.add(idstr);
      left -= length;
      k += 1 + n + 8 + extra;
    }
    const offset = r.streamOffset;
    this.installBlocks(blocks, offset);
    r.skip(k);
    return { kind: 'ramBlocks', offset, total, blocks };
  }

  private installBlocks(blocks: RamBlockInfo[], offset: number): void {
    const memory = this.ram?.attachBlocks(blocks, offset) ?? [];
    this.blocks = blocks;
    this.blockIndex = new Map(blocks.map((b, i) => [b.idstr, i]));
    this.memory = blocks.map((_, i) => memory[i]);
    this.written = blocks.map((b, i) =>
      this.zeroedMemory && memory[i] !== undefined ? new Uint32Array(Math.ceil(b.length / TARGET_PAGE_SIZE / 32)) : undefined,
    );
    this.stats = blocks.map((b) => ({ idstr: b.idstr, length: b.length, zeroPages: 0, normalPages: 0, xbzrlePages: 0, compressedPages: 0 }));
    this.lastBlock = -1;
  }

  /** Device data: a declared length, or a scan for the footer; then FOOTER. */
  private readDeviceData(): NeedMore | null {
    const c = this.cur!;
    const r = this.r;
    if (c.prefixed && c.declaredLength === undefined) {
      if (!this.need(4)) return NEED_MORE;
      const len = r.be32(0);
      if (len > this.maxSectionBytes - 4) {
        this.fail(ErrorCode.LIMIT_EXCEEDED, `device section data of ${len} bytes exceeds the ${this.maxSectionBytes}-byte limit`);
      }
      c.declaredLength = 4 + len;
    }
    if (c.declaredLength !== undefined) {
      if (!this.need(c.declaredLength)) return NEED_MORE;
      this.state = S.FOOTER;
      return null;
    }
    if (!this.expectFooters) {
      this.fail(ErrorCode.FOOTER_NOT_FOUND, `section "${c.idstr}" has no declared layout and the stream has no footers to find its end`);
    }
    for (;;) {
      const at = r.indexOf(RecordType.SECTION_FOOTER, c.scanFrom);
      const limit = Math.min(this.maxSectionBytes, this.packageEnd - r.streamOffset - FOOTER_LENGTH);
      if (at < 0 || at > limit) {
        const scanned = at < 0 ? r.available : at;
        if (scanned > limit) {
          this.fail(
            ErrorCode.FOOTER_NOT_FOUND,
            `no footer for section ${c.sectionId} "${c.idstr}" within ${limit} bytes of its data`,
          );
        }
        c.scanFrom = r.available;
        return NEED_MORE;
      }
      if (r.available < at + FOOTER_LENGTH) {
        c.scanFrom = at;
        return NEED_MORE;
      }
      if (r.be32(at + 1) === c.sectionId) {
        const verdict = this.looksLikeRecord(at + FOOTER_LENGTH);
        if (verdict === NEED_MORE) {
          c.scanFrom = at;
          return NEED_MORE;
        }
        if (verdict) {
          c.declaredLength = at;
          this.state = S.FOOTER;
          return null;
        }
      }
      c.scanFrom = at + 1;
    }
  }

  /** Does a plausible record start k bytes ahead? (the footer-scan heuristic's second half) */
  private looksLikeRecord(k: number): boolean | NeedMore {
    const r = this.r;
    if (r.streamOffset + k === this.packageEnd) return true;
    if (r.available < k + 1) return NEED_MORE;
    switch (r.u8(k)) {
      case RecordType.EOF:
        return true;
      case RecordType.SECTION_START:
      case RecordType.SECTION_FULL: {
        if (r.available < k + 6) return NEED_MORE;
        const n = r.u8(k + 5);
        if (n === 0) return false;
        if (r.available < k + 6 + n + 8) return NEED_MORE;
        for (let i = 0; i < n; i++) {
          const ch = r.u8(k + 6 + i);
          if (ch < 0x20 || ch > 0x7e) return false;
        }
        return r.be32(k + 10 + n) < 0x10000;
      }
      case RecordType.SECTION_PART:
      case RecordType.SECTION_END:
        if (r.available < k + 5) return NEED_MORE;
        return this.sections.has(r.be32(k + 1));
      case RecordType.COMMAND: {
        if (r.available < k + 5) return NEED_MORE;
        try {
          checkCommandHeader(r.be16(k + 1), r.be16(k + 3), 0, this.maxCommand);
          return true;
        } catch {
          return false;
        }
      }
      default:
        return false;
    }
  }

  private readFooter(): DecoderEvent | NeedMore {
    const r = this.r;
    const c = this.cur!;
    let dataLength: number;
    let data: Buffer | undefined;
    let layout: SectionRecord['layout'];
    if (c.isRam) {
      dataLength = r.streamOffset - c.dataOffset;
    } else {
      dataLength = c.declaredLength!;
      layout = c.layout;
    }
    const footerRel = c.isRam ? 0 : dataLength;
    const footerLen = this.expectFooters ? FOOTER_LENGTH : 0;
    if (!this.need(footerRel + footerLen)) return NEED_MORE;
    if (this.expectFooters) {
      const mark = r.u8(footerRel);
      const id = r.be32(footerRel + 1);
      if (mark !== RecordType.SECTION_FOOTER || id !== c.sectionId) {
        this.fail(
          ErrorCode.BAD_FOOTER,
          mark !== RecordType.SECTION_FOOTER
            ? `expected section footer 0x7e, found 0x${mark.toString(16).padStart(2, '0')}`
            : `section footer names section ${id}`,
          footerRel,
        );
      }
    }
    if (!c.isRam) data = r.copyOut(0, dataLength);
    const footerOffset = this.expectFooters ? r.streamOffset + footerRel : -1;
    r.skip(footerRel + footerLen);
    const rec: SectionRecord = {
      sectionId: c.sectionId,
      idstr: c.idstr,
      instanceId: c.instanceId,
      versionId: c.versionId,
      sectionKind: c.sectionKind,
      offset: c.offset,
      dataOffset: c.dataOffset,
      dataLength,
      footerOffset,
      end: r.streamOffset,
      depth: this.depth,
    };
    if (c.stats !== undefined) rec.ram = c.stats;
    if (data !== undefined) rec.data = data;
    if (layout !== undefined) rec.layout = layout;
    this.cur = undefined;
    this.state = S.RECORD;
    return { kind: 'sectionEnd', ...rec };
  }

  private readAfterEof(): DecoderEvent | NeedMore {
    const r = this.r;
    if (r.available < 1) return NEED_MORE;
    if (r.u8(0) !== RecordType.VMDESCRIPTION) {
      this.fail(ErrorCode.TRAILING_DATA, `byte 0x${r.u8(0).toString(16).padStart(2, '0')} after the final EOF (only a VMDESCRIPTION may follow)`);
    }
    if (r.available < 5) return NEED_MORE;
    const len = r.be32(1);
    if (len > this.maxVmdescBytes) {
      this.fail(ErrorCode.LIMIT_EXCEEDED, `VMDESCRIPTION of ${len} bytes exceeds the ${this.maxVmdescBytes}-byte limit`, 1);
    }
    if (r.available < 5 + len) return NEED_MORE;
    const offset = r.streamOffset;
    const json = r.copyOut(5, len).toString('utf8');
    r.skip(5 + len);
    this.state = S.DONE;
    return { kind: 'vmdescription', offset, length: len, json };
  }
}

const POSTCOPY_STATE_NAMES = ['NONE', 'ADVISE', 'DISCARD', 'LISTENING', 'RUNNING', 'END'] as const;

function uuidString(b: Buffer): string {
  const h = b.toString('hex');
  return `${h.slice(0, 8)}-${h.slice(8, 12)}-${h.slice(12, 16)}-${h.slice(16, 20)}-${h.slice(20)}`;
}
