// Property tests of the incremental decoders (style.md §3.5) against the real QEMU 7.2 streams:
//   * chunking invariance: any split of a stream (one byte at a time included) gives the events
//     and the analyzer report of the whole stream, for good and for corrupted streams alike;
//   * every prefix gives only events / NEED_MORE, and end() on a strict prefix is LM_ERR_TRUNCATED;
//   * random bytes, mutated fixtures and huge length fields end in success or a coded error —
//     never a TypeError/RangeError, never an endless run of events, never a buffer or an
//     allocation past the configured limits.
// Runs are bounded (fixed numRuns, small limits) so the whole file takes a few seconds.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, it } from 'node:test';
import { deflateSync } from 'node:zlib';
import fc from 'fast-check';
import {
  type AnalysisReport,
  BatchWriter,
  type DecoderEvent,
  findVmdescription,
  MigCmd,
  NEED_MORE,
  NEED_MORE_RP,
  parseVmdescription,
  PostcopyState,
  type RamBlockInfo,
  RamFlag,
  RamRecordWriter,
  type RamTarget,
  type ReturnPathMessage,
  ReturnPathDecoder,
  type ReturnPathDecoderOptions,
  RP_LIVEMIG_EXT,
  RpMsg,
  type SectionIdentity,
  StreamAnalyzer,
  StreamDecoder,
  type StreamDecoderOptions,
  VmdescLayouts,
  writeCommand,
  writeConfiguration,
  writeEof,
  writeEos,
  writeMemSize,
  writeMultifdFlush,
  writePackaged,
  writePing,
  writePostcopyAdvise,
  writeRamDiscard,
  writeRecvBitmapRequest,
  writeSectionFooter,
  writeSectionHeader,
  writeStreamHeader,
  writeVmdescription,
} from '../src/index.ts';
import { type Fixture, fixtureNames, fixturesMissing, countSkippedWithoutFixtures, interestingOffsets, loadFixture } from './fixtures.ts';

// ---- harness ----------------------------------------------------------------------------------

/** Limits used by every decoder here; small, so that "past the limits" is cheap to detect. */
const LIMITS = {
  maxSectionBytes: 1 << 20,
  maxVmdescBytes: 1 << 20,
  maxRamBytes: 2 ** 31,
} satisfies StreamDecoderOptions;

/** The RAM target of the fuzz runs: views into one preallocated pool, so runs allocate nothing. */
const POOL_BYTES = 80 * 2 ** 20;
let pool: Buffer | undefined;
function poolTarget(): RamTarget & { announced: number } {
  const t = {
    announced: 0,
    attachBlocks(blocks: readonly RamBlockInfo[]): (Uint8Array | undefined)[] {
      let total = 0;
      for (const b of blocks) total += b.length;
      t.announced = total;
      assert.ok(total <= LIMITS.maxRamBytes, `block list of ${total} bytes passed the ${LIMITS.maxRamBytes}-byte limit`);
      if (total > POOL_BYTES) return blocks.map(() => undefined);
      pool ??= Buffer.alloc(POOL_BYTES);
      let at = 0;
      return blocks.map((b) => {
        const view = pool!.subarray(at, at + b.length);
        at += b.length;
        return view;
      });
    },
  };
  return t;
}

function isCoded(err: unknown): err is Error & { code: string; streamOffset?: number } {
  return typeof err === 'object' && err !== null && typeof (err as { code?: unknown }).code === 'string' && (err as { code: string }).code.startsWith('LM_ERR_');
}

/** Rethrows anything that is not one of our coded errors (that is the bug these tests look for). */
function expectCoded(err: unknown, what: string): Error & { code: string; streamOffset?: number } {
  if (isCoded(err)) return err;
  const e = err as Error;
  assert.fail(`${what}: threw ${e?.name ?? typeof err} without an LM_ERR_ code: ${e?.message ?? String(err)}\n${e?.stack ?? ''}`);
}

interface Outcome<E> {
  events: E[];
  error?: { code: string; streamOffset: number | undefined; message: string };
}

/** Cut points → chunks (views into `stream`). */
function split(stream: Buffer, cuts: readonly number[]): Buffer[] {
  const out: Buffer[] = [];
  let at = 0;
  for (const c of cuts) {
    if (c <= at || c >= stream.length) continue;
    out.push(stream.subarray(at, c));
    at = c;
  }
  out.push(stream.subarray(at));
  return out;
}

function everyByte(stream: Buffer): Buffer[] {
  const out: Buffer[] = [];
  for (let i = 0; i < stream.length; i++) out.push(stream.subarray(i, i + 1));
  return out;
}

interface DecodeOptions {
  layout?: 'vmdesc' | 'scan';
  ram?: boolean;
  /** Call end() after the last chunk (default true). */
  end?: boolean;
  /**
   * Deliver every chunk through one reused read buffer and call retainUnread() after draining,
   * then overwrite the buffer (what the destination does with its socket's static read buffer).
   */
  reuse?: boolean;
  decoder?: StreamDecoderOptions;
}

function vmdescLayout(stream: Buffer): StreamDecoderOptions['deviceLayout'] {
  const found = findVmdescription(stream, 0);
  if (found === undefined) return undefined;
  let layouts: VmdescLayouts;
  try {
    layouts = new VmdescLayouts(parseVmdescription(found.json, found.offset));
  } catch (err) {
    expectCoded(err, 'VmdescLayouts');
    return undefined;
  }
  return (s: SectionIdentity) => layouts.take(s.idstr, s.instanceId);
}

/**
 * Decode `chunks` with a StreamDecoder, draining after every push. Returns the events and the
 * coded error it ended with; fails the test on an uncoded error, on more events than bytes
 * could produce, or on a decoder holding more than one record's worth of bytes.
 */
function decode(chunks: readonly Buffer[], whole: Buffer, o: DecodeOptions = {}): Outcome<DecoderEvent> {
  const opts: StreamDecoderOptions = { ...LIMITS, ...o.decoder };
  if (o.ram === true) opts.ram = poolTarget();
  if (o.layout === 'vmdesc') {
    const dl = vmdescLayout(whole);
    if (dl !== undefined) opts.deviceLayout = dl;
  }
  const events: DecoderEvent[] = [];
  const maxEvents = 2 * whole.length + 16;
  let dec: StreamDecoder;
  try {
    dec = new StreamDecoder(opts);
  } catch (err) {
    const e = expectCoded(err, 'new StreamDecoder');
    return { events, error: { code: e.code, streamOffset: e.streamOffset, message: e.message } };
  }
  let longest = 1;
  for (const c of chunks) longest = Math.max(longest, c.length);
  const readBuffer = o.reuse === true ? Buffer.alloc(longest) : undefined;
  const maxBuffered = Math.max(opts.maxSectionBytes!, opts.maxVmdescBytes!) + 512;
  try {
    for (const c of chunks) {
      if (readBuffer === undefined) {
        dec.push(c);
      } else {
        c.copy(readBuffer);
        dec.push(readBuffer.subarray(0, c.length));
      }
      for (let ev = dec.next(); ev !== NEED_MORE; ev = dec.next()) {
        events.push(ev);
        assert.ok(events.length <= maxEvents, `more than ${maxEvents} events from ${whole.length} bytes: the decoder does not progress`);
      }
      assert.ok(dec.bufferedBytes <= maxBuffered, `decoder holds ${dec.bufferedBytes} bytes after NEED_MORE`);
      if (readBuffer !== undefined) {
        dec.retainUnread();
        readBuffer.fill(0xee, 0, c.length);
      }
    }
    if (o.end !== false) dec.end();
    return { events };
  } catch (err) {
    if (err instanceof assert.AssertionError) throw err;
    const e = expectCoded(err, 'StreamDecoder');
    return { events, error: { code: e.code, streamOffset: e.streamOffset, message: e.message } };
  }
}

