// QEMU 7.2's VFIO section framing: exact bytes of each section type, round trips, the
// incremental measure under any chunking, and every malformed sequence with its offset.

import assert from 'node:assert/strict';
import { describe, test } from 'node:test';
import {
  BatchWriter,
  ByteReader,
  ErrorCode,
  type DecoderEvent,
  measureVfioSection,
  NEED_MORE,
  readVfioSection,
  StreamDecoder,
  type StreamDecoderOptions,
  writeConfiguration,
  writeEof,
  writeSectionFooter,
  writeSectionHeader,
  writeStreamHeader,
  sizeOfVfioConfig,
  VfioMigFlag,
  type VfioScan,
  writeVfioConfig,
  writeVfioDataHeader,
  writeVfioEndOfState,
  writeVfioInitDataSent,
  writeVfioSetup,
} from '../src/index.ts';

const END = 'ffffffffef100001';
const CONFIG = 'ffffffffef100002';
const SETUP = 'ffffffffef100003';
const DATA = 'ffffffffef100004';

function bytes(build: (w: BatchWriter) => void): Buffer {
  const w = new BatchWriter();
  build(w);
  return w.flushConcat();
}

function throwsAt(fn: () => unknown, code: string, streamOffset: number): void {
  assert.throws(fn, (err: { code?: string; streamOffset?: number }) => {
    assert.equal(err.code, code);
    assert.equal(err.streamOffset, streamOffset);
    return true;
  });
}

const setup = bytes(writeVfioSetup);
const iterate = bytes((w) => {
  writeVfioDataHeader(w, 3);
  w.bytes(Buffer.from([0xaa, 0xbb, 0xcc]));
  writeVfioEndOfState(w);
});
const emptyIterate = bytes((w) => {
  writeVfioDataHeader(w, 0);
  writeVfioEndOfState(w);
});
const complete = bytes((w) => {
  writeVfioDataHeader(w, 2);
  w.bytes(Buffer.from([1, 2]));
  writeVfioDataHeader(w, 1);
  w.bytes(Buffer.from([3]));
  writeVfioEndOfState(w);
});
const config = bytes((w) => writeVfioConfig(w, Buffer.from([9, 8, 7, 6])));
/** switchover-ack (QEMU 8.1+): the PART that completes the initial data ends with INIT_DATA_SENT. */
const initDataSent = bytes((w) => {
  writeVfioDataHeader(w, 2);
  w.bytes(Buffer.from([5, 6]));
  writeVfioInitDataSent(w);
});

describe('bytes of each section type', () => {
  test('markers are QEMU 7.2 hw/vfio/migration.c values', () => {
    assert.equal(VfioMigFlag.END_OF_STATE, 0xef100001);
    assert.equal(VfioMigFlag.DEV_CONFIG_STATE, 0xef100002);
    assert.equal(VfioMigFlag.DEV_SETUP_STATE, 0xef100003);
    assert.equal(VfioMigFlag.DEV_DATA_STATE, 0xef100004);
  });

  test('setup: SETUP | END', () => assert.equal(setup.toString('hex'), SETUP + END));
  test('iterate: DATA | be64 size | data | END', () => assert.equal(iterate.toString('hex'), `${DATA}0000000000000003aabbcc${END}`));
  test('iterate with nothing pending: DATA | 0 | END', () => assert.equal(emptyIterate.toString('hex'), `${DATA}0000000000000000${END}`));
  test('complete: DATA frames then END', () => assert.equal(complete.toString('hex'), `${DATA}00000000000000020102${DATA}000000000000000103${END}`));
  test('config: CONFIG | bytes | END', () => {
    assert.equal(config.toString('hex'), `${CONFIG}09080706${END}`);
    assert.equal(config.length, sizeOfVfioConfig(4));
  });
});

