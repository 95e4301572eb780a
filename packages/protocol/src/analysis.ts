// StreamAnalyzer: decodes a whole stream into a report of every record (what `livemig analyze`
// prints): sections with offsets and footers, commands with PACKAGED contents, RAM blocks
// with their sha256 and page-record counts, and the VMDESCRIPTION. RAM is rebuilt in memory, or,
// given a way to read the stream back (a file), only its digests are kept (ram-digest.ts).

import { constants as bufferConstants } from 'node:buffer';
import type { CommandInfo } from './command.ts';
import { ErrorCode, ProtocolError } from './errors.ts';
import { createSha256 } from './lazy-builtins.ts';
import type { RamBlockInfo } from './ram.ts';
import { NEED_MORE, type RamSectionStats } from './ram-record-decoder.ts';
import { RamDigests, type ReadStreamBytes } from './ram-digest.ts';
import { StreamDecoder } from './stream-decoder.ts';
import type { DeviceLayout, StreamDecoderOptions } from './stream-events.ts';
import { deviceDataLength, parseVmdescription } from './vmdesc.ts';
import { MigCmd, type SectionKind } from './constants.ts';

export interface SectionReport {
  record: 'section';
  type: SectionKind;
  sectionId: number;
  idstr: string;
  /** START/FULL only (null for PART/END, whose header does not carry them). */
  instanceId: number | null;
  versionId: number | null;
  offset: number;
  dataOffset: number;
  dataLength: number;
  footerOffset: number;
  end: number;
  depth: number;
  ram?: RamSectionStats & { blocks?: RamBlockInfo[]; memSizeOffset?: number };
  dataSha256?: string;
  layout?: 'declared' | 'footer-scan' | 'vfio-framing' | 'recorded-vmsd';
  /** A VFIO device's section: its phase and what its DATA / CONFIG frames carried. */
  vfio?: VfioSectionReport;
}

/** QEMU's four kinds of VFIO section: START setup, PART iterate, END complete, FULL config. */
export type VfioPhase = 'setup' | 'iterate' | 'complete' | 'config';

export interface VfioSectionReport {
  phase: VfioPhase;
  dataFrames: number;
  dataBytes: number;
  configBytes: number;
}

/** One VFIO device across the stream: what each phase moved. */
export interface VfioDeviceReport {
  idstr: string;
  sectionId: number;
  setupSections: number;
  /** PART sections, and those of them that carried data (pre-copy iterations). */
  iterateSections: number;
  precopyIterations: number;
  precopyBytes: number;
  completeSections: number;
  /** Device data in the END section (stop-and-copy), and its DATA frames. */
  stopCopyBytes: number;
  stopCopyFrames: number;
  configBytes: number;
}

export interface CommandReport {
  record: 'command';
  offset: number;
  depth: number;
  cmd: number;
  name: string;
  length: number;
  payloadHex: string;
  pingValue?: number;
  hostPageSizeSummary?: number;
  targetPageSize?: number;
  discard?: { block: string; ranges: [number, number][] };
  blobLength?: number;
  block?: string;
  /** PACKAGED: the records of the blob. */
  package?: RecordReport[];
}

export interface EofReport {
  record: 'eof';
  offset: number;
  depth: number;
}

export type RecordReport = SectionReport | CommandReport | EofReport;

export interface RamBlockReport {
  idstr: string;
  length: number;
  gpa?: number;
  sha256: string;
  zeroPages: number;
  normalPages: number;
  xbzrlePages: number;
  compressedPages: number;
}

export interface AnalysisReport {
  magic: 'QEVM';
  version: number;
  machine: string | null;
  configuration: {
    offset: number;
    end: number;
    subsections: { offset: number; name: string; version: number }[];
    capabilities?: string[];
    uuid?: string;
  } | null;
  /** Every record in stream order; PACKAGED contents nested under their command. */
  records: RecordReport[];
  /** Every section in stream order, packaged ones included (depth 1). */
  sections: SectionReport[];
  /** Every command in stream order, packaged ones included (depth 1). */
  commands: CommandReport[];
  ramBlocks: RamBlockReport[];
  eofOffset: number | null;
  vmdescription: {
    offset: number;
    length: number;
    pageSize: number;
    devices: string[];
    /** Device sections whose length disagrees with what the VMDESCRIPTION describes. */
    layoutMismatches: { offset: number; idstr: string; dataLength: number; described: number }[];
    json: unknown;
  } | null;
  streamSize: number;
  postcopy: boolean;
  /** VFIO devices (sections in QEMU's VFIO framing), by section id. */
  vfioDevices: VfioDeviceReport[];
}

