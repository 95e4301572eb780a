// placePages, the destination's native copy of a run of CONTINUE PAGE records: on its own (what it
// takes, where it stops, the written bits), and inside StreamDecoder, where a stream decoded with
// it must leave the same RAM, written bits and counts as one decoded without it, for any split
// of the reads.
//
// Run: node --import tsx --test packages/native/test/place-pages.test.ts (after the install built it)

import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  BatchWriter,
  type DecoderEvent,
  NEED_MORE,
  RamRecordWriter,
  StreamDecoder,
  TARGET_PAGE_SIZE,
  writeConfiguration,
  writeEos,
  writeMemSize,
  writeSectionFooter,
  writeSectionHeader,
  writeStreamHeader,
  MigCmd,
  writeCommand,
  writePostcopyAdvise,
} from '../../protocol/src/index.ts';
import { native } from '../src/index.ts';

const skip = native.available || process.env['CI'] === 'true' ? false : `the native addon is not built (${native.unavailableReason})`;
const PAGE = TARGET_PAGE_SIZE;
const RECORD = 8 + PAGE;

function pageOf(seed: number): Buffer {
  const b = Buffer.alloc(PAGE);
  for (let i = 0; i < PAGE; i += 4) b.writeUInt32LE((seed * 2654435761 + i * 40503) >>> 0, i);
  return b;
}

test('placePages: copies CONTINUE PAGE records into place and sets their written bits; stops at the first it does not take', { skip }, () => {
  const w = new BatchWriter();
  const rec = new RamRecordWriter();
  rec.page(w, 'a', 0, pageOf(0), 0); // named: the caller's record loop reads this one
  const first = w.totalBytes;
  for (const p of [5, 6, 7]) rec.page(w, 'a', p * PAGE, pageOf(p), 0);
  rec.zeroPage(w, 'a', 9 * PAGE);
  const stream = w.flushConcat();
  const mem = Buffer.from(new SharedArrayBuffer(16 * PAGE));
  const written = new Uint32Array(1);
  assert.equal(native.placePages(stream, first, stream.length, mem, written), 3);
  for (const p of [5, 6, 7]) assert.ok(mem.subarray(p * PAGE, (p + 1) * PAGE).equals(pageOf(p)), `page ${p}`);
  assert.equal(written[0], (1 << 5) | (1 << 6) | (1 << 7));
  assert.ok(mem.subarray(0, 5 * PAGE).every((x) => x === 0) && mem.subarray(8 * PAGE).every((x) => x === 0), 'nothing else written');

  // A record cut short by `to`, a page past the block's end, a named record: not taken.
  assert.equal(native.placePages(stream, first, first + 2 * RECORD + 100, mem, undefined), 2);
  assert.equal(native.placePages(stream, first, stream.length, mem.subarray(0, 6 * PAGE), undefined), 1);
  assert.equal(native.placePages(stream, 0, stream.length, mem, undefined), 0);
  assert.equal(native.placePages(stream, first, stream.length, mem, new Uint32Array(0)), 0, 'a written bitmap too short for the page');
  assert.throws(() => native.placePages(stream, 10, 5, mem, undefined), RangeError);
  assert.throws(() => native.placePages(stream, 0, stream.length + 1, mem, undefined), RangeError);
});

/** A stream of RAM sections for blocks a and b: runs of consecutive pages, block switches, ZERO records, pages sent twice. */
function ramStream(): Buffer {
  const w = new BatchWriter();
  const rec = new RamRecordWriter();
  writeStreamHeader(w);
  writeConfiguration(w, { machineType: 'none' });
  writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
  writeMemSize(w, [
    { idstr: 'a', length: 256 * PAGE },
    { idstr: 'b', length: 64 * PAGE },
  ]);
  writeEos(w);
  writeSectionFooter(w, 2);
  let seed = 1;
  for (let section = 0; section < 6; section++) {
    writeSectionHeader(w, { kind: 'part', sectionId: 2 });
    for (let p = 0; p < 256; p++) {
      const page = (p * (section + 1)) % 256;
      rec.page(w, 'a', page * PAGE, pageOf(seed++), 0);
      if (p % 37 === 36) rec.page(w, 'b', (p % 64) * PAGE, pageOf(seed++), 0);
      if (p % 53 === 52) rec.zeroPage(w, 'a', ((p + 7) % 256) * PAGE);
    }
    writeEos(w);
    writeSectionFooter(w, 2);
    rec.forgetBlock();
  }
  return w.flushConcat();
}

/** Pages the native placer took in the last decode. */
let placedByNative = 0;
const countingPlacer = (chunk: Uint8Array, from: number, to: number, mem: Uint8Array, written: Uint32Array | undefined): number => {
  const n = native.placePages(chunk, from, to, mem, written);
  placedByNative += n;
  return n;
};