describe('readVfioSection', () => {
  test('round trips: phases, counts and payloads', () => {
    assert.deepEqual(readVfioSection(setup, 0, setup.length), { phase: 'setup', dataFrames: 0, dataBytes: 0, configBytes: 0, length: 16, initDataSent: false });
    assert.deepEqual(readVfioSection(emptyIterate, 0, emptyIterate.length), { phase: 'data', dataFrames: 1, dataBytes: 0, configBytes: 0, length: 24, initDataSent: false });
    const seen: string[] = [];
    const handler = {
      onData: (src: Buffer, off: number, len: number) => seen.push(`d:${src.toString('hex', off, off + len)}`),
      onConfig: (src: Buffer, off: number, len: number) => seen.push(`c:${src.toString('hex', off, off + len)}`),
    };
    assert.deepEqual(readVfioSection(complete, 0, complete.length, {}, handler), { phase: 'data', dataFrames: 2, dataBytes: 3, configBytes: 0, length: complete.length, initDataSent: false });
    assert.deepEqual(readVfioSection(config, 0, config.length, {}, handler), { phase: 'config', dataFrames: 0, dataBytes: 0, configBytes: 4, length: 20, initDataSent: false });
    assert.deepEqual(seen, ['d:0102', 'd:03', 'c:09080706']);
  });

  test('a section inside a larger buffer, offsets counted from the stream offset given', () => {
    const buf = Buffer.concat([Buffer.alloc(5), iterate, Buffer.alloc(3)]);
    assert.equal(readVfioSection(buf, 5, iterate.length).dataBytes, 3);
    const bad = Buffer.from(buf);
    bad[5 + 7] = 0x09;
    throwsAt(() => readVfioSection(bad, 5, iterate.length, { streamOffset: 1000 }), ErrorCode.BAD_VFIO_FRAME, 1000);
  });

  const hex = (s: string): Buffer => Buffer.from(s, 'hex');
  const cases: [string, Buffer, string, number][] = [
    // 0xef100005 is INIT_DATA_SENT since QEMU 8.1: the first unknown one is 6.
    ['unknown marker first', hex(`ffffffffef100006${END}`), ErrorCode.BAD_VFIO_FRAME, 0],
    ['not a marker at all', hex(`0000000000000001${END}`), ErrorCode.BAD_VFIO_FRAME, 0],
    ['empty data', Buffer.alloc(0), ErrorCode.BAD_VFIO_FRAME, 0],
    ['setup not closed', hex(SETUP), ErrorCode.BAD_VFIO_FRAME, 8],
    ['setup followed by data', hex(`${SETUP}${DATA}0000000000000000${END}`), ErrorCode.BAD_VFIO_FRAME, 8],
    ['config closed by another marker', hex(`${CONFIG}0102${SETUP}`), ErrorCode.BAD_VFIO_FRAME, 10],
    ['config with no room for END', hex(`${CONFIG}0102`), ErrorCode.BAD_VFIO_FRAME, 0],
    ['data without END', hex(`${DATA}0000000000000001ff`), ErrorCode.BAD_VFIO_FRAME, 17],
    ['data size cut short', hex(`${DATA}00000000`), ErrorCode.BAD_VFIO_FRAME, 8],
    ['data running past the section', hex(`${DATA}0000000000000010ff${END}`), ErrorCode.BAD_VFIO_FRAME, 8],
    ['setup after data', hex(`${DATA}0000000000000000${SETUP}${END}`), ErrorCode.BAD_VFIO_FRAME, 16],
    ['bytes after END', hex(`${SETUP}${END}00`), ErrorCode.BAD_VFIO_FRAME, 16],
    ['bytes after a data section END', hex(`${DATA}0000000000000000${END}${END}`), ErrorCode.BAD_VFIO_FRAME, 24],
    ['data size over the limit', hex(`${DATA}0000000001000001${END}`), ErrorCode.LIMIT_EXCEEDED, 8],
    ['data size of 2^64-1', hex(`${DATA}ffffffffffffffff${END}`), ErrorCode.LIMIT_EXCEEDED, 8],
  ];
  for (const [name, data, code, at] of cases) {
    test(`refuses ${name} (${code} at ${at})`, () => throwsAt(() => readVfioSection(data, 0, data.length), code, at));
  }
});

describe('measureVfioSection', () => {
  const all: [string, Buffer, number | undefined][] = [
    ['setup', setup, undefined],
    ['iterate', iterate, undefined],
    ['empty iterate', emptyIterate, undefined],
    ['complete', complete, undefined],
    ['config', config, 4],
    ['iterate closed by INIT_DATA_SENT', initDataSent, undefined],
  ];
  for (const [name, data, configBytes] of all) {
    test(`${name}: the same length under every split, and undefined for every prefix`, () => {
      const tail = Buffer.from([0x7e, 1, 2, 3, 4]);
      for (let cut = 0; cut <= data.length; cut++) {
        const r = new ByteReader(0);
        const scan: VfioScan = { vfioFrom: 0, vfioCloseNext: false };
        r.push(data.subarray(0, cut));
        const first = measureVfioSection(r, scan, 0, configBytes, 1 << 20);
        if (cut < data.length) assert.equal(first, undefined, `prefix ${cut}`);
        r.push(data.subarray(cut));
        r.push(tail);
        assert.equal(first ?? measureVfioSection(r, scan, 0, configBytes, 1 << 20), data.length);
      }
    });
  }

  test('errors carry stream offsets: unknown marker, setup not closed, a config of unknown length, over the limit', () => {
    const at = (data: Buffer, configBytes?: number, max = 1 << 20): unknown => {
      const r = new ByteReader(500);
      r.push(data);
      return measureVfioSection(r, { vfioFrom: 0, vfioCloseNext: false }, 500, configBytes, max);
    };
    throwsAt(() => at(Buffer.from(`${DATA}0000000000000000ffffffffef100009`, 'hex')), ErrorCode.BAD_VFIO_FRAME, 516);
    throwsAt(() => at(Buffer.from(`${SETUP}${DATA}`, 'hex')), ErrorCode.BAD_VFIO_FRAME, 508);
    throwsAt(() => at(config), ErrorCode.BAD_VFIO_FRAME, 500);
    throwsAt(() => at(Buffer.from(`${DATA}0000000000000000${CONFIG}`, 'hex'), 4), ErrorCode.BAD_VFIO_FRAME, 516);
    throwsAt(() => at(Buffer.from(`${DATA}0000000000010000`, 'hex'), undefined, 4096), ErrorCode.LIMIT_EXCEEDED, 508);
  });
});