function analyze(chunks: readonly Buffer[], whole: Buffer, o: { keepRam: boolean; layout?: 'vmdesc' | 'scan' }): AnalysisReport | { code: string; streamOffset: number | undefined; message: string } {
  const dl = o.layout === 'vmdesc' ? vmdescLayout(whole) : undefined;
  try {
    const a = new StreamAnalyzer({
      keepRam: o.keepRam,
      maxRamBytes: 128 * 2 ** 20,
      decoder: { maxSectionBytes: LIMITS.maxSectionBytes, maxVmdescBytes: LIMITS.maxVmdescBytes },
      ...(dl === undefined ? {} : { deviceLayout: dl }),
    });
    for (const c of chunks) a.push(c);
    return a.end();
  } catch (err) {
    const e = expectCoded(err, 'StreamAnalyzer');
    return { code: e.code, streamOffset: e.streamOffset, message: e.message };
  }
}

function decodeRp(chunks: readonly Buffer[], options: ReturnPathDecoderOptions = {}): Outcome<ReturnPathMessage> {
  const dec = new ReturnPathDecoder(options);
  const events: ReturnPathMessage[] = [];
  let bytes = 0;
  try {
    for (const c of chunks) {
      bytes += c.length;
      dec.push(c);
      for (let m = dec.next(); m !== NEED_MORE_RP; m = dec.next()) {
        events.push(m);
        assert.ok(events.length <= bytes / 4, 'return-path messages without bytes');
      }
    }
    dec.end();
    return { events };
  } catch (err) {
    if (err instanceof assert.AssertionError) throw err;
    const e = expectCoded(err, 'ReturnPathDecoder');
    return { events, error: { code: e.code, streamOffset: e.streamOffset, message: e.message } };
  }
}

/** Cut points: a sorted random set, plus optionally a window cut at every byte. */
function cutsArb(length: number, maxCuts: number): fc.Arbitrary<number[]> {
  if (length < 2) return fc.constant([]);
  const pos = fc.integer({ min: 1, max: length - 1 });
  return fc
    .tuple(
      fc.uniqueArray(pos, { maxLength: maxCuts }),
      fc.option(fc.tuple(pos, fc.integer({ min: 1, max: 600 })), { nil: undefined }),
    )
    .map(([cuts, window]) => {
      const all = [...cuts];
      if (window !== undefined) for (let i = window[0]; i < Math.min(length, window[0] + window[1]); i++) all.push(i);
      return [...new Set(all)].sort((a, b) => a - b);
    });
}

const memoryNow = (): number => process.memoryUsage().arrayBuffers;

const missing = fixturesMissing();
const fixtures = new Map<string, Fixture>();
function fixture(name: string): Fixture {
  let f = fixtures.get(name);
  if (f === undefined) fixtures.set(name, (f = loadFixture(name)));
  return f;
}
const SMALL = 100_000;

// ---- chunking invariance ----------------------------------------------------------------------

describe('chunking invariance', { skip: missing }, () => {
  for (const name of fixtureNames()) {
    it(`${name}: random split points give the events and the analyzer report of the whole stream`, () => {
      const f = fixture(name);
      const s = f.stream;
      const small = s.length < SMALL;
      const whole = { scan: decode([s], s, { layout: 'scan' }), vmdesc: decode([s], s, { layout: 'vmdesc' }) };
      assert.equal(whole.scan.error, undefined);
      assert.equal(whole.vmdesc.error, undefined);
      fc.assert(
        fc.property(cutsArb(s.length, small ? 300 : 60), fc.constantFrom<'scan' | 'vmdesc'>('scan', 'vmdesc'), fc.boolean(), (cuts, layout, reuse) => {
          assert.deepStrictEqual(decode(split(s, cuts), s, { layout, reuse }), whole[layout]);
        }),
        { numRuns: small ? 40 : 8 },
      );
      // The analyzer rebuilds RAM (so page placement and XBZRLE across chunk borders are checked by
      // the blocks' sha256); it is the costly part, so only a few runs.
      const report = analyze([s], s, { keepRam: true });
      assert.equal('code' in report, false);
      fc.assert(
        fc.property(cutsArb(s.length, small ? 300 : 60), (cuts) => {
          assert.deepStrictEqual(analyze(split(s, cuts), s, { keepRam: true }), report);
        }),
        { numRuns: small ? 4 : 2 },
      );
    });
  }

  it('none-x-ignore-shared-16m: a single split at every offset gives the events of the whole stream', () => {
    const s = fixture('none-x-ignore-shared-16m').stream;
    const whole = decode([s], s, { ram: true });
    for (let k = 1; k < s.length; k++) assert.deepStrictEqual(decode([s.subarray(0, k), s.subarray(k)], s, { ram: true }), whole, `split at ${k}`);
  });

  for (const name of ['none-x-ignore-shared-16m', 'live-tcp-return-path-16m']) {
    it(`${name}: one byte at a time gives the events and the report of the whole stream`, () => {
      const s = fixture(name).stream;
      const bytes = everyByte(s);
      const whole = decode([s], s, { layout: 'vmdesc' });
      assert.deepStrictEqual(decode(bytes, s, { layout: 'vmdesc' }), whole);
      assert.deepStrictEqual(decode(bytes, s, { layout: 'vmdesc', reuse: true }), whole);
      assert.deepStrictEqual(analyze(bytes, s, { keepRam: true }), analyze([s], s, { keepRam: true }));
    });
  }

  it('return-path captures decode the same in any chunking and one byte at a time', () => {
    for (const name of fixtureNames()) {
      const rp = fixture(name).returnPath;
      if (rp === undefined) continue;
      const whole = decodeRp([rp]);
      assert.equal(whole.error, undefined);
      assert.deepStrictEqual(decodeRp(everyByte(rp)), whole);
      fc.assert(
        fc.property(cutsArb(rp.length, 40), (cuts) => {
          assert.deepStrictEqual(decodeRp(split(rp, cuts)), whole);
        }),
        { numRuns: 50 },
      );
    }
  });

  it('corrupted streams fail the same way (same events, code and offset) in any chunking', () => {
    const names = fixtureNames().filter((n) => fixture(n).stream.length < SMALL);
    fc.assert(
      fc.property(
        fc.constantFrom(...names),
        fc.nat(),
        fc.integer({ min: 0, max: 255 }),
        fc.array(fc.nat(), { maxLength: 40 }),
        (name, at, value, rawCuts) => {
          const s = Buffer.from(fixture(name).stream);
          s[at % s.length] = value;
          const whole = decode([s], s, { ram: true });
          const cuts = [...new Set(rawCuts.map((c) => 1 + (c % (s.length - 1))))].sort((a, b) => a - b);
          assert.deepStrictEqual(decode(split(s, cuts), s, { ram: true }), whole);
          assert.deepStrictEqual(decode(split(s, cuts), s, { ram: true, reuse: true }), whole);
        },
      ),
      { numRuns: 120 },
    );
  });
});

