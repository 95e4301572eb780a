// `livemig analyze`: read a migration stream file (or stdin, gzip or not), decode it with the
// protocol core and print what is in it.
//
// A file is read twice: first its tail, for the VMDESCRIPTION that sizes every device section
// exactly; then from the start, in fixed-size reads into one reused buffer. RAM is not rebuilt:
// each block's sha256 is fed as its pages pass, and pages that come out of order (re-sent, or
// deltas) are read back from the file at the end (ram-digest.ts), so memory stays bounded
// whatever the guest's size. Standard input and gzip cannot be read back: their RAM is rebuilt
// in memory, and device sections are found by their footers (cross-checked against the
// VMDESCRIPTION when it arrives at the end).

import { join } from 'node:path';
import type { Readable } from 'node:stream';
import {
  type AnalysisReport,
  type AnalyzerOptions,
  DeviceStateDump,
  ErrorCode,
  findVmdescription,
  ProtocolError,
  type SectionReport,
  type StateObject,
  type Vmdescription,
  parseVmdescription,
  type RecordReport,
  StreamAnalyzer,
  VmdescLayouts,
} from '@livemig/protocol/analysis';

/** VMDESCRIPTION of at most this many bytes is looked for at the end of a file. */
const TAIL_BYTES = 16 * 1024 * 1024 + 16;
/** First look at this much of the end: QEMU's descriptions are tens of KiB. */
const SHORT_TAIL_BYTES = 256 * 1024;
/**
 * One read of a stream file, into the same buffer every time (4 MiB reads were no faster, and
 * larger). `--dump state` reads page payloads too, though it only needs the record headers between
 * them: a 16-byte pread per 4 KiB page record costs ~3 µs in Node here (0.4–0.5 s for 512 MiB),
 * and reading every byte ~0.04 s; scattering payloads into one scratch buffer with readv, 0.08 s.
 */
const FILE_READ_BYTES = 1024 * 1024;
/** Read size for gzip files and standard input. */
const READ_CHUNK = 1024 * 1024;
const GZIP_MAGIC = [0x1f, 0x8b] as const;

// node:fs as a builtin, not an ESM import: that reads all its exports, which loads the whole
// stream stack for fs.ReadStream (~0.8 MiB of RSS and a few ms), and a file is read without streams.
const { closeSync, createReadStream, fstatSync, mkdirSync, openSync, readSync, statSync, writeSync } = process.getBuiltinModule('node:fs');

export interface AnalyzeOptions {
  /** File path, or '-' for standard input. */
  input: string;
  stdin?: Readable;
  /** Called with bytes read so far and the total (when known), at most a few times a second. */
  onProgress?: (done: number, total: number | undefined) => void;
  /** Decode device fields by the VMDESCRIPTION (`--dump state`); RAM is then counted, not hashed. */
  dumpState?: boolean;
}

export interface AnalyzeResult {
  report: AnalysisReport;
  analyzer: StreamAnalyzer;
  gzip: boolean;
  /** With dumpState: every described section's fields, as analyze-migration.py -d state shows them. */
  state?: StateObject;
  /** Release the file kept open to read page data back (walkBlock needs it until then). */
  close(): void;
}

function isGzipFile(path: string): boolean {
  const fd = openSync(path, 'r');
  try {
    const b = Buffer.alloc(2);
    return readUpTo(fd, b, 0) === 2 && b[0] === GZIP_MAGIC[0] && b[1] === GZIP_MAGIC[1];
  } finally {
    closeSync(fd);
  }
}

/** zlib is loaded for gzip input only (its loading costs as much as decoding a large plain file). */
function createGunzip(): import('node:zlib').Gunzip {
  return process.getBuiltinModule('node:zlib').createGunzip();
}

/** The VMDESCRIPTION at the end of a plain file: the last 256 KiB looked at first, then up to 16 MiB. */
function fileVmdescription(fd: number, size: number): { offset: number; json: string } | undefined {
  for (const want of [SHORT_TAIL_BYTES, TAIL_BYTES]) {
    const n = Math.min(size, want);
    const tail = Buffer.allocUnsafe(n);
    readFully(fd, tail, 0, n, size - n);
    const found = findVmdescription(tail, size - n);
    if (found !== undefined || n === size) return found;
  }
  return undefined;
}

