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
// RAM sections are read by a RamRecordDecoder (ram-record-decoder.ts) on the same bytes: it
// copies each page once, from the receive chunk straight into the block memory the RamTarget
// handed it, and counts records per block. Page data is never turned into events.

import { failAt, haveBytes, recordPlace } from './record-place.ts';
import { checkCommandHeader, decodeCommand, COMMAND_HEADER_LENGTH } from './command.ts';
import {
  MIG_CMD_MAX_7_2,
  MigCmd,
  PostcopyState,
  type PostcopyStateValue,
  QEMU_VM_FILE_MAGIC,
  QEMU_VM_FILE_VERSION,
  QEMU_VM_FILE_VERSION_COMPAT,
  RAM_SECTION_VERSION,
  RecordType,
  type SectionKind,
} from './constants.ts';
import { ErrorCode, type ErrorCodeValue, ProtocolError } from './errors.ts';
import type { RamBlockInfo } from './ram.ts';
import {
  emptyRamSectionStats,
  NEED_MORE,
  type NeedMore,
  RAM_EOS,
  RamRecordDecoder,
  type BlockStats,
} from './ram-record-decoder.ts';
import { ByteReader } from './reader.ts';
import { measureVmsdSection } from './foreign-devices.ts';
import type { VmdescVmsd } from './vmdesc.ts';
import { readConfigurationRecord } from './configuration-record.ts';
import type { ConfigurationRecord, DecoderEvent, DeviceLayout, SectionIdentity, SectionRecord, StreamDecoderOptions } from './stream-events.ts';
import { nextPostcopyState, scanForFooter } from './stream-rules.ts';
import { FOOTER_LENGTH } from './stream.ts';
import { describeUnfinished, type OpenSection, S } from './decoder-state.ts';
import { isVfioMark, measureVfioSection, readVfioSection, VFIO_MARK_LENGTH, vfioConfigSummary } from './vfio-framing.ts';


export { NEED_MORE, type NeedMore };


export class StreamDecoder {
  private readonly r: ByteReader;
  private readonly deviceLayout: DeviceLayout | undefined;
  /** Sections end in footers: given by the caller, or worked out from the stream (footersUnknown). */
  private expectFooters: boolean;
  private readonly footersAuto: boolean;
  /**
   * expectFooters 'auto' and no configuration record: the first section's end decides. A footer starts
   * with 0x7e, which no record does, so the byte after the first section's data tells.
   */
  private footersUnknown = false;
  private readonly maxSectionBytes: number;
  private readonly lendDeviceData: boolean;
  private readonly maxVmdescBytes: number;
  private readonly maxSections: number;
  private readonly maxCommand: number;
  /** RAM sections' records (and the block list, per-block counts). */
  private readonly rram: RamRecordDecoder;

  private state: S = S.HEADER;
  private failure: ProtocolError | undefined;

  private readonly sections = new Map<number, SectionIdentity>();
  private cur: OpenSection | undefined;
  private depth = 0;
  private packageEnd = Infinity;
  private packageEndReason: 'eof' | 'run' | 'exhausted' = 'exhausted';

  /** Destination postcopy sub-state as the commands so far imply it. */
  postcopyState: PostcopyStateValue = PostcopyState.NONE;
  /** The configuration record, once read. */
  configuration: ConfigurationRecord | undefined;