// ---- prefixes and truncation ------------------------------------------------------------------

/** Cheap identity of an event, for comparing long event lists many times. */
const fingerprint = (e: DecoderEvent): string => `${e.kind}@${e.offset}`;

/** `events` is a prefix of `all`: same kinds and offsets, and its last event equal in full. */
function assertEventPrefix(events: readonly DecoderEvent[], all: readonly DecoderEvent[], where: string): void {
  assert.ok(events.length <= all.length, where);
  assert.deepStrictEqual(events.map(fingerprint), all.slice(0, events.length).map(fingerprint), where);
  if (events.length > 0) assert.deepStrictEqual(events.at(-1), all[events.length - 1], where);
}

/** Decode exactly `prefix` bytes; every next() must give an event or NEED_MORE. */
function decodePrefix(prefix: Buffer, options: StreamDecoderOptions = {}): { events: DecoderEvent[]; dec: StreamDecoder } {
  const dec = new StreamDecoder({ ...LIMITS, ...options });
  const events: DecoderEvent[] = [];
  dec.push(prefix);
  try {
    for (let ev = dec.next(); ev !== NEED_MORE; ev = dec.next()) events.push(ev);
  } catch (err) {
    assert.fail(`next() threw on a ${prefix.length}-byte prefix: ${(err as Error)?.stack ?? String(err)}`);
  }
  return { events, dec };
}

/** end() must throw LM_ERR_TRUNCATED naming where the unfinished record starts. */
function assertTruncated(dec: StreamDecoder, k: number, where: string): void {
  let thrown: unknown;
  try {
    dec.end();
  } catch (err) {
    thrown = err;
  }
  assert.ok(thrown !== undefined, `${where}: end() after ${k} bytes did not throw`);
  const e = expectCoded(thrown, where);
  assert.equal(e.code, 'LM_ERR_TRUNCATED', `${where}: ${e.message}`);
  assert.equal(e.streamOffset, dec.streamOffset, `${where}: offset of the unfinished record`);
  assert.ok(e.streamOffset! <= k);
  assert.match(e.message, /stream ended inside/);
}

describe('prefixes and truncation', { skip: missing }, () => {
  it('every prefix of none-x-ignore-shared-16m gives a prefix of the events; end() there is LM_ERR_TRUNCATED', () => {
    const f = fixture('none-x-ignore-shared-16m');
    const s = f.stream;
    const all = decode([s], s);
    assert.equal(all.error, undefined);
    // A stream may legitimately stop right after its final EOF (no VMDESCRIPTION, as in postcopy).
    const complete = new Set([f.manifest.eof_offset + 1, s.length]);
    for (let k = 0; k <= s.length; k++) {
      const { events, dec } = decodePrefix(s.subarray(0, k));
      assertEventPrefix(events, all.events, `prefix ${k}`);
      if (complete.has(k)) dec.end();
      else assertTruncated(dec, k, `prefix ${k}`);
    }
  });

  it('sampled prefixes of the postcopy capture and the XBZRLE stream behave the same', () => {
    for (const name of ['live-tcp-postcopy-requests-32m', 'pc-xbzrle-32m']) {
      const f = fixture(name);
      const s = f.stream;
      const all = decode([s], s).events;
      // Record boundaries ± 1 (from the manifest), plus random offsets.
      const interesting: number[] = [];
      const walk = (records: any[]): void => {
        for (const r of records) {
          for (const d of [-1, 0, 1, 5, 6]) interesting.push(r.offset + d);
          if (r.end !== undefined) interesting.push(r.end - 1, r.end);
          if (r.package !== undefined) walk(r.package);
        }
      };
      walk(f.manifest.records);
      // At most ~120 of them (pc-xbzrle-32m has ~1000 records; each prefix is decoded from 0).
      const stride = Math.ceil(interesting.length / 120);
      const check = (k: number): void => {
        if (k < 0 || k >= s.length) return;
        const { events, dec } = decodePrefix(s.subarray(0, k));
        assertEventPrefix(events, all, `${name} prefix ${k}`);
        if (k !== f.manifest.eof_offset + 1) assertTruncated(dec, k, `${name} prefix ${k}`);
      };
      for (let i = 0; i < interesting.length; i += stride) check(interesting[i]!);
      fc.assert(fc.property(fc.integer({ min: 0, max: s.length - 1 }), (k) => check(k)), { numRuns: 40 });
    }
  });

  it('truncation at every offset of none-x-ignore-shared-16m, in random chunks, through the analyzer: LM_ERR_TRUNCATED', () => {
    const f = fixture('none-x-ignore-shared-16m');
    const s = f.stream;
    const complete = new Set([f.manifest.eof_offset + 1, s.length]);
    fc.assert(
      fc.property(fc.array(fc.integer({ min: 1, max: 64 }), { minLength: 1, maxLength: 16 }), (sizes) => {
        for (let k = 0; k < s.length; k++) {
          const t = s.subarray(0, k);
          const cuts: number[] = [];
          for (let at = 0, i = 0; at < k; i++) cuts.push((at += sizes[i % sizes.length]!));
          const rep = analyze(split(t, cuts), t, { keepRam: false });
          if (complete.has(k)) assert.equal('code' in rep, false, `prefix ${k}`);
          else assert.equal((rep as { code: string }).code, 'LM_ERR_TRUNCATED', `prefix ${k}`);
        }
      }),
      { numRuns: 3 },
    );
  });

  it('truncation at every offset of the discard / PACKAGED / PING region of the postcopy capture: LM_ERR_TRUNCATED', () => {
    // A decoder resumed at the first POSTCOPY_RAM_DISCARD (state ADVISE, "ram" and its blocks known)
    // sees the same events as the whole stream there, and every cut inside the region is caught.
    const f = fixture('live-tcp-postcopy-requests-32m');
    const m = f.manifest;
    const s = f.stream;
    const start = m.records.find((r: any) => r.cmd_name === 'POSTCOPY_RAM_DISCARD').offset as number;
    const after = m.records.find((r: any) => r.type === 'SECTION_PART' && r.offset > start).offset as number;
    const ramStart = m.records.find((r: any) => r.type === 'SECTION_START');
    const resume: NonNullable<StreamDecoderOptions['resume']> = {
      postcopyState: PostcopyState.ADVISE,
      sections: [{ sectionId: ramStart.section_id, idstr: 'ram', instanceId: 0, versionId: 4 }],
      blocks: m.ram_blocks.map((b: any) => ({ idstr: b.idstr, length: b.used_length })),
    };
    const region = s.subarray(start, after);
    const expected = decode([s], s).events.filter((e) => e.offset >= start && e.offset < after && !(e.kind === 'sectionStart' && e.offset === after));
    const resumed = decodePrefix(region, { resume, startOffset: start });
    assert.deepStrictEqual(resumed.events, expected);
    for (let k = 0; k < region.length; k++) {
      const { events, dec } = decodePrefix(region.subarray(0, k), { resume, startOffset: start });
      assertEventPrefix(events, expected, `offset ${start + k}`);
      assertTruncated(dec, start + k, `offset ${start + k}`);
    }
  });

  it('truncation at every offset of the head and the tail of none-postcopy-advise-16m: LM_ERR_TRUNCATED', () => {
    const f = fixture('none-postcopy-advise-16m');
    const s = f.stream;
    const all = decode([s], s).events;
    const endSection = f.manifest.records.find((r: any) => r.type === 'SECTION_END').offset as number;
    const offsets: number[] = [];
    for (let k = 0; k < 2048; k++) offsets.push(k);
    for (let k = endSection; k < s.length; k++) offsets.push(k);
    for (const k of offsets) {
      const { events, dec } = decodePrefix(s.subarray(0, k));
      assertEventPrefix(events, all, `prefix ${k}`);
      if (k !== f.manifest.eof_offset + 1) assertTruncated(dec, k, `prefix ${k}`);
    }
  });
});