/** The decompressed stream's last `TAIL_BYTES` and its total length. */
async function readGzipTail(path: string): Promise<{ tail: Buffer; tailOffset: number }> {
  // gzip cannot seek: decompress once, keeping only a rolling window of the last bytes.
  const parts: Buffer[] = [];
  let kept = 0;
  let total = 0;
  for await (const chunk of createReadStream(path, { highWaterMark: READ_CHUNK }).pipe(createGunzip()) as AsyncIterable<Buffer>) {
    parts.push(chunk);
    kept += chunk.length;
    total += chunk.length;
    while (parts.length > 1 && kept - parts[0]!.length >= TAIL_BYTES) kept -= parts.shift()!.length;
  }
  let tail = Buffer.concat(parts);
  if (tail.length > TAIL_BYTES) tail = tail.subarray(tail.length - TAIL_BYTES);
  return { tail, tailOffset: total - tail.length };
}

function readFully(fd: number, dst: Uint8Array, dstOffset: number, length: number, position: number): void {
  while (length > 0) {
    const n = readSync(fd, dst, dstOffset, length, position);
    if (n === 0) {
      throw new ProtocolError(ErrorCode.TRUNCATED, `file ended at byte ${position} while its pages were read back (did it change during the analysis?)`, {
        streamOffset: position,
      });
    }
    dstOffset += n;
    length -= n;
    position += n;
  }
}

/** Fill `dst` from the file at `position`; fewer bytes only at the end of the file. */
function readUpTo(fd: number, dst: Buffer, position: number): number {
  let got = 0;
  while (got < dst.length) {
    const n = readSync(fd, dst, got, dst.length - got, position + got);
    if (n === 0) break;
    got += n;
  }
  return got;
}

/** Wrap a byte source so that gzip input is decompressed (detected by its magic). */
async function* maybeGunzip(source: AsyncIterable<Buffer>, onGzip: () => void): AsyncGenerator<Buffer> {
  const it = source[Symbol.asyncIterator]();
  const first = await it.next();
  if (first.done === true) return;
  const head = first.value;
  const rest = { [Symbol.asyncIterator]: () => it };
  if (head.length >= 2 && head[0] === GZIP_MAGIC[0] && head[1] === GZIP_MAGIC[1]) {
    onGzip();
    const gunzip = createGunzip();
    const feed = (async () => {
      try {
        gunzip.write(head);
        for await (const c of rest) if (!gunzip.write(c)) await new Promise((r) => gunzip.once('drain', r));
        gunzip.end();
      } catch (err) {
        gunzip.destroy(err as Error);
      }
    })();
    yield* gunzip as AsyncIterable<Buffer>;
    await feed;
    return;
  }
  yield head;
  yield* rest;
}

function descriptionOf(found: { offset: number; json: string } | undefined): Vmdescription | undefined {
  if (found === undefined) return undefined;
  try {
    return parseVmdescription(found.json, found.offset);
  } catch {
    // A bad description is reported when the decoder reaches it; until then walk by footers.
    return undefined;
  }
}

/**
 * `--dump state`: sections go to a DeviceStateDump as they end when the description is known
 * up front (a file); otherwise they wait for the VMDESCRIPTION at the end of the stream.
 */
class StateCollector {
  private dump: DeviceStateDump | undefined;
  private readonly waiting: { s: SectionReport; data: Buffer | undefined }[] = [];

  constructor(desc: Vmdescription | undefined) {
    if (desc !== undefined) this.dump = new DeviceStateDump(desc);
  }

  readonly onSection = (s: SectionReport, data: Buffer | undefined): void => {
    // A VFIO device's setup, pre-copy and stop-copy sections are its own framing, not fields its
    // description names: only its config (a FULL section) is.
    const vfioData = s.vfio !== undefined && s.vfio.phase !== 'config';
    const wanted = s.ram !== undefined ? s.ram.blocks !== undefined : data !== undefined && !vfioData && (s.type === 'start' || s.type === 'full');
    if (!wanted) return;
    // Data is lent for the call: what waits for the description is copied.
    if (this.dump === undefined) this.waiting.push({ s, data: data === undefined ? undefined : Buffer.from(data) });
    else this.take(this.dump, s, data);
  };