  constructor(options: StreamDecoderOptions = {}) {
    this.r = new ByteReader(options.startOffset ?? 0);
    this.deviceLayout = options.deviceLayout;
    this.expectFooters = options.expectFooters !== false;
    this.footersAuto = options.expectFooters === 'auto';
    this.maxSectionBytes = options.maxSectionBytes ?? 16 * 1024 * 1024;
    this.lendDeviceData = options.lendDeviceData ?? false;
    this.maxVmdescBytes = options.maxVmdescBytes ?? 16 * 1024 * 1024;
    this.maxSections = options.maxSections ?? 65536;
    this.maxCommand = options.maxCommand ?? MIG_CMD_MAX_7_2;
    const { ram, maxRamBytes, maxRamBlocks, ignoreShared, zeroedMemory, postcopyPageHooks, placePages } = options;
    this.rram = new RamRecordDecoder({ ram, maxRamBytes, maxRamBlocks, ignoreShared, zeroedMemory, postcopyPageHooks, placePages }, this.r);
    if (options.resume !== undefined) {
      this.state = S.RECORD;
      this.postcopyState = options.resume.postcopyState;
      for (const s of options.resume.sections) this.sections.set(s.sectionId, s);
      this.rram.installBlocks(options.resume.blocks.map((b) => ({ ...b })), options.startOffset ?? 0);
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
    return this.rram.ramBlocks;
  }

  /** Page-record counts per block so far. */
  blockStats(): readonly BlockStats[] {
    return this.rram.blockStats();
  }

  knownSections(): SectionIdentity[] {
    return [...this.sections.values()];
  }

  /** Forget the last named block (a new channel: the next page record must name its block). */
  forgetBlock(): void {
    this.rram.forgetBlock();
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

  /**
   * Forget the buffered, undecoded bytes (after next() gave NEED_MORE); the caller pushes them
   * again, from `streamOffset` on. Returns how many were dropped.
   */
  dropUnread(): number {
    return this.r.dropUnread();
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
    const where = describeUnfinished(this.state, this.depth, this.cur);
    this.failure = new ProtocolError(
      ErrorCode.TRUNCATED,
      `stream ended inside ${where} (${this.r.available} bytes of it buffered)`,
      recordPlace(this.r.streamOffset, this.cur),
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
          const rec = readConfigurationRecord(this.r);
          if (rec === NEED_MORE) return NEED_MORE;
          this.state = S.RECORD;
          if (rec === null) {
            // Machine types up to 2.3 (QEMU's send-configuration and send-section-footer both
            // off) start with a section and have no footers either; look at the first section's end.
            if (this.footersAuto) this.footersUnknown = true;
            continue;
          }
          if (rec.capabilities?.includes('x-ignore-shared') === true) this.rram.ignoreShared = true;
          if (rec.capabilities?.includes('mapped-ram') === true) this.rram.mappedRam = true;
          this.configuration = rec;
          return { kind: 'configuration', ...rec };
        }
        case S.RECORD: {
          const ev = this.readRecord();
          if (ev === null) continue;
          return ev;
        }
        case S.RAM: {
          const ev = this.rram.readRecords(this.cur!.stats!, this.postcopyState >= PostcopyState.LISTENING);
          if (ev === RAM_EOS) {
            this.state = S.FOOTER;
            continue;
          }
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
    return haveBytes(this.r, n, this.packageEnd, this.cur);
  }

  private fail(code: ErrorCodeValue, message: string, relOffset = 0, extra: { block?: string; pageOffset?: number } = {}): never {
    return failAt(code, message, this.r, this.cur, relOffset, extra);
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
    let vfio: OpenSection['vfio'] = 'no';
    let configBytes: number | undefined;
    let vmsd: VmdescVmsd | undefined;
    if (!isRam) {
      const layout = this.deviceLayout?.(id, kind);
      if (layout === 'be32-prefixed') prefixed = true;
      else if (typeof layout === 'object' && layout.framing === 'vmsd') vmsd = layout.description;
      else if (typeof layout === 'object') {
        vfio = 'yes';
        configBytes = layout.configBytes;
      } else declared = layout;
      // QEMU describes no iterative device: a VFIO one's START/PART/END data shows itself by its first marker.
      if (layout === undefined && kind !== 'full') vfio = 'detect';
      if (declared !== undefined && declared > this.maxSectionBytes) {
        throw new ProtocolError(
          ErrorCode.LIMIT_EXCEEDED,
          `device section data of ${declared} bytes exceeds the ${this.maxSectionBytes}-byte limit`,
          { streamOffset: dataOffset, sectionId: id.sectionId, idstr: id.idstr },
        );
      }
    }
    // Fields named one by one: a spread of `id` made V8 build new hidden classes for every section
    // (~7 KB of heap each, the young generation's growth on streams of many sections).
    this.cur = {
      sectionId: id.sectionId,
      idstr: id.idstr,
      instanceId: id.instanceId,
      versionId: id.versionId,
      sectionKind: kind,
      offset,
      dataOffset,
      isRam,
      stats: isRam ? emptyRamSectionStats() : undefined,
      declaredLength: declared,
      prefixed,
      layout: vfio === 'yes' ? 'vfio-framing' : vmsd !== undefined ? 'recorded-vmsd' : declared === undefined && !prefixed ? 'footer-scan' : 'declared',
      scanFrom: 0,
      vfio,
      configBytes,
      vfioFrom: 0,
      vfioCloseNext: false,
      vmsd,
    };
    this.rram.section = isRam ? this.cur : undefined;
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
    this.postcopyState = nextPostcopyState(this.postcopyState, command, offset);
    r.skip(COMMAND_HEADER_LENGTH + len);
    const depth = this.depth;
    if (cmd === MigCmd.PACKAGED) {
      if (this.depth > 0) {
        throw new ProtocolError(ErrorCode.UNEXPECTED_COMMAND, 'PACKAGED inside a PACKAGED blob', { streamOffset: offset });
      }
      this.depth = 1;
      this.packageEnd = r.streamOffset + command.blobLength!;
      this.rram.packageEnd = this.packageEnd;
    } else if (cmd === MigCmd.POSTCOPY_RUN && this.depth > 0) {
      // RUN ends the package parse; whatever follows inside the blob is never looked at.
      this.packageEndReason = 'run';
      this.state = S.SKIP_PACKAGE;
    }
    return { kind: 'command', offset, depth, command };
  }

  private leavePackage(reason: 'eof' | 'run' | 'exhausted'): DecoderEvent {
    const offset = this.packageEnd;
    this.depth = 0;
    this.packageEnd = Infinity;
    this.rram.packageEnd = Infinity;
    this.packageEndReason = 'exhausted';
    this.state = S.RECORD;
    return { kind: 'packageEnd', offset, reason };
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
    if (c.vfio === 'detect') {
      // Decided on the first byte when it cannot start a marker (an empty section's footer, say),
      // so a short section at the end of a stream is never waited on for 8 bytes.
      if (r.available < 1) return NEED_MORE;
      if (r.u8(0) !== 0xff || r.streamOffset + VFIO_MARK_LENGTH > this.packageEnd) c.vfio = 'no';
      else if (r.available < VFIO_MARK_LENGTH) return NEED_MORE;
      else c.vfio = isVfioMark(r.be32(0), r.be32(4)) ? 'yes' : 'no';
      if (c.vfio === 'yes') c.layout = 'vfio-framing';
    }
    if (c.vmsd !== undefined && c.declaredLength === undefined) {
      const limit = Math.min(this.maxSectionBytes, this.packageEnd - r.streamOffset);
      let len: number | undefined;
      try {
        len = measureVmsdSection(r, c.vmsd, c, limit);
      } catch (err) {
        // A subsection the recording never saw: with footers the section's end can still be
        // found as for any undescribed device; without them there is no way past it.
        if ((err as ProtocolError).code !== ErrorCode.FOREIGN_DEVICE_LAYOUT || !this.expectFooters || this.footersUnknown) throw err;
        c.vmsd = undefined;
        c.layout = 'footer-scan';
      }
      if (c.vmsd !== undefined) {
        if (len === undefined) return NEED_MORE;
        c.declaredLength = len;
      }
    }
    if (c.vfio === 'yes' && c.declaredLength === undefined) {
      const limit = Math.min(this.maxSectionBytes, this.packageEnd - r.streamOffset);
      const len = measureVfioSection(r, c, r.streamOffset, c.configBytes, limit);
      if (len === undefined) return NEED_MORE;
      c.declaredLength = len;
    }
    if (c.declaredLength !== undefined) {
      if (!this.need(c.declaredLength)) return NEED_MORE;
      this.state = S.FOOTER;
      return null;
    }
    if (!this.expectFooters) {
      this.fail(ErrorCode.FOOTER_NOT_FOUND, `section "${c.idstr}" has no declared layout and the stream has no footers to find its end`);
    }
    const limit = Math.min(this.maxSectionBytes, this.packageEnd - r.streamOffset - FOOTER_LENGTH);
    const at = scanForFooter(r, c, limit, this.packageEnd, this.sections, this.maxCommand);
    if (at === NEED_MORE) return NEED_MORE;
    c.declaredLength = at;
    this.state = S.FOOTER;
    return null;
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
    if (this.footersUnknown) {
      if (!this.need(footerRel + 1)) return NEED_MORE;
      this.expectFooters = r.u8(footerRel) === RecordType.SECTION_FOOTER;
      this.footersUnknown = false;
    }
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
    if (!c.isRam) data = this.lendDeviceData ? r.lend(0, dataLength) : r.copyOut(0, dataLength);
    const footerOffset = this.expectFooters ? r.streamOffset + footerRel : -1;
    r.skip(footerRel + footerLen);
    const rec: { kind: 'sectionEnd' } & SectionRecord = {
      kind: 'sectionEnd',
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
    if (data !== undefined) {
      rec.data = data;
      const vfio = c.layout === 'vfio-framing' ? readVfioSection(data, 0, data.length, { streamOffset: c.dataOffset, maxDataBytes: this.maxSectionBytes }) : vfioConfigSummary(data);
      if (vfio !== undefined) rec.vfio = vfio;
    }
    if (layout !== undefined) rec.layout = layout;
    this.cur = undefined;
    this.state = S.RECORD;
    return rec;
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