// ---- random and mutated input -----------------------------------------------------------------

type Mutation =
  | { kind: 'flip'; at: number; bit: number }
  | { kind: 'set'; at: number; value: number }
  | { kind: 'word'; at: number; value: number; width: 2 | 4 | 8 }
  | { kind: 'many'; changes: [number, number][] };

const mutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  fc.record({ kind: fc.constant('flip' as const), at: fc.nat(), bit: fc.integer({ min: 0, max: 7 }) }),
  fc.record({ kind: fc.constant('set' as const), at: fc.nat(), value: fc.integer({ min: 0, max: 255 }) }),
  fc.record({
    kind: fc.constant('word' as const),
    at: fc.nat(),
    value: fc.constantFrom(0, 1, 0x7f, 0x80, 0xff, 0x7fffffff, 0x80000000, 0xffffffff, 0x1000, 0x10000),
    width: fc.constantFrom<2 | 4 | 8>(2, 4, 8),
  }),
  fc.record({ kind: fc.constant('many' as const), changes: fc.array(fc.tuple(fc.nat(), fc.integer({ min: 0, max: 255 })), { minLength: 2, maxLength: 12 }) }),
);

/** Apply in place (mapping `at` onto interesting offsets half of the time); returns an undo. */
function mutate(s: Buffer, interesting: readonly number[], m: Mutation, targeted: boolean): () => void {
  const place = (at: number, width = 1): number => {
    const k = targeted ? interesting[at % interesting.length]! : at % s.length;
    return Math.min(k, s.length - width);
  };
  const saved: [number, number][] = [];
  const set = (k: number, v: number): void => {
    saved.push([k, s[k]!]);
    s[k] = v;
  };
  switch (m.kind) {
    case 'flip': {
      const k = place(m.at);
      set(k, s[k]! ^ (1 << m.bit));
      break;
    }
    case 'set':
      set(place(m.at), m.value);
      break;
    case 'word': {
      const k = place(m.at, m.width);
      const bytes = Buffer.alloc(8);
      bytes.writeUInt32BE(m.value >>> 0, 4);
      if (m.value === 0xffffffff && m.width === 8) bytes.writeUInt32BE(0xffffffff, 0);
      for (let i = 0; i < m.width; i++) set(k + i, bytes[8 - m.width + i]!);
      break;
    }
    case 'many':
      for (const [at, v] of m.changes) set(place(at), v);
      break;
  }
  return () => {
    for (let i = saved.length - 1; i >= 0; i--) s[saved[i]![0]] = saved[i]![1];
  };
}

describe('random and mutated input', { skip: missing }, () => {
  it('mutated fixtures (bit flips, bytes, huge words at length fields) end in success or a coded error', () => {
    const work = new Map<string, { s: Buffer; interesting: number[] }>();
    for (const name of fixtureNames()) {
      const f = fixture(name);
      work.set(name, { s: Buffer.from(f.stream), interesting: interestingOffsets(f.manifest, f.stream.length) });
    }
    pool ??= Buffer.alloc(POOL_BYTES);
    const before = memoryNow();
    let peak = before;
    const codes = new Map<string, number>();
    fc.assert(
      fc.property(
        fc.constantFrom(...work.keys()),
        mutationArb,
        fc.boolean(),
        fc.constantFrom<'scan' | 'vmdesc'>('scan', 'vmdesc'),
        fc.array(fc.nat(), { maxLength: 8 }),
        (name, m, targeted, layout, rawCuts) => {
          const { s, interesting } = work.get(name)!;
          const undo = mutate(s, interesting, m, targeted);
          try {
            const cuts = rawCuts.map((c) => 1 + (c % (s.length - 1))).sort((a, b) => a - b);
            const out = decode(split(s, cuts), s, { ram: true, layout });
            if (out.error !== undefined) codes.set(out.error.code, (codes.get(out.error.code) ?? 0) + 1);
          } finally {
            undo();
          }
          peak = Math.max(peak, memoryNow());
        },
      ),
      { numRuns: 400 },
    );
    // Nothing but stream copies, small device data and command payloads may be allocated.
    assert.ok(peak - before < 64 * 2 ** 20, `arrayBuffers grew by ${peak - before} bytes`);
    assert.ok(codes.size >= 5, `mutations produced only ${[...codes.keys()].join(', ')}`);
  });

  it('mutated small fixtures through the analyzer (VMDESCRIPTION JSON included) end in success or a coded error', () => {
    const names = fixtureNames().filter((n) => fixture(n).stream.length < SMALL);
    fc.assert(
      fc.property(fc.constantFrom(...names), mutationArb, fc.boolean(), fc.constantFrom<'scan' | 'vmdesc'>('scan', 'vmdesc'), (name, m, nearEnd, layout) => {
        const f = fixture(name);
        const s = Buffer.from(f.stream);
        // Half of the runs aim at the VMDESCRIPTION (its JSON sizes the device sections).
        const desc = f.manifest.vmdescription;
        const interesting = nearEnd && desc !== null ? Array.from({ length: desc.len + 5 }, (_, i) => desc.offset + i) : interestingOffsets(f.manifest, f.stream.length);
        mutate(s, interesting, m, true);
        analyze([s], s, { keepRam: false, layout });
      }),
      { numRuns: 300 },
    );
  });

  it('random bytes, alone or after a valid header, configuration or fixture prefix, end in success or a coded error', () => {
    const s = fixture('none-x-ignore-shared-16m').stream;
    const w = new BatchWriter();
    writeStreamHeader(w);
    const header = w.flushConcat();
    const configEnd = fixture('none-x-ignore-shared-16m').manifest.configuration.end as number;
    const before = memoryNow();
    fc.assert(
      fc.property(
        fc.constantFrom('none', 'header', 'config', 'prefix'),
        fc.nat(s.length),
        fc.uint8Array({ maxLength: 4096 }),
        fc.array(fc.nat(), { maxLength: 16 }),
        (lead, cut, tail, rawCuts) => {
          const head = lead === 'none' ? Buffer.alloc(0) : lead === 'header' ? header : lead === 'config' ? s.subarray(0, configEnd) : s.subarray(0, cut);
          const input = Buffer.concat([head, tail]);
          const cuts = input.length < 2 ? [] : rawCuts.map((c) => 1 + (c % (input.length - 1))).sort((a, b) => a - b);
          decode(split(input, cuts), input, { ram: true });
        },
      ),
      { numRuns: 1500 },
    );
    assert.ok(memoryNow() - before < 64 * 2 ** 20);
  });

  it('random bytes and mutated captures on the return path end in a message list or a coded error', () => {
    const rps = fixtureNames()
      .map((n) => fixture(n).returnPath)
      .filter((b): b is Buffer => b !== undefined);
    const before = memoryNow();
    fc.assert(
      fc.property(
        fc.oneof(
          fc.uint8Array({ maxLength: 600 }).map((b) => Buffer.from(b)),
          fc.tuple(fc.constantFrom(...rps), fc.nat(), fc.integer({ min: 0, max: 255 })).map(([rp, at, v]) => {
            const b = Buffer.from(rp);
            b[at % b.length] = v;
            return b;
          }),
          // A valid header of each type with a random body.
          fc.tuple(fc.oneof(fc.integer({ min: 0, max: 9 }), fc.constant(RP_LIVEMIG_EXT)), fc.integer({ min: 0, max: 0xffff }), fc.uint8Array({ maxLength: 64 })).map(([type, len, body]) => {
            const b = Buffer.alloc(4 + body.length);
            b.writeUInt16BE(type, 0);
            b.writeUInt16BE(len, 2);
            b.set(body, 4);
            return b;
          }),
        ),
        fc.boolean(),
        fc.boolean(),
        fc.array(fc.nat(), { maxLength: 8 }),
        (input, withBitmapSizes, livemigExtensions, rawCuts) => {
          const cuts = input.length < 2 ? [] : rawCuts.map((c) => 1 + (c % (input.length - 1))).sort((a, b) => a - b);
          const options: ReturnPathDecoderOptions = { maxBitmapBytes: 1 << 16, livemigExtensions };
          if (withBitmapSizes) options.bitmapBytes = (block) => (block === 'pc.ram' ? 1024 : undefined);
          const whole = decodeRp([input], options);
          assert.deepStrictEqual(decodeRp(split(input, cuts), options), whole);
        },
      ),
      { numRuns: 1500 },
    );
    assert.ok(memoryNow() - before < 64 * 2 ** 20);
  });
});