  finish(report: AnalysisReport): StateObject {
    if (this.dump === undefined) {
      if (report.vmdescription === null) {
        throw new ProtocolError(ErrorCode.BAD_VMDESCRIPTION, 'the stream has no VMDESCRIPTION (postcopy streams carry none), so device fields cannot be decoded', {
          streamOffset: report.streamSize,
        });
      }
      this.dump = new DeviceStateDump(report.vmdescription.json as Vmdescription);
      for (const w of this.waiting) this.take(this.dump, w.s, w.data);
    }
    return this.dump.state;
  }

  private take(dump: DeviceStateDump, s: SectionReport, data: Buffer | undefined): void {
    if (s.ram?.blocks !== undefined) dump.ramBlocks(s.sectionId, s.idstr, s.ram.blocks);
    else if (data !== undefined) dump.deviceSection({ ...s, instanceId: s.instanceId! }, data);
  }
}

function progressReporter(options: AnalyzeOptions): (done: number, total: number | undefined) => void {
  let lastReport = 0;
  return (done, total) => {
    if (options.onProgress === undefined) return;
    const now = Date.now();
    if (now - lastReport > 200) {
      lastReport = now;
      options.onProgress(done, total);
    }
  };
}

/** A plain file: read in place, RAM hashed without being rebuilt. */
function analyzeFile(path: string, options: AnalyzeOptions): AnalyzeResult {
  const fd = openSync(path, 'r');
  try {
    const size = fstatSync(fd).size;
    const desc = descriptionOf(fileVmdescription(fd, size));
    const layouts = desc === undefined ? undefined : new VmdescLayouts(desc);
    const collector = options.dumpState === true ? new StateCollector(desc) : undefined;
    const analyzer = new StreamAnalyzer({
      ...(layouts === undefined ? {} : { deviceLayout: (s, kind) => layouts.take(s.idstr, s.instanceId, kind) }),
      // Each section's data is hashed (and dumped) as it ends, before the read buffer is read into again.
      lendDeviceData: true,
      hashDeviceData: collector === undefined,
      // The state dump shows no RAM contents: pages are only counted.
      ...(collector === undefined
        ? { readStreamBytes: (streamOffset, dst, dstOffset, length) => readFully(fd, dst, dstOffset, length, streamOffset) }
        : { keepRam: false, onSection: collector.onSection }),
    } satisfies AnalyzerOptions);
    const progress = progressReporter(options);
    // One buffer for every read. What a read leaves undecoded (a record it cut) is not copied
    // out: it is dropped and read again at the start of the next read, and a record larger than
    // half the buffer doubles it (records are bounded by the decoder's limits). Copies of cut
    // records were most of the garbage, and so of the peak RSS, with MiB-sized device sections.
    let buf = Buffer.allocUnsafeSlow(FILE_READ_BYTES);
    let position = 0;
    for (;;) {
      const n = readUpTo(fd, buf, position);
      if (n === 0) break;
      analyzer.push(n === buf.length ? buf : buf.subarray(0, n));
      progress(position + n, size);
      if (n < buf.length) break;
      const next = analyzer.streamOffset;
      analyzer.dropUnread();
      if (position + n - next > buf.length / 2) buf = Buffer.allocUnsafeSlow(2 * buf.length);
      position = next;
    }
    const report = analyzer.end();
    let open = true;
    return {
      report,
      analyzer,
      gzip: false,
      ...(collector === undefined ? {} : { state: collector.finish(report) }),
      close: () => {
        if (open) closeSync(fd);
        open = false;
      },
    };
  } catch (err) {
    closeSync(fd);
    throw err;
  }
}

export async function analyzeInput(options: AnalyzeOptions): Promise<AnalyzeResult> {
  const fromStdin = options.input === '-';
  if (!fromStdin && !isGzipFile(options.input)) {
    if (statSync(options.input).isFile()) return analyzeFile(options.input, options);
  }
  let desc: Vmdescription | undefined;
  if (!fromStdin) {
    const { tail, tailOffset } = await readGzipTail(options.input);
    desc = descriptionOf(findVmdescription(tail, tailOffset));
  }
  const layouts = desc === undefined ? undefined : new VmdescLayouts(desc);
  const collector = options.dumpState === true ? new StateCollector(desc) : undefined;
  const analyzer = new StreamAnalyzer({
    ...(layouts === undefined ? {} : { deviceLayout: (s, kind) => layouts.take(s.idstr, s.instanceId, kind) }),
    ...(collector === undefined ? {} : { keepRam: false, hashDeviceData: false, onSection: collector.onSection }),
  } satisfies AnalyzerOptions);
  const source: AsyncIterable<Buffer> = fromStdin
    ? ((options.stdin ?? process.stdin) as AsyncIterable<Buffer>)
    : (createReadStream(options.input, { highWaterMark: READ_CHUNK }) as AsyncIterable<Buffer>);
  let gzip = false;
  let done = 0;
  const progress = progressReporter(options);
  for await (const chunk of maybeGunzip(source, () => (gzip = true))) {
    analyzer.push(chunk);
    done += chunk.length;
    progress(done, undefined);
  }
  const report = analyzer.end();
  return { report, analyzer, gzip, ...(collector === undefined ? {} : { state: collector.finish(report) }), close: () => {} };
}