describe('in a stream', () => {
  /** A stream carrying one VFIO device as QEMU 7.2 sends a vfio-pci device (no RAM). */
  function stream(body: Buffer[] = [iterate, emptyIterate]): Buffer {
    return bytes((w) => {
      writeStreamHeader(w);
      writeConfiguration(w, { machineType: 'none' });
      writeSectionHeader(w, { kind: 'start', sectionId: 3, idstr: '0000:00:04.0/vfio', instanceId: 0, versionId: 1 });
      w.bytes(setup);
      writeSectionFooter(w, 3);
      for (const b of body) {
        writeSectionHeader(w, { kind: 'part', sectionId: 3 });
        w.bytes(b);
        writeSectionFooter(w, 3);
      }
      writeSectionHeader(w, { kind: 'end', sectionId: 3 });
      w.bytes(complete);
      writeSectionFooter(w, 3);
      writeSectionHeader(w, { kind: 'full', sectionId: 3, idstr: '0000:00:04.0/vfio', instanceId: 0, versionId: 1 });
      w.bytes(config);
      writeSectionFooter(w, 3);
      writeEof(w);
    });
  }

  function sectionEnds(data: Buffer, chunk: number, options: StreamDecoderOptions = {}): Extract<DecoderEvent, { kind: 'sectionEnd' }>[] {
    const dec = new StreamDecoder(options);
    const out: Extract<DecoderEvent, { kind: 'sectionEnd' }>[] = [];
    for (let at = 0; at < data.length; at += chunk) {
      dec.push(data.subarray(at, at + chunk));
      for (let ev = dec.next(); ev !== NEED_MORE; ev = dec.next()) if (ev.kind === 'sectionEnd') out.push(ev);
    }
    dec.end();
    return out;
  }

  test('undescribed: START/PART/END are measured by their markers, the FULL config found by its footer; any chunking', () => {
    const data = stream();
    const want = sectionEnds(data, data.length);
    assert.deepEqual(
      want.map((e) => [e.sectionKind, e.layout, e.vfio?.phase, e.vfio?.dataBytes, e.dataLength]),
      [
        ['start', 'vfio-framing', 'setup', 0, 16],
        ['part', 'vfio-framing', 'data', 3, iterate.length],
        ['part', 'vfio-framing', 'data', 0, emptyIterate.length],
        ['end', 'vfio-framing', 'data', 3, complete.length],
        ['full', 'footer-scan', 'config', 0, config.length],
      ],
    );
    for (const chunk of [1, 3, 7, 16]) assert.deepEqual(sectionEnds(data, chunk), want, `chunk ${chunk}`);
  });

  test('a device of ours (VfioLayout): the config length comes from the layout, no footer scan', () => {
    const data = stream();
    const ends = sectionEnds(data, 5, { deviceLayout: () => ({ framing: 'vfio', configBytes: 4 }) });
    assert.deepEqual(ends.map((e) => e.layout), ['vfio-framing', 'vfio-framing', 'vfio-framing', 'vfio-framing', 'vfio-framing']);
    assert.equal(ends.at(-1)!.vfio!.configBytes, 4);
  });

  test('a bad marker inside a VFIO section: LM_ERR_BAD_VFIO_FRAME at its stream offset', () => {
    const bad = Buffer.from(iterate);
    bad.writeUInt32BE(0xef100007, iterate.length - 4);
    const data = stream([bad]);
    const at = data.indexOf(bad) + iterate.length - 8;
    throwsAt(() => sectionEnds(data, data.length, { deviceLayout: () => ({ framing: 'vfio', configBytes: 4 }) }), ErrorCode.BAD_VFIO_FRAME, at);
  });
});

describe('INIT_DATA_SENT (switchover-ack)', () => {
  test('closes a data section as END_OF_STATE does, and the summary says so', () => {
    assert.equal(initDataSent.subarray(-8).toString('hex'), 'ffffffffef100005');
    assert.equal(VfioMigFlag.DEV_INIT_DATA_SENT, 0xef100005);
    const seen: number[] = [];
    const s = readVfioSection(initDataSent, 0, initDataSent.length, {}, { onData: (src, at, n) => seen.push(...src.subarray(at, at + n)) });
    assert.deepEqual(seen, [5, 6]);
    assert.equal(s.initDataSent, true);
    assert.equal(readVfioSection(iterate, 0, iterate.length).initDataSent, false);
    // Alone (nothing was pending): QEMU's loader returns at it all the same.
    const alone = bytes(writeVfioInitDataSent);
    assert.equal(readVfioSection(alone, 0, alone.length).initDataSent, true);
  });

  test('cannot close a setup or config', () => {
    throwsAt(() => readVfioSection(Buffer.from(`${SETUP}ffffffffef100005`, 'hex'), 0, 16, { streamOffset: 100 }), ErrorCode.BAD_VFIO_FRAME, 108);
  });
});