// ---- huge length fields -----------------------------------------------------------------------

function bytesOf(build: (w: BatchWriter) => void): Buffer {
  const w = new BatchWriter();
  build(w);
  return w.flushConcat();
}

/** Header, configuration and a RAM START section with its MEM_SIZE list (one 64 KiB block "m0"). */
function ramStart(w: BatchWriter): void {
  writeStreamHeader(w);
  writeConfiguration(w, { machineType: 'none' });
  writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
  writeMemSize(w, [{ idstr: 'm0', length: 0x10000 }]);
  writeEos(w);
  writeSectionFooter(w, 2);
  writeSectionHeader(w, { kind: 'part', sectionId: 2 });
}

/** Push `chunks` and drain; returns the coded error (or undefined) and the decoder. */
function feed(chunks: Buffer[], options: StreamDecoderOptions = {}): { err: (Error & { code: string; streamOffset?: number }) | undefined; dec: StreamDecoder; events: DecoderEvent[] } {
  const dec = new StreamDecoder({ ...LIMITS, ...options });
  const events: DecoderEvent[] = [];
  try {
    for (const c of chunks) {
      dec.push(c);
      for (let ev = dec.next(); ev !== NEED_MORE; ev = dec.next()) events.push(ev);
    }
    return { err: undefined, dec, events };
  } catch (err) {
    return { err: expectCoded(err, 'feed'), dec, events };
  }
}