/** File name for a block: its idstr with anything but [A-Za-z0-9._@-] percent-encoded ("/rom@etc/acpi/tables" → "%2From@etc%2Facpi%2Ftables"). */
export function blockFileName(idstr: string): string {
  return idstr.replace(/[^A-Za-z0-9._@-]/g, (c) => `%${c.charCodeAt(0).toString(16).toUpperCase().padStart(2, '0')}`);
}

export async function extractBlocks(result: AnalyzeResult, dir: string): Promise<string[]> {
  mkdirSync(dir, { recursive: true });
  const written: string[] = [];
  for (const [i, b] of result.report.ramBlocks.entries()) {
    const path = join(dir, blockFileName(b.idstr));
    const fd = openSync(path, 'w');
    try {
      if (!result.analyzer.walkBlock(i, (bytes) => writeAll(fd, bytes))) continue;
    } finally {
      closeSync(fd);
    }
    written.push(path);
  }
  return written;
}

function writeAll(fd: number, bytes: Uint8Array): void {
  for (let off = 0; off < bytes.length; ) off += writeSync(fd, bytes, off, bytes.length - off);
}

/** `--dump state` output: the same JSON text layout as analyze-migration.py (4-space indent). */
export function stateDumpText(state: StateObject): string {
  return JSON.stringify(state, null, 4) + '\n';
}

/** The --json document: the report with the VMDESCRIPTION's full JSON left out of the summary. */
export function jsonReport(report: AnalysisReport): unknown {
  return {
    magic: report.magic,
    version: report.version,
    machine: report.machine,
    configuration: report.configuration,
    streamSize: report.streamSize,
    postcopy: report.postcopy,
    sections: report.sections.map((s) => {
      const { record: _record, ...rest } = s;
      return rest;
    }),
    commands: report.commands.map((c) => {
      const { record: _record, package: pkg, ...rest } = c;
      return pkg === undefined ? rest : { ...rest, package: pkg.map((r) => ({ ...r })) };
    }),
    records: report.records,
    ramBlocks: report.ramBlocks,
    eofOffset: report.eofOffset,
    vmdescription: report.vmdescription,
    vfioDevices: report.vfioDevices,
  };
}

// ---- human output ---------------------------------------------------------------------------

function size(bytes: number): string {
  if (bytes >= 2 ** 30 && bytes % 2 ** 30 === 0) return `${bytes / 2 ** 30} GiB`;
  if (bytes >= 2 ** 20 && bytes % 2 ** 20 === 0) return `${bytes / 2 ** 20} MiB`;
  if (bytes >= 2 ** 10 && bytes % 2 ** 10 === 0) return `${bytes / 2 ** 10} KiB`;
  return `${bytes} B`;
}

function pad(s: string | number, n: number): string {
  return String(s).padEnd(n);
}