function decode(stream: Buffer, withPlacer: boolean, readSize: (i: number) => number): { memory: Buffer[]; normal: number; zero: number } {
  const memory = [Buffer.from(new SharedArrayBuffer(256 * PAGE)), Buffer.from(new SharedArrayBuffer(64 * PAGE))];
  placedByNative = 0;
  const decoder = new StreamDecoder({ ram: { attachBlocks: () => memory }, zeroedMemory: true, postcopyPageHooks: true, placePages: withPlacer ? countingPlacer : undefined });
  return { memory, ...feed(decoder, stream, readSize) };
}

/**
 * Push `stream` to `decoder` in reads of `readSize(i)` bytes and decode each; returns the RAM
 * sections' page counts. `onEvent` sees every event.
 */
function feed(decoder: StreamDecoder, stream: Buffer, readSize: (i: number) => number, onEvent?: (ev: DecoderEvent) => void): { normal: number; zero: number } {
  let normal = 0;
  let zero = 0;
  for (let at = 0, i = 0; at < stream.length; i++) {
    const n = Math.min(readSize(i), stream.length - at);
    // A fresh copy per read, as a socket's reads land in a reused buffer.
    decoder.push(Buffer.from(stream.subarray(at, at + n)));
    at += n;
    for (let ev = decoder.next(); ev !== NEED_MORE; ev = decoder.next()) {
      onEvent?.(ev);
      if (ev.kind === 'sectionEnd' && ev.ram !== undefined) {
        normal += ev.ram.normal;
        zero += ev.ram.zero;
      }
    }
    decoder.retainUnread();
  }
  return { normal, zero };
}

/** Read sizes to split a stream by: whole, a record, across records and headers, random (seeded). */
function readSplits(seed: number): ((i: number) => number)[] {
  const rnd = (): number => (seed = (seed * 1103515245 + 12345) >>> 0);
  return [() => 1 << 20, () => RECORD, () => RECORD + 3, () => 4099, () => 65_536 + 7, () => 1 + (rnd() % 20_000)];
}

test('StreamDecoder with placePages leaves the same RAM and counts as without it, for any split of the reads', { skip, timeout: 60_000 }, () => {
  const stream = ramStream();
  const expected = decode(stream, false, () => 1 << 20);
  assert.ok(expected.normal > 1500, `the stream has pages (${expected.normal})`);
  for (const [k, split] of readSplits(99).entries()) {
    const got = decode(stream, true, split);
    assert.deepEqual([got.normal, got.zero], [expected.normal, expected.zero], `split ${k}: counts`);
    // Reads of one record or so leave no run in a chunk; larger ones leave most pages to it.
    if (k === 0) assert.ok(placedByNative > expected.normal / 2, `split ${k}: the native placer took most pages (${placedByNative} of ${expected.normal})`);
    for (const b of [0, 1]) assert.ok(got.memory[b]!.equals(expected.memory[b]!), `split ${k}: block ${b}`);
  }
});

test('placeClaimedPages: claims each page, copies only those it won and not received, marks them received; takes every record', { skip }, () => {
  const w = new BatchWriter();
  const rec = new RamRecordWriter();
  rec.page(w, 'a', 0, pageOf(0), 0);
  const first = w.totalBytes;
  for (const p of [3, 4, 5, 6]) rec.page(w, 'a', p * PAGE, pageOf(p), 0);
  rec.zeroPage(w, 'a', 9 * PAGE);
  const stream = w.flushConcat();
  const mem = Buffer.from(new SharedArrayBuffer(40 * PAGE));
  mem.fill(0xee, 4 * PAGE, 6 * PAGE); // pages 4 and 5 as another thread left them
  const claimed = new Int32Array(new SharedArrayBuffer(8));
  const received = new Int32Array(new SharedArrayBuffer(8));
  claimed[0] = 1 << 4; // page 4: another thread is placing it
  claimed[0] |= 1 << 5;
  received[0] = 1 << 5; // page 5: already here
  const written = new Uint32Array(2);
  assert.equal(native.placeClaimedPages(stream, first, stream.length, mem, written, claimed, received), 4);
  for (const p of [3, 6]) assert.ok(mem.subarray(p * PAGE, (p + 1) * PAGE).equals(pageOf(p)), `page ${p} placed`);
  for (const p of [4, 5]) assert.ok(mem.subarray(p * PAGE, (p + 1) * PAGE).every((x) => x === 0xee), `page ${p} left alone`);
  assert.equal(claimed[0], (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6));
  assert.equal(received[0], (1 << 3) | (1 << 5) | (1 << 6), 'page 4 is the other thread\'s to mark');
  assert.equal(written[0], (1 << 3) | (1 << 4) | (1 << 5) | (1 << 6));

  // Where it stops: a record cut short, a page past the block, bitmaps too short for the page.
  const none = (): Int32Array => new Int32Array(new SharedArrayBuffer(8));
  assert.equal(native.placeClaimedPages(stream, first, first + 2 * RECORD + 9, mem, undefined, none(), none()), 2);
  assert.equal(native.placeClaimedPages(stream, first, stream.length, mem.subarray(0, 5 * PAGE), undefined, none(), none()), 2);
  assert.equal(native.placeClaimedPages(stream, 0, stream.length, mem, undefined, none(), none()), 0, 'a named record');
  assert.equal(native.placeClaimedPages(stream, first, stream.length, mem, undefined, new Int32Array(0), none()), 0);
  assert.equal(native.placeClaimedPages(stream, first, stream.length, mem, undefined, none(), new Int32Array(0)), 0);
  assert.throws(() => native.placeClaimedPages(stream, 10, 5, mem, undefined, none(), none()), RangeError);
  assert.throws(() => native.placeClaimedPages(stream, first, stream.length, mem, undefined, new Uint32Array(2) as unknown as Int32Array, none()), TypeError);
});