describe('huge length fields', () => {
  it('a VMDESCRIPTION length of 0xffffffff is refused with LM_ERR_LIMIT_EXCEEDED before its bytes arrive', () => {
    const stream = bytesOf((w) => {
      writeStreamHeader(w);
      writeEof(w);
    });
    const before = memoryNow();
    const { err, dec } = feed([stream, Buffer.from([0x06, 0xff, 0xff, 0xff, 0xff])], { maxVmdescBytes: 16 * 2 ** 20 });
    assert.equal(err?.code, 'LM_ERR_LIMIT_EXCEEDED');
    assert.equal(err.streamOffset, stream.length + 1);
    assert.match(err.message, /VMDESCRIPTION of 4294967295 bytes/);
    assert.equal(dec.bufferedBytes, 5);
    assert.ok(memoryNow() - before < 2 ** 20);
  });

  it('VMDESCRIPTION lengths past the limit are refused at once, those within it wait for their bytes', () => {
    const stream = bytesOf((w) => {
      writeStreamHeader(w);
      writeEof(w);
    });
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffffffff }), (len) => {
        const h = Buffer.from([0x06, 0, 0, 0, 0]);
        h.writeUInt32BE(len, 1);
        const { err, dec } = feed([stream, h]);
        if (len > LIMITS.maxVmdescBytes) {
          assert.equal(err?.code, 'LM_ERR_LIMIT_EXCEEDED');
        } else {
          assert.equal(err, undefined);
          if (len > 0) assert.throws(() => dec.end(), { code: 'LM_ERR_TRUNCATED' });
        }
      }),
      { numRuns: 200 },
    );
  });

  it('MEM_SIZE totals and block lengths past the limits are refused before any block is attached', () => {
    fc.assert(
      fc.property(
        fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
        fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }),
        fc.integer({ min: 1, max: 255 }),
        (total, length, nameLen) => {
          const t = (total & ~0xfffn) | BigInt(RamFlag.MEM_SIZE);
          const head = bytesOf((w) => {
            writeStreamHeader(w);
            writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
          });
          const body = Buffer.alloc(8 + 1 + nameLen + 8);
          body.writeBigUInt64BE(t, 0);
          body[8] = nameLen;
          body.fill(0x61, 9, 9 + nameLen);
          body.writeBigUInt64BE(length, 9 + nameLen);
          const target = poolTarget();
          let attached = false;
          const { err } = feed([head, body], {
            maxRamBytes: 2 ** 30,
            ram: { attachBlocks: (b, o) => ((attached = true), target.attachBlocks(b, o)) },
          });
          const totalBytes = t & ~0xfffn;
          if (totalBytes === 0n) return; // an empty list: the name bytes are then read as RAM records
          if (totalBytes > 2n ** 30n) {
            assert.equal(err?.code, 'LM_ERR_LIMIT_EXCEEDED');
            assert.equal(err.streamOffset, head.length);
          } else if (length > totalBytes || length % 4096n !== 0n) {
            assert.equal(err?.code, 'LM_ERR_BAD_MEM_SIZE');
            assert.equal(err.streamOffset, head.length + 8);
          }
          if (err !== undefined) assert.equal(attached, false);
        },
      ),
      { numRuns: 300 },
    );
  });

  it('a block list of more blocks than allowed is refused with LM_ERR_LIMIT_EXCEEDED', () => {
    const blocks = Array.from({ length: 40 }, (_, i) => ({ idstr: `b${i}`, length: 4096 }));
    const stream = bytesOf((w) => {
      writeStreamHeader(w);
      writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
      writeMemSize(w, blocks);
    });
    const { err } = feed([stream], { maxRamBlocks: 32 });
    assert.equal(err?.code, 'LM_ERR_LIMIT_EXCEEDED');
    assert.match(err.message, /more than 32 blocks/);
  });

  it('XBZRLE enc_len above the page size is refused before the bytes arrive', () => {
    const head = bytesOf(ramStart);
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 0xffff }), (encLen) => {
        const rec = Buffer.concat([Buffer.from('0000000000000040026d3001', 'hex'), Buffer.from([encLen >> 8, encLen & 0xff])]);
        const { err, dec } = feed([head, rec], { ram: poolTarget() });
        if (encLen > 4096) {
          assert.equal(err?.code, 'LM_ERR_BAD_XBZRLE');
          assert.equal(err.streamOffset, head.length + 12);
          assert.match(err.message, new RegExp(`XBZRLE length ${encLen} exceeds the page size`));
        } else {
          assert.equal(err, undefined);
          // enc_len 0 is a complete record (the page is unchanged, as in QEMU); else it waits.
          assert.equal(dec.bufferedBytes, encLen === 0 ? 0 : rec.length);
        }
      }),
      { numRuns: 200 },
    );
  });

  it('command lengths are checked before the payload is awaited; the longest legal one waits for 65535 bytes at most', () => {
    const head = bytesOf(writeStreamHeader);
    fc.assert(
      fc.property(fc.integer({ min: 0, max: 12 }), fc.integer({ min: 0, max: 0xffff }), (cmd, len) => {
        const h = Buffer.from([0x08, cmd >> 8, cmd & 0xff, len >> 8, len & 0xff]);
        const { err, dec } = feed([head, h]);
        if (err === undefined) {
          assert.ok(len <= 0xffff);
          if (len > 0) assert.equal(dec.bufferedBytes, 5);
        } else {
          assert.ok(['LM_ERR_UNKNOWN_COMMAND', 'LM_ERR_COMMAND_LENGTH', 'LM_ERR_UNEXPECTED_COMMAND'].includes(err.code), err.code);
          assert.equal(err.streamOffset, head.length);
        }
      }),
      { numRuns: 400 },
    );
  });

  it('a PACKAGED blob_len of 0xffffffff allocates nothing: the records inside decode as they come', () => {
    const head = bytesOf((w) => {
      writeStreamHeader(w);
      writePackaged(w, 0xffffffff);
    });
    const ping = bytesOf((w) => {
      for (let i = 0; i < 1000; i++) writePing(w, i);
    });
    const before = memoryNow();
    const chunks = [head];
    for (let i = 0; i < 200; i++) chunks.push(ping);
    const { err, dec, events } = feed(chunks);
    assert.equal(err, undefined);
    assert.equal(events.filter((e) => e.kind === 'command' && e.depth === 1).length, 200_000);
    assert.equal(dec.bufferedBytes, 0);
    assert.ok(memoryNow() - before < 32 * 2 ** 20, `arrayBuffers grew by ${memoryNow() - before}`);
    assert.throws(() => dec.end(), { code: 'LM_ERR_TRUNCATED' });
  });

  it('PACKAGED blob lengths: records running past the blob are LM_ERR_PACKAGE_OVERRUN, never a crash', () => {
    const inner = bytesOf((w) => {
      writeCommand(w, MigCmd.OPEN_RETURN_PATH);
      writePing(w, 7);
      writeEof(w);
    });
    fc.assert(
      fc.property(fc.integer({ min: 0, max: inner.length + 4 }), (blobLen) => {
        const stream = bytesOf((w) => {
          writeStreamHeader(w);
          writePackaged(w, blobLen);
          w.bytes(inner);
          writeEof(w);
        });
        const { err } = feed([stream]);
        if (err !== undefined) assert.ok(['LM_ERR_PACKAGE_OVERRUN', 'LM_ERR_UNKNOWN_RECORD_TYPE', 'LM_ERR_TRAILING_DATA'].includes(err.code), err.code);
      }),
    );
  });

  it('configuration name and capability counts past their limits are LM_ERR_BAD_CONFIGURATION', () => {
    fc.assert(
      fc.property(fc.integer({ min: 256, max: 0xffffffff }), (nameLen) => {
        const b = Buffer.concat([bytesOf(writeStreamHeader), Buffer.from([0x07, 0, 0, 0, 0])]);
        b.writeUInt32BE(nameLen, 9);
        const { err } = feed([b]);
        assert.equal(err?.code, 'LM_ERR_BAD_CONFIGURATION');
        assert.equal(err.streamOffset, 9);
      }),
      { numRuns: 50 },
    );
    fc.assert(
      fc.property(fc.integer({ min: 65, max: 0xffffffff }), (count) => {
        const b = bytesOf((w) => {
          writeStreamHeader(w);
          writeConfiguration(w, { machineType: 'none' });
          w.u8(0x05).cstr('configuration/capabilities').be32(1).be32(count);
        });
        const { err } = feed([b]);
        assert.equal(err?.code, 'LM_ERR_BAD_CONFIGURATION');
        assert.match(err.message, new RegExp(`${count} capabilities`));
      }),
      { numRuns: 50 },
    );
  });

  it('COMPRESS_PAGE lengths and declared device lengths past the limits are LM_ERR_LIMIT_EXCEEDED', () => {
    const head = bytesOf(ramStart);
    fc.assert(
      fc.property(fc.integer({ min: 4111, max: 0xffffffff }), (clen) => {
        const rec = Buffer.concat([Buffer.from('0000000000000100026d30', 'hex'), Buffer.alloc(4)]);
        rec.writeUInt32BE(clen, 11);
        const { err } = feed([head, rec], { ram: poolTarget() });
        assert.equal(err?.code, 'LM_ERR_LIMIT_EXCEEDED');
      }),
      { numRuns: 50 },
    );
    fc.assert(
      fc.property(fc.integer({ min: LIMITS.maxSectionBytes + 1, max: 2 ** 40 }), (declared) => {
        const b = bytesOf((w) => {
          writeStreamHeader(w);
          writeSectionHeader(w, { kind: 'full', sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 });
        });
        const { err } = feed([b], { deviceLayout: () => declared });
        assert.equal(err?.code, 'LM_ERR_LIMIT_EXCEEDED');
        assert.equal(err.streamOffset, b.length);
      }),
      { numRuns: 50 },
    );
  });

  it('a device section with no footer in reach is LM_ERR_FOOTER_NOT_FOUND once maxSectionBytes are buffered, not later', () => {
    const b = bytesOf((w) => {
      writeStreamHeader(w);
      writeSectionHeader(w, { kind: 'full', sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 });
    });
    const filler = Buffer.alloc(64 * 1024, 0x11);
    const chunks = [b];
    for (let i = 0; i < 20; i++) chunks.push(filler);
    const { err, dec } = feed(chunks, { maxSectionBytes: 256 * 1024 });
    assert.equal(err?.code, 'LM_ERR_FOOTER_NOT_FOUND');
    assert.ok(dec.bufferedBytes <= 256 * 1024 + filler.length);
  });

  it('a footer scan over 0x7e-dense data in small chunks does linear work (it was quadratic: minutes, a hang)', () => {
    // 1 MiB of 0x7e (every byte a footer candidate) in 1 KiB chunks, and 128 KiB one byte at a
    // time, with and without retainUnread(); then the real footer and EOF. Before the ByteReader
    // kept its place in the chunk list, each candidate and each scan re-walked every chunk.
    const head = bytesOf((w) => {
      writeStreamHeader(w);
      writeSectionHeader(w, { kind: 'full', sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 });
    });
    const tailBytes = bytesOf((w) => {
      writeSectionFooter(w, 0);
      writeEof(w);
    });
    for (const [size, chunk] of [
      [LIMITS.maxSectionBytes - 64, 1024],
      [128 * 1024, 1],
    ] as const) {
      const data = Buffer.alloc(size, 0x7e);
      const s = Buffer.concat([head, data, tailBytes]);
      const chunks = [head, ...split(data, Array.from({ length: Math.ceil(size / chunk) }, (_, i) => i * chunk)), tailBytes];
      for (const reuse of [false, true]) {
        const out = decode(chunks, s, { reuse });
        assert.equal(out.error, undefined);
        const sec = out.events.find((e) => e.kind === 'sectionEnd');
        assert.equal(sec?.kind === 'sectionEnd' && sec.dataLength, size);
      }
    }
  });

  it('retainUnread() after every small read keeps a 4 MiB VMDESCRIPTION linear (it copied everything each time)', () => {
    const json = `{"page_size": 4096, "devices": [], "pad": "${' '.repeat(4 * 2 ** 20)}"}`;
    const stream = bytesOf((w) => {
      writeStreamHeader(w);
      writeEof(w);
      writeVmdescription(w, json);
    });
    const cuts = Array.from({ length: Math.ceil(stream.length / 512) }, (_, i) => i * 512);
    const out = decode(split(stream, cuts), stream, { reuse: true, decoder: { maxVmdescBytes: 8 * 2 ** 20 } });
    assert.equal(out.error, undefined);
    const desc = out.events.find((e) => e.kind === 'vmdescription');
    assert.equal(desc?.kind === 'vmdescription' && desc.json, json);
  });

  it('return-path lengths: over 512 is LM_ERR_RP_LENGTH at once; huge RECV_BITMAP sizes are LM_ERR_LIMIT_EXCEEDED before the bitmap', () => {
    fc.assert(
      fc.property(fc.integer({ min: 1, max: 6 }), fc.integer({ min: 513, max: 0xffff }), (type, len) => {
        const b = Buffer.alloc(4);
        b.writeUInt16BE(type, 0);
        b.writeUInt16BE(len, 2);
        const out = decodeRp([b]);
        assert.equal(out.error?.code, 'LM_ERR_RP_LENGTH');
        assert.equal(out.error.streamOffset, 0);
      }),
      { numRuns: 100 },
    );
    fc.assert(
      fc.property(fc.bigInt({ min: 0n, max: (1n << 64n) - 1n }), (size) => {
        const head = bytesOf((w) => w.be16(RpMsg.RECV_BITMAP).be16(7).cstr('pc.ram'));
        const sz = Buffer.alloc(8);
        sz.writeBigUInt64BE(size);
        const before = memoryNow();
        const dec = new ReturnPathDecoder({ maxBitmapBytes: 1 << 20 });
        dec.push(head);
        dec.push(sz);
        let err: unknown;
        try {
          assert.equal(dec.next(), NEED_MORE_RP);
        } catch (e) {
          err = e;
        }
        if (size >= 1n << 53n || (size > 1n << 20n && size % 8n === 0n)) {
          const e = expectCoded(err, 'RECV_BITMAP');
          assert.equal(e.code, 'LM_ERR_LIMIT_EXCEEDED');
          assert.equal(e.streamOffset, head.length);
          assert.match(e.message, /RECV_BITMAP for "pc.ram" announces/);
        } else if (size % 8n !== 0n) {
          assert.equal(expectCoded(err, 'RECV_BITMAP').code, 'LM_ERR_BAD_RP_PAYLOAD');
        } else {
          assert.equal(err, undefined);
        }
        assert.ok(memoryNow() - before < 2 ** 20);
      }),
      { numRuns: 300 },
    );
  });
});