export interface AnalyzerOptions {
  deviceLayout?: DeviceLayout;
  /** Rebuild RAM to hash it (default true). Without it sha256 is of nothing and is left empty. */
  keepRam?: boolean;
  /**
   * Hash RAM without rebuilding it (keepRam is then ignored): page data is found again by reading
   * the stream back through this (a stream file), so memory stays at a few bytes per page.
   */
  readStreamBytes?: ReadStreamBytes;
  /** Largest total RAM to rebuild, bytes (default 64 GiB). */
  maxRamBytes?: number;
  /**
   * Told of every section as it ends, with a device section's data: a copy, the caller's to keep;
   * with lendDeviceData, lent for the call only.
   */
  onSection?: (section: SectionReport, data: Buffer | undefined) => void;
  /** Device section data is not copied out of the pushed chunks (a reader that reuses no chunk memory during push(), or keeps none of it). */
  lendDeviceData?: boolean;
  /** Each device section's sha256 in its report (default true); a reader that shows no report skips it. */
  hashDeviceData?: boolean;
  decoder?: Omit<StreamDecoderOptions, 'ram' | 'deviceLayout' | 'maxRamBytes'>;
}

export class StreamAnalyzer {
  private readonly decoder: StreamDecoder;
  private memory: (Buffer | undefined)[] = [];
  private readonly digests: RamDigests | undefined;
  private readonly onSection: AnalyzerOptions['onSection'];
  private readonly hashDeviceData: boolean;
  private readonly report: AnalysisReport = {
    magic: 'QEVM',
    version: 0,
    machine: null,
    configuration: null,
    records: [],
    sections: [],
    commands: [],
    ramBlocks: [],
    eofOffset: null,
    vmdescription: null,
    streamSize: 0,
    postcopy: false,
    vfioDevices: [],
  };
  private packageList: RecordReport[] | undefined;
  private pendingBlocks: { blocks: RamBlockInfo[]; offset: number } | undefined;

  constructor(options: AnalyzerOptions = {}) {
    const digests = options.readStreamBytes === undefined ? undefined : new RamDigests(options.readStreamBytes);
    this.digests = digests;
    this.onSection = options.onSection;
    this.hashDeviceData = options.hashDeviceData ?? true;
    const keep = digests === undefined && (options.keepRam ?? true);
    const decoderOptions: StreamDecoderOptions = {
      // Any command a QEMU this knows may write (10.0's SWITCHOVER_START included): an analyzer is
      // no destination, so it does not refuse what a newer peer would accept.
      maxCommand: MigCmd.SWITCHOVER_START + 1,
      expectFooters: 'auto',
      ...options.decoder,
      maxRamBytes: options.maxRamBytes ?? 64 * 2 ** 30,
      ram: {
        ...(digests === undefined ? {} : { pages: digests }),
        attachBlocks: (blocks, streamOffset) => {
          digests?.attach(blocks);
          // A mapped-ram list grows block by block: the blocks seen before keep their memory.
          const before = this.memory;
          this.memory = blocks.map((b, i) => {
            if (!keep) return undefined;
            if (before?.[i] !== undefined && before[i]!.length === b.length) return before[i];
            if (b.length > bufferConstants.MAX_LENGTH) {
              throw new ProtocolError(ErrorCode.LIMIT_EXCEEDED, `block of ${b.length} bytes is larger than one buffer can hold`, {
                streamOffset,
                block: b.idstr,
              });
            }
            return Buffer.alloc(b.length);
          });
          return this.memory;
        },
      },
    };
    if (options.deviceLayout !== undefined) decoderOptions.deviceLayout = options.deviceLayout;
    if (options.lendDeviceData === true) decoderOptions.lendDeviceData = true;
    this.decoder = new StreamDecoder(decoderOptions);
  }

  push(chunk: Uint8Array): void {
    this.report.streamSize += chunk.byteLength;
    this.decoder.push(chunk);
    this.drain();
  }