/** ramStream() with postcopy listening from the start: the page hooks run for every page. */
function listeningStream(): Buffer {
  const w = new BatchWriter();
  const ram = ramStream();
  // ramStream's header and block list (everything before its first part section), then ADVISE and LISTEN.
  const firstPart = ram.indexOf(Buffer.from([0x02, 0x00, 0x00, 0x00, 0x02]), 13 + 8);
  w.bytes(ram.subarray(0, firstPart));
  writePostcopyAdvise(w, { hostPageSizeSummary: PAGE, targetPageSize: PAGE });
  writeCommand(w, MigCmd.POSTCOPY_LISTEN);
  w.bytes(ram.subarray(firstPart));
  return w.flushConcat();
}

/**
 * Decode in postcopy (listening) with page hooks that claim and mark pages as the destination's
 * do (Atomics on shared bitmaps), and with or without the native run placer. Pages 10-19 of block a
 * are claimed by "another thread" beforehand and pages 20-29 received, with their own bytes.
 */
function decodeListening(stream: Buffer, withRuns: boolean, readSize: (i: number) => number) {
  const sizes = [256, 64];
  const memory = sizes.map((pages) => Buffer.from(new SharedArrayBuffer(pages * PAGE)));
  const claimed = sizes.map((pages) => new Int32Array(new SharedArrayBuffer(pages / 8)));
  const received = sizes.map((pages) => new Int32Array(new SharedArrayBuffer(pages / 8)));
  for (let p = 10; p < 30; p++) Atomics.or(claimed[0]!, p >> 5, 1 << (p & 31));
  for (let p = 20; p < 30; p++) Atomics.or(received[0]!, p >> 5, 1 << (p & 31));
  memory[0]!.fill(0xee, 10 * PAGE, 30 * PAGE);
  let hookCalls = 0;
  let runPages = 0;
  const target = {
    attachBlocks: () => memory,
    acceptPage(block: number, offset: number): boolean {
      const p = offset / PAGE;
      const bit = 1 << (p & 31);
      return (Atomics.or(claimed[block]!, p >> 5, bit) & bit) === 0 && (Atomics.load(received[block]!, p >> 5) & bit) === 0;
    },
    pagePlaced(block: number, offset: number): void {
      const p = offset / PAGE;
      Atomics.or(received[block]!, p >> 5, 1 << (p & 31));
      hookCalls++;
    },
    ...(withRuns
      ? {
          placePageRun(chunk: Uint8Array, from: number, to: number, mem: Uint8Array, written: Uint32Array | undefined): number {
            const block = memory.findIndex((m) => m === mem);
            const n = native.placeClaimedPages(chunk, from, to, mem, written, claimed[block]!, received[block]!);
            runPages += n;
            return n;
          },
        }
      : {}),
  };
  const decoder = new StreamDecoder({ ram: target, zeroedMemory: true, postcopyPageHooks: true, placePages: native.placePages });
  let listening = false;
  const counts = feed(decoder, stream, readSize, (ev) => {
    if (ev.kind === 'command' && ev.command.cmd === MigCmd.POSTCOPY_LISTEN) listening = true;
  });
  return { memory, received: received.map((r) => Array.from(r)), ...counts, hookCalls, runPages, listening };
}

test('StreamDecoder in postcopy with a target\'s run placer (placeClaimedPages) leaves the same RAM, received bits and counts as page by page', { skip, timeout: 60_000 }, () => {
  const stream = listeningStream();
  const expected = decodeListening(stream, false, () => 1 << 20);
  assert.ok(expected.listening, 'the stream put the decoder in postcopy');
  // Each page is placed once: the stream's later copies of it are refused (the guest has it).
  assert.ok(expected.hookCalls > 200, `the page hooks ran for the pages (${expected.hookCalls})`);
  assert.ok(expected.memory[0]!.subarray(20 * PAGE, 30 * PAGE).every((x) => x === 0xee), 'received pages are never overwritten');
  for (const [k, split] of readSplits(7).entries()) {
    const got = decodeListening(stream, true, split);
    assert.deepEqual([got.normal, got.zero], [expected.normal, expected.zero], `split ${k}: counts`);
    if (k === 0) assert.ok(got.runPages > expected.normal / 2, `split ${k}: the run placer took most pages (${got.runPages} of ${expected.normal})`);
    for (const b of [0, 1]) {
      assert.ok(got.memory[b]!.equals(expected.memory[b]!), `split ${k}: block ${b} RAM`);
      assert.deepEqual(got.received[b], expected.received[b], `split ${k}: block ${b} received bits`);
    }
  }
});