// ---- generated streams ------------------------------------------------------------------------
// Synthetic streams from the encoders reach what the fixtures do not: COMPRESS_PAGE, MULTIFD_FLUSH,
// out-of-range pages, postcopy commands in any order (RAM restrictions once listening), nested and
// mis-sized PACKAGED blobs, RECV_BITMAP, SWITCHOVER_START, configuration subsections.

type PageRec = { type: 'zero' | 'page' | 'xbzrle' | 'compress' | 'badCompress' | 'flush'; block: number; page: number; name: boolean; seed: number };
type Item =
  | { t: 'ram'; kind: 'part' | 'end'; records: PageRec[] }
  | { t: 'device'; id: number; data: Uint8Array }
  | { t: 'cmd'; cmd: 'ping' | 'orp' | 'advise0' | 'advise16' | 'discard' | 'listen' | 'run' | 'resume' | 'recvBitmap' | 'colo' | 'switchover'; v: number }
  | { t: 'packaged'; items: Item[]; slack: number };

const BLOCKS: RamBlockInfo[] = [
  { idstr: 'm0', length: 16 * 4096, gpa: 0 },
  { idstr: 'pc.ram', length: 8 * 4096, gpa: 0x100000 },
];

const pageRecArb: fc.Arbitrary<PageRec> = fc.record({
  type: fc.constantFrom<PageRec['type']>('zero', 'page', 'xbzrle', 'xbzrle', 'compress', 'badCompress', 'flush'),
  block: fc.integer({ min: 0, max: 1 }),
  page: fc.integer({ min: 0, max: 17 }),
  name: fc.boolean(),
  seed: fc.nat(),
});

const leafItemArb: fc.Arbitrary<Item> = fc.oneof(
  { weight: 4, arbitrary: fc.record({ t: fc.constant('ram' as const), kind: fc.constantFrom<'part' | 'end'>('part', 'part', 'end'), records: fc.array(pageRecArb, { maxLength: 12 }) }) },
  { weight: 2, arbitrary: fc.record({ t: fc.constant('device' as const), id: fc.constantFrom(0, 40, 41), data: fc.uint8Array({ maxLength: 64 }) }) },
  {
    weight: 3,
    arbitrary: fc.record({
      t: fc.constant('cmd' as const),
      cmd: fc.constantFrom('ping', 'orp', 'advise0', 'advise16', 'discard', 'listen', 'run', 'resume', 'recvBitmap', 'colo', 'switchover'),
      v: fc.nat(),
    }),
  },
) as fc.Arbitrary<Item>;

const itemsArb: fc.Arbitrary<Item[]> = fc.array(
  fc.oneof(
    { weight: 6, arbitrary: leafItemArb },
    { weight: 1, arbitrary: fc.record({ t: fc.constant('packaged' as const), items: fc.array(leafItemArb, { maxLength: 6 }), slack: fc.constantFrom(0, 0, 0, -1, 1, -5, 7) }) },
  ),
  { maxLength: 14 },
);

/** A postcopy run in QEMU's order, so the listening / running paths are reached often. */
const postcopyItemsArb: fc.Arbitrary<Item[]> = fc
  .tuple(fc.array(leafItemArb, { maxLength: 3 }), fc.array(leafItemArb, { maxLength: 4 }), fc.array(leafItemArb, { maxLength: 6 }))
  .map(([pre, inPackage, post]) => [
    { t: 'cmd', cmd: 'orp', v: 0 },
    { t: 'cmd', cmd: 'advise16', v: 0 },
    ...pre,
    { t: 'cmd', cmd: 'discard', v: 1 },
    { t: 'packaged', slack: 0, items: [{ t: 'cmd', cmd: 'listen', v: 0 }, ...inPackage, { t: 'cmd', cmd: 'run', v: 0 }] },
    ...post,
  ]);

interface Generated {
  items: Item[];
  config: 'none' | 'plain' | 'shared' | 'uuid';
  vmdesc: 'none' | 'good' | 'bad';
  maxCommand: number;
}

const generatedArb: fc.Arbitrary<Generated> = fc.record({
  items: fc.oneof(itemsArb, postcopyItemsArb),
  config: fc.constantFrom<Generated['config']>('none', 'plain', 'shared', 'uuid'),
  vmdesc: fc.constantFrom<Generated['vmdesc']>('none', 'good', 'bad'),
  maxCommand: fc.constantFrom(11, 12),
});