  /** End of input: the finished report (throws the decoder's error on bad or short input). */
  end(): AnalysisReport {
    this.drain();
    this.decoder.end();
    const rep = this.report;
    rep.postcopy = this.decoder.postcopyState > 0;
    rep.vfioDevices = vfioDevices(rep.sections);
    rep.ramBlocks = this.decoder.blockStats().map((s, i) => {
      const info = this.decoder.ramBlocks[i]!;
      const out: RamBlockReport = {
        idstr: s.idstr,
        length: s.length,
        sha256:
          this.digests !== undefined
            ? this.digests.sha256(i)
            : this.memory[i] === undefined
              ? ''
              : createSha256().update(this.memory[i]!).digest('hex'),
        zeroPages: s.zeroPages,
        normalPages: s.normalPages,
        xbzrlePages: s.xbzrlePages,
        compressedPages: s.compressedPages,
      };
      if (info.gpa !== undefined) out.gpa = info.gpa;
      return out;
    });
    return rep;
  }

  /** Rebuilt contents of a block (after end()); undefined when only digests were kept. */
  blockMemory(index: number): Buffer | undefined {
    return this.memory[index];
  }

  /**
   * Hand a block's final contents to `emit` in order, in pieces lent for the call (after end()):
   * from memory, or read back from the stream when only digests were kept. False: no contents.
   */
  walkBlock(index: number, emit: (bytes: Uint8Array) => void): boolean {
    if (this.digests !== undefined) {
      this.digests.walk(index, emit);
      return true;
    }
    const mem = this.memory[index];
    if (mem === undefined) return false;
    emit(mem);
    return true;
  }

  /** Stream offset of the first byte not yet decoded. */
  get streamOffset(): number {
    return this.decoder.streamOffset;
  }

  /**
   * Forget the buffered, undecoded bytes: the caller (a reader of a file) pushes them again from
   * `streamOffset` on, so it may reuse its read buffer without them being copied out.
   */
  dropUnread(): void {
    this.report.streamSize -= this.decoder.dropUnread();
  }

  /** Copy the buffered, undecoded bytes out of the pushed chunks (so the caller may reuse its read buffer). */
  retainUnread(): void {
    this.decoder.retainUnread();
  }

  private add(rec: RecordReport): void {
    (this.packageList ?? this.report.records).push(rec);
  }

  private drain(): void {
    const rep = this.report;
    for (let ev = this.decoder.next(); ev !== NEED_MORE; ev = this.decoder.next()) {
      switch (ev.kind) {
        case 'header':
          rep.version = ev.version;
          break;
        case 'configuration': {
          rep.machine = ev.machineType;
          const c: NonNullable<AnalysisReport['configuration']> = { offset: ev.offset, end: ev.end, subsections: ev.subsections };
          if (ev.capabilities !== undefined) c.capabilities = ev.capabilities;
          if (ev.uuid !== undefined) c.uuid = ev.uuid;
          rep.configuration = c;
          break;
        }
        case 'sectionStart':
          break;
        case 'ramBlocks':
          this.pendingBlocks = { blocks: ev.blocks, offset: ev.offset };
          break;
        case 'sectionEnd': {
          const s: SectionReport = {
            record: 'section',
            type: ev.sectionKind,
            sectionId: ev.sectionId,
            idstr: ev.idstr,
            instanceId: ev.sectionKind === 'start' || ev.sectionKind === 'full' ? ev.instanceId : null,
            versionId: ev.sectionKind === 'start' || ev.sectionKind === 'full' ? ev.versionId : null,
            offset: ev.offset,
            dataOffset: ev.dataOffset,
            dataLength: ev.dataLength,
            footerOffset: ev.footerOffset,
            end: ev.end,
            depth: ev.depth,
          };
          if (ev.ram !== undefined) {
            s.ram = { ...ev.ram };
            if (this.pendingBlocks !== undefined) {
              s.ram.blocks = this.pendingBlocks.blocks;
              s.ram.memSizeOffset = this.pendingBlocks.offset;
              this.pendingBlocks = undefined;
            }
          }
          if (ev.data !== undefined && this.hashDeviceData) s.dataSha256 = createSha256().update(ev.data).digest('hex');
          if (ev.layout !== undefined) s.layout = ev.layout;
          if (ev.vfio !== undefined) {
            const v = ev.vfio;
            const phase: VfioPhase = v.phase !== 'data' ? v.phase : ev.sectionKind === 'end' ? 'complete' : 'iterate';
            s.vfio = { phase, dataFrames: v.dataFrames, dataBytes: v.dataBytes, configBytes: v.configBytes };
          }
          rep.sections.push(s);
          this.add(s);
          this.onSection?.(s, ev.data);
          break;
        }
        case 'command': {
          const c = commandReport(ev.command, ev.offset, ev.depth);
          rep.commands.push(c);
          this.add(c);
          if (c.package !== undefined) this.packageList = c.package;
          break;
        }
        case 'packageEnd':
          this.packageList = undefined;
          break;
        case 'eof':
          this.add({ record: 'eof', offset: ev.offset, depth: ev.depth });
          if (ev.depth === 0) rep.eofOffset = ev.offset;
          break;
        case 'vmdescription': {
          const desc = parseVmdescription(ev.json, ev.offset);
          rep.vmdescription = {
            offset: ev.offset,
            length: ev.length,
            pageSize: desc.page_size,
            devices: desc.devices.map((d) => `${d.name}/${d.instance_id}`),
            layoutMismatches: this.checkLayouts(desc.devices),
            json: desc,
          };
          break;
        }
      }
    }
  }