function describeRecord(r: RecordReport, indent: string, lines: string[]): void {
  const at = pad(r.offset, 10);
  if (r.record === 'eof') {
    lines.push(`${indent}${at} EOF`);
    return;
  }
  if (r.record === 'command') {
    let detail = '';
    if (r.pingValue !== undefined) detail = ` ${r.pingValue}`;
    else if (r.hostPageSizeSummary !== undefined) detail = ` host page sizes 0x${r.hostPageSizeSummary.toString(16)}, target page ${r.targetPageSize}`;
    else if (r.discard !== undefined) {
      const pages = r.discard.ranges.reduce((a, [, l]) => a + l / 4096, 0);
      detail = ` "${r.discard.block}" ${r.discard.ranges.length} range(s), ${pages} pages`;
    } else if (r.blobLength !== undefined) detail = ` ${r.blobLength}-byte blob:`;
    else if (r.block !== undefined) detail = ` "${r.block}"`;
    lines.push(`${indent}${at} COMMAND ${r.name}${detail}`);
    for (const inner of r.package ?? []) describeRecord(inner, indent + '  ', lines);
    return;
  }
  const head = `${indent}${at} ${pad(r.type.toUpperCase(), 6)} section ${pad(r.sectionId, 3)} "${r.idstr}"`;
  const ids = r.instanceId === null ? '' : ` instance ${r.instanceId} version ${r.versionId}`;
  if (r.ram !== undefined) {
    const x = r.ram;
    const pages = `${x.normal} pages, ${x.zero} zero, ${x.xbzrle} xbzrle${x.compressed > 0 ? `, ${x.compressed} compressed` : ''}`;
    lines.push(`${head}${ids}  ${r.dataLength} bytes: ${pages}`);
    if (x.blocks !== undefined) {
      lines.push(`${indent}${' '.repeat(11)}block list: ${x.blocks.map((b) => `${b.idstr} (${size(b.length)})`).join(', ')}`);
    }
  } else if (r.vfio !== undefined) {
    const v = r.vfio;
    const what = v.phase === 'setup' ? '' : v.phase === 'config' ? `, ${v.configBytes} config bytes` : `, ${v.dataFrames} data frame(s), ${v.dataBytes} device bytes`;
    lines.push(`${head}${ids}  ${r.dataLength} bytes: vfio ${v.phase}${what}`);
  } else {
    lines.push(`${head}${ids}  ${r.dataLength} bytes${r.layout === 'footer-scan' ? ' (found by footer)' : ''}`);
  }
}

export function humanReport(report: AnalysisReport, name: string): string {
  const lines: string[] = [];
  lines.push(`${name}: QEVM stream version ${report.version}, ${report.streamSize} bytes${report.postcopy ? ', postcopy' : ''}`);
  if (report.configuration !== null) {
    const c = report.configuration;
    const extra: string[] = [];
    if (c.capabilities !== undefined) extra.push(`capabilities ${c.capabilities.join(', ')}`);
    if (c.uuid !== undefined) extra.push(`uuid ${c.uuid}`);
    lines.push(`machine: ${report.machine}${extra.length > 0 ? ` (${extra.join('; ')})` : ''}`);
  } else {
    lines.push('machine: (no configuration record)');
  }
  lines.push('');
  lines.push(`${pad('offset', 10)} record`);
  for (const r of report.records) describeRecord(r, '', lines);
  if (report.vmdescription !== null) {
    const v = report.vmdescription;
    lines.push(`${pad(v.offset, 10)} VMDESCRIPTION ${v.length} bytes: page size ${v.pageSize}, ${v.devices.length} devices`);
    for (const m of v.layoutMismatches) {
      lines.push(`  warning: section at ${m.offset} "${m.idstr}" has ${m.dataLength} bytes, described as ${m.described}`);
    }
  }
  for (const d of report.vfioDevices) {
    lines.push('');
    lines.push(`VFIO device "${d.idstr}" (section ${d.sectionId}):`);
    lines.push(`  setup     ${d.setupSections} section(s)`);
    lines.push(`  pre-copy  ${d.precopyIterations} iteration(s) with data in ${d.iterateSections} PART section(s), ${d.precopyBytes} bytes`);
    lines.push(`  stop-copy ${d.completeSections} END section(s), ${d.stopCopyFrames} data frame(s), ${d.stopCopyBytes} bytes`);
    lines.push(`  config    ${d.configBytes} bytes`);
  }
  lines.push('');
  lines.push('RAM blocks:');
  const w = Math.max(6, ...report.ramBlocks.map((b) => b.idstr.length));
  for (const b of report.ramBlocks) {
    lines.push(
      `  ${pad(b.idstr, w)}  ${pad(size(b.length), 9)} ${pad(`${b.length / 4096} pages:`, 13)} ${b.normalPages} normal, ${b.zeroPages} zero, ${b.xbzrlePages} xbzrle${b.compressedPages > 0 ? `, ${b.compressedPages} compressed` : ''}  sha256 ${b.sha256}`,
    );
  }
  return lines.join('\n') + '\n';
}