function patternPage(seed: number): Buffer {
  const p = Buffer.alloc(4096);
  for (let i = 0; i < 4096; i += 4) p.writeUInt32BE((seed * 2654435761 + i) >>> 0, i);
  return p;
}

function writeItems(w: BatchWriter, rw: RamRecordWriter, items: readonly Item[]): void {
  for (const it of items) {
    switch (it.t) {
      case 'ram':
        writeSectionHeader(w, { kind: it.kind, sectionId: 2 });
        for (const r of it.records) {
          const block = BLOCKS[r.block]!.idstr;
          const off = r.page * 4096;
          rw.alwaysName = r.name;
          const page = patternPage(r.seed);
          switch (r.type) {
            case 'zero':
              rw.zeroPage(w, block, off);
              break;
            case 'page':
              rw.page(w, block, off, page, 0);
              break;
            case 'xbzrle': {
              const cur = Buffer.from(page);
              for (let i = 0; i < 1 + (r.seed % 40); i++) cur[(r.seed * 31 + i * 97) % 4096]! ^= 0x5a;
              rw.deltaPage(w, block, off, page, 0, cur, 0);
              break;
            }
            case 'compress':
              rw.compressedPage(w, block, off, deflateSync(page.subarray(0, r.seed % 3 === 0 ? 4000 : 4096)));
              break;
            case 'badCompress':
              rw.compressedPage(w, block, off, page.subarray(0, 1 + (r.seed % 64)));
              break;
            case 'flush':
              writeMultifdFlush(w);
              break;
          }
        }
        writeEos(w);
        writeSectionFooter(w, 2);
        break;
      case 'device':
        writeSectionHeader(w, { kind: 'full', sectionId: it.id, idstr: it.id === 0 ? 'timer' : `dev${it.id}`, instanceId: 0, versionId: 1 });
        w.bytes(it.data);
        writeSectionFooter(w, it.id);
        break;
      case 'cmd':
        switch (it.cmd) {
          case 'ping':
            writePing(w, it.v >>> 0);
            break;
          case 'orp':
            writeCommand(w, MigCmd.OPEN_RETURN_PATH);
            break;
          case 'advise0':
            writePostcopyAdvise(w);
            break;
          case 'advise16':
            writePostcopyAdvise(w, { hostPageSizeSummary: 4096, targetPageSize: it.v % 5 === 4 ? 8192 : 4096 });
            break;
          case 'discard':
            writeRamDiscard(w, BLOCKS[it.v % 2]!.idstr, Array.from({ length: 1 + (it.v % 14) }, (_, i) => ({ start: i * 4096, length: 4096 })));
            break;
          case 'listen':
            writeCommand(w, MigCmd.POSTCOPY_LISTEN);
            break;
          case 'run':
            writeCommand(w, MigCmd.POSTCOPY_RUN);
            break;
          case 'resume':
            writeCommand(w, MigCmd.POSTCOPY_RESUME);
            break;
          case 'recvBitmap':
            writeRecvBitmapRequest(w, BLOCKS[it.v % 2]!.idstr);
            break;
          case 'colo':
            writeCommand(w, MigCmd.ENABLE_COLO);
            break;
          case 'switchover':
            writeCommand(w, MigCmd.SWITCHOVER_START);
            break;
        }
        break;
      case 'packaged': {
        const inner = new BatchWriter();
        writeItems(inner, rw, it.items);
        writeEof(inner);
        const blob = inner.flushConcat();
        writePackaged(w, Math.max(0, blob.length + it.slack));
        w.bytes(blob);
        break;
      }
    }
  }
}

function buildGenerated(g: Generated): Buffer {
  const w = new BatchWriter();
  const rw = new RamRecordWriter();
  writeStreamHeader(w);
  if (g.config !== 'none') {
    writeConfiguration(w, {
      machineType: 'pc-i440fx-7.2',
      ...(g.config === 'shared' ? { capabilities: ['x-ignore-shared'] } : {}),
      ...(g.config === 'uuid' ? { uuid: '12345678-9abc-def0-1122-334455667788' } : {}),
    });
  }
  writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
  writeMemSize(w, BLOCKS, { ignoreShared: g.config === 'shared' });
  writeEos(w);
  writeSectionFooter(w, 2);
  writeItems(w, rw, g.items);
  writeEof(w);
  if (g.vmdesc !== 'none') writeVmdescription(w, g.vmdesc === 'good' ? '{"page_size": 4096, "devices": []}' : '{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "fields": [{"name": "x"}]}]}');
  return w.flushConcat();
}

/** Decode with fresh guest memory and return the outcome plus the memory's hash. */
function decodeFresh(chunks: readonly Buffer[], whole: Buffer, maxCommand: number, reuse = false): Outcome<DecoderEvent> & { memory: string } {
  let mem: Buffer[] = [];
  const out = decode(chunks, whole, {
    reuse,
    decoder: {
      maxCommand,
      ram: {
        attachBlocks: (blocks) => {
          assert.ok(blocks.reduce((a, b) => a + b.length, 0) <= 1 << 20);
          mem = blocks.map((b) => Buffer.alloc(b.length));
          return mem;
        },
      },
    },
  });
  const h = createHash('sha256');
  for (const m of mem) h.update(m);
  return { ...out, memory: h.digest('hex') };
}

describe('generated streams', () => {
  it('decode the same (events, error, guest memory) in any chunking', () => {
    const codes = new Set<string>();
    fc.assert(
      fc.property(generatedArb, fc.array(fc.nat(), { maxLength: 30 }), fc.boolean(), (g, rawCuts, reuse) => {
        const s = buildGenerated(g);
        const whole = decodeFresh([s], s, g.maxCommand);
        if (whole.error !== undefined) codes.add(whole.error.code);
        const cuts = rawCuts.map((c) => 1 + (c % (s.length - 1))).sort((a, b) => a - b);
        assert.deepStrictEqual(decodeFresh(split(s, cuts), s, g.maxCommand, reuse), whole);
      }),
      { numRuns: 300 },
    );
    assert.ok(codes.size >= 5, `generated streams produced only ${[...codes].join(', ')}`);
  });

  it('one byte at a time gives the same result', () => {
    fc.assert(
      fc.property(generatedArb, (g) => {
        const s = buildGenerated(g);
        const whole = decodeFresh([s], s, g.maxCommand);
        assert.deepStrictEqual(decodeFresh(everyByte(s), s, g.maxCommand), whole);
        assert.deepStrictEqual(decodeFresh(everyByte(s), s, g.maxCommand, true), whole);
      }),
      { numRuns: 25 },
    );
  });

  it('mutated generated streams end in success or a coded error, in the decoder and in the analyzer', () => {
    fc.assert(
      fc.property(generatedArb, mutationArb, fc.array(fc.nat(), { maxLength: 8 }), (g, m, rawCuts) => {
        const s = buildGenerated(g);
        mutate(s, [], m, false);
        const cuts = rawCuts.map((c) => 1 + (c % (s.length - 1))).sort((a, b) => a - b);
        decodeFresh(split(s, cuts), s, g.maxCommand);
        analyze(split(s, cuts), s, { keepRam: true });
      }),
      { numRuns: 400 },
    );
  });
});

countSkippedWithoutFixtures('property runs over the QEMU 7.2 fixtures');