  /** Compare each FULL device section's length with the VMDESCRIPTION's field sizes. */
  private checkLayouts(devices: { name: string; instance_id: number }[]): NonNullable<AnalysisReport['vmdescription']>['layoutMismatches'] {
    const out: NonNullable<AnalysisReport['vmdescription']>['layoutMismatches'] = [];
    const full = this.report.sections.filter((s) => s.type === 'full' && s.ram === undefined && s.depth === 0);
    const used = new Set<number>();
    for (const s of full) {
      const i = devices.findIndex((d, j) => !used.has(j) && d.name === s.idstr && d.instance_id === s.instanceId);
      if (i < 0) continue;
      used.add(i);
      const described = deviceDataLength(devices[i] as Parameters<typeof deviceDataLength>[0]);
      if (described !== s.dataLength) out.push({ offset: s.offset, idstr: s.idstr, dataLength: s.dataLength, described });
    }
    return out;
  }
}

function vfioDevices(sections: readonly SectionReport[]): VfioDeviceReport[] {
  const byId = new Map<number, VfioDeviceReport>();
  for (const s of sections) {
    const v = s.vfio;
    if (v === undefined) continue;
    let d = byId.get(s.sectionId);
    if (d === undefined) {
      d = { idstr: s.idstr, sectionId: s.sectionId, setupSections: 0, iterateSections: 0, precopyIterations: 0, precopyBytes: 0, completeSections: 0, stopCopyBytes: 0, stopCopyFrames: 0, configBytes: 0 };
      byId.set(s.sectionId, d);
    }
    switch (v.phase) {
      case 'setup':
        d.setupSections++;
        break;
      case 'iterate':
        d.iterateSections++;
        if (v.dataBytes > 0) d.precopyIterations++;
        d.precopyBytes += v.dataBytes;
        break;
      case 'complete':
        d.completeSections++;
        d.stopCopyBytes += v.dataBytes;
        d.stopCopyFrames += v.dataFrames;
        break;
      case 'config':
        d.configBytes += v.configBytes;
        break;
    }
  }
  return [...byId.values()];
}

function commandReport(c: CommandInfo, offset: number, depth: number): CommandReport {
  const r: CommandReport = {
    record: 'command',
    offset,
    depth,
    cmd: c.cmd,
    name: c.name,
    length: c.length,
    payloadHex: c.payload.toString('hex'),
  };
  if (c.pingValue !== undefined) r.pingValue = c.pingValue;
  if (c.hostPageSizeSummary !== undefined) r.hostPageSizeSummary = c.hostPageSizeSummary;
  if (c.targetPageSize !== undefined) r.targetPageSize = c.targetPageSize;
  if (c.discard !== undefined) r.discard = { block: c.discard.block, ranges: c.discard.ranges.map((x) => [x.start, x.length]) };
  if (c.blobLength !== undefined) {
    r.blobLength = c.blobLength;
    r.package = [];
  }
  if (c.block !== undefined) r.block = c.block;
  return r;
}
