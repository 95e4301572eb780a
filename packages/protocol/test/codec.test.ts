// Every encoder's exact bytes (checked against the layouts and [obs] dumps of wire-format.md),
// then the same bytes decoded back: a whole small stream through StreamDecoder and every
// return-path message through ReturnPathDecoder, checking values, offsets and guest memory.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { deflateSync } from 'node:zlib';
import {
  BatchWriter,
  checkRecoveryStart,
  type DecoderEvent,
  MigCmd,
  NEED_MORE,
  NEED_MORE_RP,
  PageBitmap,
  PostcopyState,
  type RamBlockInfo,
  RamRecordWriter,
  type ReturnPathMessage,
  ReturnPathDecoder,
  StreamDecoder,
  type StreamDecoderOptions,
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
  writeRpPong,
  writeRpRecvBitmap,
  writeRpReqPages,
  writeRpResumeAck,
  writeRpShut,
  writeRpSwitchoverAck,
  writeSectionFooter,
  writeSectionHeader,
  writeStreamHeader,
  writeVmdescription,
} from '../src/index.ts';

const PAGE = 4096;
const PC = 'pc.ram';
const VGA = 'vga.vram';
const PC_HEX = '70632e72616d'; // "pc.ram"

/** Hex of what `fn` encodes. */
function enc(fn: (w: BatchWriter) => void): string {
  const w = new BatchWriter();
  fn(w);
  return w.flushConcat().toString('hex');
}

/** Hex with spaces and '|' separators for readability. */
function h(s: string): string {
  return s.replace(/[\s|]/g, '');
}

function ascii(s: string): string {
  return Buffer.from(s, 'latin1').toString('hex');
}

function be64hex(n: number): string {
  return n.toString(16).padStart(16, '0');
}

/** Pages whose bytes differ per page and per block, so a misplaced page is noticed. */
function pattern(length: number, seed: number): Buffer {
  const b = Buffer.alloc(length);
  for (let i = 0; i < length; i++) b[i] = (i * 13 + seed * 31 + (i >> 12) * 7) & 0xff;
  return b;
}

interface Decoded {
  events: DecoderEvent[];
  memory: Buffer[];
  placed: [number, number][];
  decoder: StreamDecoder;
}

/** Decode `bytes` pushed in chunks of `chunk` bytes; attachBlocks hands out 0xcc-filled memory. */
function decode(bytes: Buffer, chunk = bytes.length, options: StreamDecoderOptions = {}): Decoded {
  const memory: Buffer[] = [];
  const placed: [number, number][] = [];
  const decoder = new StreamDecoder({
    ram: {
      attachBlocks: (blocks: readonly RamBlockInfo[]) => {
        for (const b of blocks) memory.push(Buffer.alloc(b.length, 0xcc));
        return memory;
      },
      pagePlaced: (block: number, offset: number) => placed.push([block, offset]),
    },
    ...options,
  });
  const events: DecoderEvent[] = [];
  for (let at = 0; at < bytes.length; at += chunk) {
    decoder.push(bytes.subarray(at, at + chunk));
    for (let ev = decoder.next(); ev !== NEED_MORE; ev = decoder.next()) events.push(ev);
  }
  decoder.end();
  return { events, memory, placed, decoder };
}

function decodeRp(bytes: Buffer, chunk: number, options: ConstructorParameters<typeof ReturnPathDecoder>[0] = {}): ReturnPathMessage[] {
  const d = new ReturnPathDecoder(options);
  const out: ReturnPathMessage[] = [];
  for (let at = 0; at < bytes.length; at += chunk) {
    d.push(bytes.subarray(at, at + chunk));
    for (let m = d.next(); m !== NEED_MORE_RP; m = d.next()) out.push(m);
  }
  d.end();
  assert.equal(d.streamOffset, bytes.length);
  return out;
}

// ---------------------------------------------------------------------------------------------

describe('stream framing encoders: exact bytes', () => {
  it('writeStreamHeader: "QEVM" then version 3', () => {
    assert.equal(enc(writeStreamHeader), '5145564d00000003');
  });

  it('writeConfiguration matches the [obs] 7.2 dump for -M pc', () => {
    assert.equal(
      enc((w) => writeConfiguration(w, { machineType: 'pc-i440fx-7.2' })),
      h('07 00 00 00 0d 70 63 2d 69 34 34 30 66 78 2d 37 2e 32'),
    );
  });

  it('writeConfiguration subsections in QEMU order: target-page-bits, capabilities, uuid', () => {
    const hex = enc((w) =>
      writeConfiguration(w, {
        machineType: 'virt',
        targetPageBits: 16,
        capabilities: ['x-ignore-shared'],
        uuid: '12345678-9abc-def0-1234-56789abcdef0',
      }),
    );
    const sub = (name: string, body: string): string =>
      '05' + name.length.toString(16).padStart(2, '0') + ascii(name) + '00000001' + body;
    assert.equal(
      hex,
      '07' + '00000004' + ascii('virt') +
        sub('configuration/target-page-bits', '00000010') +
        sub('configuration/capabilities', '00000001' + '0f' + ascii('x-ignore-shared')) +
        sub('configuration/uuid', '123456789abcdef0123456789abcdef0'),
    );
    // No capabilities subsection for an empty list.
    assert.equal(enc((w) => writeConfiguration(w, { machineType: 'pc', capabilities: [] })), '07000000027063');
    assert.throws(() => enc((w) => writeConfiguration(w, { machineType: 'pc', uuid: '1234' })), { code: 'LM_ERR_INVALID_ARGUMENT' });
  });

  it('writeSectionHeader: START/FULL carry idstr, instance, version; PART/END only the id', () => {
    assert.equal(
      enc((w) => writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 })),
      h('01 00000002 03 72616d 00000000 00000004'), // [obs] §6.2
    );
    assert.equal(
      enc((w) => writeSectionHeader(w, { kind: 'full', sectionId: 0x28, idstr: 'globalstate', instanceId: 3 })),
      h('04 00000028 0b' + ascii('globalstate') + '00000003 00000001'), // version defaults to 1
    );
    assert.equal(enc((w) => writeSectionHeader(w, { kind: 'part', sectionId: 2 })), '0200000002');
    assert.equal(enc((w) => writeSectionHeader(w, { kind: 'end', sectionId: 0xfffffffe })), '03fffffffe');
    assert.throws(() => enc((w) => writeSectionHeader(w, { kind: 'full', sectionId: 1 })), { code: 'LM_ERR_INVALID_ARGUMENT' });
    assert.throws(() => enc((w) => writeSectionHeader(w, { kind: 'start', sectionId: 1, idstr: '' })), {
      code: 'LM_ERR_INVALID_ARGUMENT',
    });
  });

  it('writeSectionFooter, writeEof, writeVmdescription', () => {
    assert.equal(enc((w) => writeSectionFooter(w, 2)), '7e00000002');
    assert.equal(enc(writeEof), '00');
    const json = '{"page_size": 4096, "devices": []}';
    assert.equal(enc((w) => writeVmdescription(w, json)), '06' + '00000022' + ascii(json));
    // Bytes are taken as they are; strings are UTF-8.
    assert.equal(enc((w) => writeVmdescription(w, Buffer.from('{}'))), '06000000027b7d');
    assert.equal(enc((w) => writeVmdescription(w, '"é"')), '0600000004' + '22c3a922');
  });
});

describe('command encoders: exact bytes', () => {
  it('writeCommand with no payload: OPEN_RETURN_PATH, LISTEN, RUN, RESUME', () => {
    assert.equal(enc((w) => writeCommand(w, MigCmd.OPEN_RETURN_PATH)), '0800010000');
    assert.equal(enc((w) => writeCommand(w, MigCmd.POSTCOPY_LISTEN)), '0800040000');
    assert.equal(enc((w) => writeCommand(w, MigCmd.POSTCOPY_RUN)), '0800050000');
    assert.equal(enc((w) => writeCommand(w, MigCmd.POSTCOPY_RESUME)), '0800090000');
    assert.equal(enc((w) => writeCommand(w, MigCmd.PING, Buffer.from('00000001', 'hex'))), '080002000400000001');
  });

  it('writeCommand refuses payloads over 65535 bytes (be16 length)', () => {
    assert.equal(enc((w) => writeCommand(w, 3, Buffer.alloc(0xffff))).length / 2, 5 + 0xffff);
    assert.throws(() => enc((w) => writeCommand(w, 3, Buffer.alloc(0x10000))), { code: 'LM_ERR_INVALID_ARGUMENT' });
  });

  it('writePing', () => {
    assert.equal(enc((w) => writePing(w, 0x12345678)), h('08 0002 0004 12345678'));
    assert.equal(enc((w) => writePing(w, 0xffffffff)), h('08 0002 0004 ffffffff'));
  });

  it('writePostcopyAdvise: empty, or host page-size summary and target page size', () => {
    assert.equal(enc((w) => writePostcopyAdvise(w)), h('08 0003 0000'));
    assert.equal(
      enc((w) => writePostcopyAdvise(w, { hostPageSizeSummary: 0x201000, targetPageSize: 0x1000 })),
      h('08 0003 0010 0000000000201000 0000000000001000'),
    );
  });

  it('writeRamDiscard: version 0, cstr, terminator 0, ranges; like the [obs] dump', () => {
    const ranges = [
      { start: 0x0, length: 0x1000 },
      { start: 0x6000, length: 0x1000 },
      { start: 0xe8000, length: 0x2000 },
    ];
    assert.equal(
      enc((w) => writeRamDiscard(w, PC, ranges)),
      h(`08 0006 0039 | 00 06 ${PC_HEX} 00 | ${be64hex(0)} ${be64hex(0x1000)} | ${be64hex(0x6000)} ${be64hex(0x1000)} | ${be64hex(0xe8000)} ${be64hex(0x2000)}`),
    );
  });

  it('writeRamDiscard packs at most 12 ranges per command', () => {
    const ranges = Array.from({ length: 13 }, (_, i) => ({ start: i * 0x2000, length: 0x1000 }));
    const b = Buffer.from(enc((w) => writeRamDiscard(w, PC, ranges)), 'hex');
    const first = 5 + 3 + 6 + 12 * 16;
    assert.equal(b.length, first + 5 + 3 + 6 + 16);
    assert.equal(b.readUInt16BE(3), 3 + 6 + 12 * 16);
    assert.equal(b.toString('hex', first, first + 5 + 3 + 6 + 16), h(`08 0006 0019 00 06 ${PC_HEX} 00 ${be64hex(12 * 0x2000)} ${be64hex(0x1000)}`));
    assert.equal(enc((w) => writeRamDiscard(w, PC, [])), '', 'no ranges, no command');
  });

  it('writePackaged and writeRecvBitmapRequest', () => {
    assert.equal(enc((w) => writePackaged(w, 0x1234)), h('08 0007 0004 00001234'));
    assert.equal(enc((w) => writePackaged(w, 0xffffffff)), h('08 0007 0004 ffffffff'));
    assert.equal(enc((w) => writeRecvBitmapRequest(w, PC)), h(`08 000a 0007 06 ${PC_HEX}`));
  });

  it('checkRecoveryStart: a recovery channel opens with RECV_BITMAP; anything else is refused with a code', () => {
    const request = Buffer.from(enc((w) => writeRecvBitmapRequest(w, PC)), 'hex');
    assert.equal(checkRecoveryStart(request), 'valid');
    assert.equal(checkRecoveryStart(request.subarray(0, 2)), null, 'too few bytes to tell');
    assert.equal(checkRecoveryStart(Buffer.alloc(0)), null);
    const notCommand = checkRecoveryStart(Buffer.from('GET / HTTP/1.1'));
    assert.equal(notCommand !== 'valid' && notCommand?.code, 'LM_ERR_UNKNOWN_RECORD_TYPE');
    const otherCommand = checkRecoveryStart(Buffer.from(h('08 0005 0000'), 'hex'));
    assert.equal(otherCommand !== 'valid' && otherCommand?.code, 'LM_ERR_UNEXPECTED_COMMAND');
  });
});

describe('RAM encoders: exact bytes', () => {
  it('writeMemSize: total | 0x04, then cstr + be64 per block (like the [obs] dump)', () => {
    const blocks = [
      { idstr: PC, length: 0x1000000 },
      { idstr: '/rom@etc/acpi/tables', length: 0x20000 },
    ];
    assert.equal(
      enc((w) => writeMemSize(w, blocks)),
      h(`0000000001020004 | 06 ${PC_HEX} 0000000001000000 | 14 ${ascii('/rom@etc/acpi/tables')} 0000000000020000`),
    );
  });

  it('writeMemSize with x-ignore-shared adds each block’s gpa', () => {
    assert.equal(
      enc((w) => writeMemSize(w, [{ idstr: PC, length: 0x2000, gpa: 0x100000 }, { idstr: 'b', length: 0x1000 }], { ignoreShared: true })),
      h(`0000000000003004 | 06 ${PC_HEX} 0000000000002000 0000000000100000 | 01 62 0000000000001000 0000000000000000`),
    );
  });

  it('writeEos and writeMultifdFlush are bare words', () => {
    assert.equal(enc(writeEos), '0000000000000010');
    assert.equal(enc(writeMultifdFlush), '0000000000000200');
  });

  it('RamRecordWriter names a block only when it changes (CONTINUE 0x20 otherwise)', () => {
    const ram = pattern(2 * PAGE, 1);
    const rw = new RamRecordWriter();
    const w = new BatchWriter();
    rw.zeroPage(w, PC, 0x5000);
    rw.zeroPage(w, PC, 0x6000);
    rw.page(w, PC, 0x7000, ram, PAGE);
    rw.zeroPage(w, VGA, 0);
    rw.page(w, PC, 0x100000000, ram, 0); // offsets beyond 32 bits
    const b = w.flushConcat();
    let at = 0;
    const take = (n: number): string => b.toString('hex', at, (at += n));
    assert.equal(take(8 + 7 + 1), h(`0000000000005002 06 ${PC_HEX} 00`));
    assert.equal(take(8 + 1), h('0000000000006022 00'));
    assert.equal(take(8), '0000000000007028');
    assert.deepEqual(b.subarray(at, (at += PAGE)), ram.subarray(PAGE));
    assert.equal(take(8 + 9 + 1), h(`0000000000000002 08 ${ascii(VGA)} 00`));
    assert.equal(take(8 + 7), h(`0000000100000008 06 ${PC_HEX}`));
    assert.deepEqual(b.subarray(at, (at += PAGE)), ram.subarray(0, PAGE));
    assert.equal(at, b.length);
  });

  it('forgetBlock() and alwaysName make the next record name its block', () => {
    const rw = new RamRecordWriter();
    const hexOf = (fn: (w: BatchWriter) => void): string => enc(fn);
    assert.equal(hexOf((w) => rw.zeroPage(w, PC, 0)), h(`0000000000000002 06 ${PC_HEX} 00`));
    assert.equal(hexOf((w) => rw.zeroPage(w, PC, 0)), h('0000000000000022 00'));
    rw.forgetBlock();
    assert.equal(hexOf((w) => rw.zeroPage(w, PC, 0)), h(`0000000000000002 06 ${PC_HEX} 00`));
    rw.alwaysName = true;
    assert.equal(hexOf((w) => rw.zeroPage(w, PC, 0x1000)), h(`0000000000001002 06 ${PC_HEX} 00`));
  });

  it('xbzrlePage: flag 0x40, encoding byte 01, be16 length, the encoded bytes', () => {
    const rw = new RamRecordWriter();
    const e = Buffer.from('ff0064 01 aa'.replace(/ /g, ''), 'hex');
    assert.equal(enc((w) => rw.xbzrlePage(w, PC, 0x3000, e, 3, 2)), h(`0000000000003040 06 ${PC_HEX} 01 0002 01aa`));
    assert.equal(enc((w) => rw.xbzrlePage(w, PC, 0x4000, e, 2, 3)), h('0000000000004060 01 0003 6401aa'));
    assert.throws(() => enc((w) => rw.xbzrlePage(w, PC, 0, e, 0, 0)), { code: 'LM_ERR_INVALID_ARGUMENT' });
    assert.throws(() => enc((w) => rw.xbzrlePage(w, PC, 0, Buffer.alloc(PAGE + 1), 0, PAGE + 1)), { code: 'LM_ERR_INVALID_ARGUMENT' });
  });

  it('deltaPage: nothing when unchanged, XBZRLE when it fits, PAGE when it overflows', () => {
    const old = pattern(PAGE, 3);
    const rw = new RamRecordWriter();
    const w = new BatchWriter();
    assert.equal(rw.deltaPage(w, PC, 0, old, 0, Buffer.from(old), 0), 'unchanged');
    assert.equal(w.totalBytes, 0, 'an unchanged page writes nothing (and names no block)');

    const cur = Buffer.from(old);
    cur[300] = old[300]! ^ 0xff;
    assert.equal(rw.deltaPage(w, PC, 0x1000, old, 0, cur, 0), 'xbzrle');
    assert.equal(w.flushConcat().toString('hex'), h(`0000000000001040 06 ${PC_HEX} 01 0004 ac02 01 ${cur.toString('hex', 300, 301)}`));

    const all = Buffer.from(old.map((b) => b ^ 0xff));
    assert.equal(rw.deltaPage(w, PC, 0x2000, old, 0, all, 0), 'page');
    const b = w.flushConcat();
    assert.equal(b.toString('hex', 0, 8), '0000000000002028', 'same block: CONTINUE');
    assert.deepEqual(b.subarray(8), all);
  });

  it('compressedPage: flag 0x100, be32 length, the zlib stream', () => {
    const rw = new RamRecordWriter();
    const z = deflateSync(Buffer.alloc(PAGE, 0x41));
    assert.equal(enc((w) => rw.compressedPage(w, PC, 0x2000, z)), h(`0000000000002100 06 ${PC_HEX}`) + z.length.toString(16).padStart(8, '0') + z.toString('hex'));
    assert.equal(enc((w) => rw.compressedPage(w, PC, 0x3000, z)).slice(0, 24), h('0000000000003120') + z.length.toString(16).padStart(8, '0'));
    assert.throws(() => enc((w) => rw.compressedPage(w, PC, 0, Buffer.alloc(0))), { code: 'LM_ERR_INVALID_ARGUMENT' });
    assert.throws(() => enc((w) => rw.compressedPage(w, PC, 0, Buffer.alloc(4200))), { code: 'LM_ERR_INVALID_ARGUMENT' });
  });

  it('page offsets must be page aligned and non-negative', () => {
    const rw = new RamRecordWriter();
    assert.throws(() => enc((w) => rw.zeroPage(w, PC, 0x800)), { code: 'LM_ERR_INVALID_ARGUMENT' });
    assert.throws(() => enc((w) => rw.page(w, PC, -PAGE, Buffer.alloc(PAGE), 0)), { code: 'LM_ERR_INVALID_ARGUMENT' });
  });
});

describe('return-path encoders: exact bytes', () => {
  it('SHUT, PONG, RESUME_ACK, SWITCHOVER_ACK', () => {
    assert.equal(enc((w) => writeRpShut(w, 0)), h('0001 0004 00000000'));
    assert.equal(enc((w) => writeRpShut(w, 1)), h('0001 0004 00000001'));
    assert.equal(enc((w) => writeRpPong(w, 0xcafef00d)), h('0002 0004 cafef00d'));
    assert.equal(enc(writeRpResumeAck), h('0006 0004 00000001'));
    assert.equal(enc(writeRpSwitchoverAck), h('0007 0000'));
  });

  it('REQ_PAGES_ID then REQ_PAGES, as in the [obs] dump', () => {
    assert.equal(enc((w) => writeRpReqPages(w, 0xff000, 0x1000, PC)), h(`0003 0013 | 00000000000ff000 | 00001000 | 06 ${PC_HEX}`));
    assert.equal(enc((w) => writeRpReqPages(w, 0xfd0000, 0x1000)), h('0004 000c | 0000000000fd0000 | 00001000'));
    assert.throws(() => enc((w) => writeRpReqPages(w, 0, 0x1000, '')), { code: 'LM_ERR_INVALID_ARGUMENT' });
  });

  it('RECV_BITMAP: header, be64 size, LE bitmap, end mark (the [obs] 64 MiB block shape)', () => {
    const bm = new PageBitmap(16384);
    bm.setRange(0, 16384);
    const b = Buffer.from(enc((w) => writeRpRecvBitmap(w, PC, bm.bytes)), 'hex');
    assert.equal(b.toString('hex', 0, 11 + 8), h(`0005 0007 06 ${PC_HEX} 0000000000000800`));
    assert.ok(b.subarray(19, 19 + 2048).every((x) => x === 0xff));
    assert.equal(b.toString('hex', 19 + 2048), '0123456789abcdef');
    assert.equal(b.length, 19 + 2048 + 8);
    assert.throws(() => enc((w) => writeRpRecvBitmap(w, PC, new Uint8Array(12))), { code: 'LM_ERR_INVALID_ARGUMENT' });
  });
});

// ---------------------------------------------------------------------------------------------

/** Everything we need to know about where each record landed in the built stream. */
interface Built {
  bytes: Buffer;
  at: Record<string, number>;
  blocks: RamBlockInfo[];
  expect: { pc: Buffer; vga: Buffer };
  timerData: Buffer;
  apicData: Buffer;
  vmdesc: string;
  blobLength: number;
}

/**
 * A complete small stream: header, configuration, RAM START (MEM_SIZE), two RAM PARTs, a
 * device FULL, commands up to a PACKAGED blob with LISTEN/RUN inside after ADVISE, RAM END,
 * EOF and VMDESCRIPTION.
 */
function buildStream(): Built {
  const blocks: RamBlockInfo[] = [
    { idstr: PC, length: 5 * PAGE },
    { idstr: VGA, length: 2 * PAGE },
  ];
  const pc = pattern(5 * PAGE, 1);
  const vga = pattern(2 * PAGE, 2);
  const pcPage2 = pattern(PAGE, 9);
  const pcPage4 = pattern(PAGE, 11);
  const vgaNew = Buffer.from(vga.subarray(0, PAGE));
  vgaNew.fill(0x77, 10, 210); // a 200-byte run
  vgaNew[4000] = vga[4000]! ^ 1;
  const timerData = Buffer.from('0000000012345678ffffffffffffffff', 'hex');
  const apicData = Buffer.from('fee00900000000010203', 'hex');
  const vmdesc = '{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": []}]}';

  const w = new BatchWriter({ slabSize: 8192 });
  const rw = new RamRecordWriter();
  const at: Record<string, number> = {};
  const mark = (name: string): void => {
    at[name] = w.totalBytes;
  };
  const ramHeader = (kind: 'start' | 'part' | 'end', name: string): void => {
    mark(name);
    writeSectionHeader(w, kind === 'start' ? { kind, sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 } : { kind, sectionId: 2 });
  };
  const ramTail = (name: string): void => {
    mark(`${name}.eos`);
    writeEos(w);
    mark(`${name}.footer`);
    writeSectionFooter(w, 2);
  };

  writeStreamHeader(w);
  mark('config');
  writeConfiguration(w, { machineType: 'pc-i440fx-7.2' });

  ramHeader('start', 'start');
  mark('memSize');
  writeMemSize(w, blocks);
  ramTail('start');

  ramHeader('part', 'part1');
  rw.page(w, PC, 0, pc, 0); // named
  rw.zeroPage(w, PC, 0x1000); // CONTINUE
  rw.page(w, VGA, 0, vga, 0); // named
  rw.page(w, VGA, 0x1000, vga, 0x1000); // CONTINUE
  ramTail('part1');

  mark('timer');
  writeSectionHeader(w, { kind: 'full', sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 });
  w.bytes(timerData);
  writeSectionFooter(w, 0);

  ramHeader('part', 'part2');
  // The last named block (vga.vram) carries over into this section: CONTINUE.
  assert.equal(rw.deltaPage(w, VGA, 0, vga, 0, vgaNew, 0), 'xbzrle');
  assert.equal(rw.deltaPage(w, PC, 0, pc, 0, pc, 0), 'unchanged');
  rw.compressedPage(w, PC, 0x2000, deflateSync(pcPage2)); // named
  // A 7.2 receiver fills a ZERO page with its fill byte; our writer always sends 0.
  mark('zeroFill');
  w.be64(0x3000 + 0x02 + 0x20).u8(0x5a);
  mark('flush');
  writeMultifdFlush(w);
  ramTail('part2');

  mark('cmds');
  writeCommand(w, MigCmd.OPEN_RETURN_PATH);
  writePing(w, 0x12345678);
  mark('advise');
  writePostcopyAdvise(w, { hostPageSizeSummary: 0x1000, targetPageSize: 0x1000 });
  mark('discard');
  writeRamDiscard(w, PC, [{ start: 0x4000, length: 0x1000 }]);
  rw.forgetBlock(); // QEMU forgets the last block when it builds the discard list

  const blobW = new BatchWriter();
  writeCommand(blobW, MigCmd.POSTCOPY_LISTEN);
  writeSectionHeader(blobW, { kind: 'full', sectionId: 7, idstr: 'apic', instanceId: 0, versionId: 3 });
  blobW.bytes(apicData);
  writeSectionFooter(blobW, 7);
  writeCommand(blobW, MigCmd.POSTCOPY_RUN);
  const blob = blobW.flushConcat();
  mark('packaged');
  writePackaged(w, blob.length);
  mark('blob');
  w.bytes(blob);

  ramHeader('end', 'end');
  rw.page(w, PC, 0x4000, pcPage4, 0); // named again after forgetBlock
  ramTail('end');
  mark('eof');
  writeEof(w);
  mark('vmdesc');
  writeVmdescription(w, vmdesc);
  mark('total');

  const expectPc = Buffer.concat([pc.subarray(0, PAGE), Buffer.alloc(PAGE), pcPage2, Buffer.alloc(PAGE, 0x5a), pcPage4]);
  const expectVga = Buffer.concat([vgaNew, vga.subarray(PAGE)]);
  return { bytes: w.flushConcat(), at, blocks, expect: { pc: expectPc, vga: expectVga }, timerData, apicData, vmdesc, blobLength: blob.length };
}

describe('a whole stream round trip through StreamDecoder', () => {
  const s = buildStream();
  const A = (k: string): number => s.at[k]!;

  it('the bytes have the expected overall shape', () => {
    assert.equal(s.bytes.length, A('total'));
    assert.equal(s.bytes.toString('hex', 0, 26), h('5145564d 00000003 07 0000000d 70632d693434306678 2d372e32'));
    assert.equal(A('config'), 8);
    assert.equal(A('start'), 26);
    assert.equal(A('memSize'), 26 + 17);
    // MEM_SIZE: total 7 pages | 0x04, pc.ram 5 pages, vga.vram 2 pages.
    assert.equal(
      s.bytes.toString('hex', A('memSize'), A('start.eos')),
      h(`0000000000007004 06 ${PC_HEX} 0000000000005000 08 ${ascii(VGA)} 0000000000002000`),
    );
    assert.equal(s.bytes.toString('hex', A('start.eos'), A('part1')), h('0000000000000010 7e00000002'));
    // First record of PART 2 continues vga.vram from PART 1.
    assert.equal(s.bytes.toString('hex', A('part2'), A('part2') + 5 + 8 + 1), h('02 00000002 0000000000000060 01'));
    assert.equal(s.bytes.toString('hex', A('packaged'), A('blob')), '0800070004' + s.blobLength.toString(16).padStart(8, '0'));
  });

  const expectedEvents = (): unknown[] => [
    { kind: 'header', offset: 0, version: 3 },
    { kind: 'configuration', offset: 8, end: 26, machineType: 'pc-i440fx-7.2', subsections: [] },
    { kind: 'sectionStart', section: { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 }, sectionKind: 'start', offset: A('start'), dataOffset: A('start') + 17, depth: 0 },
    { kind: 'ramBlocks', offset: A('memSize'), total: 7 * PAGE, blocks: s.blocks },
    {
      kind: 'sectionEnd', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4, sectionKind: 'start',
      offset: A('start'), dataOffset: A('start') + 17, dataLength: A('start.footer') - A('start') - 17,
      footerOffset: A('start.footer'), end: A('part1'), depth: 0,
      ram: { zero: 0, normal: 0, xbzrle: 0, compressed: 0, named: 0, continued: 0, multifdFlush: 0, eosOffset: A('start.eos') },
    },
    { kind: 'sectionStart', section: { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 }, sectionKind: 'part', offset: A('part1'), dataOffset: A('part1') + 5, depth: 0 },
    {
      kind: 'sectionEnd', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4, sectionKind: 'part',
      offset: A('part1'), dataOffset: A('part1') + 5, dataLength: A('part1.footer') - A('part1') - 5,
      footerOffset: A('part1.footer'), end: A('timer'), depth: 0,
      ram: { zero: 1, normal: 3, xbzrle: 0, compressed: 0, named: 2, continued: 2, multifdFlush: 0, eosOffset: A('part1.eos') },
    },
    { kind: 'sectionStart', section: { sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 }, sectionKind: 'full', offset: A('timer'), dataOffset: A('timer') + 19, depth: 0 },
    {
      kind: 'sectionEnd', sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2, sectionKind: 'full',
      offset: A('timer'), dataOffset: A('timer') + 19, dataLength: 16, footerOffset: A('timer') + 35, end: A('part2'), depth: 0,
      data: s.timerData, layout: 'footer-scan',
    },
    { kind: 'sectionStart', section: { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 }, sectionKind: 'part', offset: A('part2'), dataOffset: A('part2') + 5, depth: 0 },
    { kind: 'multifdFlush', offset: A('flush') },
    {
      kind: 'sectionEnd', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4, sectionKind: 'part',
      offset: A('part2'), dataOffset: A('part2') + 5, dataLength: A('part2.footer') - A('part2') - 5,
      footerOffset: A('part2.footer'), end: A('cmds'), depth: 0,
      ram: { zero: 1, normal: 0, xbzrle: 1, compressed: 1, named: 1, continued: 2, multifdFlush: 1, eosOffset: A('part2.eos') },
    },
    { kind: 'command', offset: A('cmds'), depth: 0, command: { cmd: 1, name: 'OPEN_RETURN_PATH', length: 0, payload: Buffer.alloc(0) } },
    {
      kind: 'command', offset: A('cmds') + 5, depth: 0,
      command: { cmd: 2, name: 'PING', length: 4, payload: Buffer.from('12345678', 'hex'), pingValue: 0x12345678 },
    },
    {
      kind: 'command', offset: A('advise'), depth: 0,
      command: {
        cmd: 3, name: 'POSTCOPY_ADVISE', length: 16, payload: Buffer.from(h('0000000000001000 0000000000001000'), 'hex'),
        hostPageSizeSummary: 0x1000, targetPageSize: 0x1000,
      },
    },
    {
      kind: 'command', offset: A('discard'), depth: 0,
      command: {
        cmd: 6, name: 'POSTCOPY_RAM_DISCARD', length: 25,
        payload: Buffer.from(h(`00 06 ${PC_HEX} 00 0000000000004000 0000000000001000`), 'hex'),
        discard: { version: 0, block: PC, ranges: [{ start: 0x4000, length: 0x1000 }] },
      },
    },
    {
      kind: 'command', offset: A('packaged'), depth: 0,
      command: { cmd: 7, name: 'PACKAGED', length: 4, payload: Buffer.from(s.blobLength.toString(16).padStart(8, '0'), 'hex'), blobLength: s.blobLength },
    },
    { kind: 'command', offset: A('blob'), depth: 1, command: { cmd: 4, name: 'POSTCOPY_LISTEN', length: 0, payload: Buffer.alloc(0) } },
    { kind: 'sectionStart', section: { sectionId: 7, idstr: 'apic', instanceId: 0, versionId: 3 }, sectionKind: 'full', offset: A('blob') + 5, dataOffset: A('blob') + 5 + 18, depth: 1 },
    {
      kind: 'sectionEnd', sectionId: 7, idstr: 'apic', instanceId: 0, versionId: 3, sectionKind: 'full',
      offset: A('blob') + 5, dataOffset: A('blob') + 23, dataLength: 10, footerOffset: A('blob') + 33, end: A('blob') + 38, depth: 1,
      data: s.apicData, layout: 'footer-scan',
    },
    { kind: 'command', offset: A('blob') + 38, depth: 1, command: { cmd: 5, name: 'POSTCOPY_RUN', length: 0, payload: Buffer.alloc(0) } },
    { kind: 'packageEnd', offset: A('blob') + s.blobLength, reason: 'run' },
    { kind: 'sectionStart', section: { sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 }, sectionKind: 'end', offset: A('end'), dataOffset: A('end') + 5, depth: 0 },
    {
      kind: 'sectionEnd', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4, sectionKind: 'end',
      offset: A('end'), dataOffset: A('end') + 5, dataLength: 8 + 7 + PAGE + 8, footerOffset: A('end.footer'), end: A('eof'), depth: 0,
      ram: { zero: 0, normal: 1, xbzrle: 0, compressed: 0, named: 1, continued: 0, multifdFlush: 0, eosOffset: A('end.eos') },
    },
    { kind: 'eof', offset: A('eof'), depth: 0 },
    { kind: 'vmdescription', offset: A('vmdesc'), length: Buffer.byteLength(s.vmdesc), json: s.vmdesc },
  ];

  it('decodes to the expected events with exact offsets', () => {
    const d = decode(s.bytes);
    assert.deepEqual(d.events, expectedEvents());
    assert.equal(d.decoder.streamOffset, s.bytes.length);
    assert.equal(d.decoder.bufferedBytes, 0);
    assert.equal(d.decoder.finished, true);
    assert.equal(d.decoder.postcopyState, PostcopyState.END, 'EOF after LISTEN ends postcopy');
    assert.deepEqual(d.decoder.configuration?.machineType, 'pc-i440fx-7.2');
    assert.deepEqual(
      d.decoder.knownSections().map((x) => x.idstr).sort(),
      ['apic', 'ram', 'timer'],
    );
  });

  it('RAM contents land in the memory returned by attachBlocks', () => {
    const d = decode(s.bytes);
    assert.equal(d.memory.length, 2);
    // pc.ram: page 0 PAGE, page 1 ZERO (over 0xcc), page 2 COMPRESS_PAGE, page 3 ZERO fill 0x5a,
    // page 4 PAGE from the END section. vga.vram: page 0 PAGE then XBZRLE in place, page 1 PAGE.
    assert.ok(d.memory[0]!.equals(s.expect.pc));
    assert.ok(d.memory[1]!.equals(s.expect.vga));
    assert.deepEqual(d.placed, [
      [0, 0],
      [0, 0x1000],
      [1, 0],
      [1, 0x1000],
      [1, 0],
      [0, 0x2000],
      [0, 0x3000],
      [0, 0x4000],
    ]);
    assert.deepEqual(
      d.decoder.blockStats().map((b) => [b.idstr, b.length, b.zeroPages, b.normalPages, b.xbzrlePages, b.compressedPages]),
      [
        [PC, 5 * PAGE, 2, 2, 0, 1],
        [VGA, 2 * PAGE, 0, 2, 1, 0],
      ],
    );
  });

  it('gives identical events and memory whatever the chunking', () => {
    const whole = decode(s.bytes);
    for (const chunk of [1, 7, 4096, 4097, 10000]) {
      const d = decode(s.bytes, chunk);
      assert.deepEqual(d.events, whole.events, `chunk ${chunk}`);
      assert.ok(d.memory[0]!.equals(s.expect.pc), `chunk ${chunk}`);
      assert.ok(d.memory[1]!.equals(s.expect.vga), `chunk ${chunk}`);
    }
  });

  it('a device layout gives the section length without a footer scan', () => {
    const d = decode(s.bytes, s.bytes.length, { deviceLayout: (id) => (id.idstr === 'timer' ? 16 : id.idstr === 'apic' ? 10 : undefined) });
    const ends = d.events.filter((e) => e.kind === 'sectionEnd' && e.data !== undefined);
    assert.deepEqual(
      ends.map((e) => (e.kind === 'sectionEnd' ? [e.idstr, e.layout, e.dataLength] : [])),
      [
        ['timer', 'declared', 16],
        ['apic', 'declared', 10],
      ],
    );
  });

  it('every proper prefix asks for more and then fails end() with LM_ERR_TRUNCATED', () => {
    for (const cut of [0, 4, 8, 20, 26, A('memSize') + 3, A('part1') + 100, A('timer') + 25, A('zeroFill') + 8, A('blob') + 3, A('vmdesc') + 2]) {
      const dec = new StreamDecoder({ ram: { attachBlocks: (b) => b.map((x) => Buffer.alloc(x.length)) } });
      dec.push(s.bytes.subarray(0, cut));
      while (dec.next() !== NEED_MORE);
      assert.throws(() => dec.end(), { code: 'LM_ERR_TRUNCATED' }, `cut at ${cut}`);
    }
  });

  it('a block without memory is counted, not stored', () => {
    const dec = new StreamDecoder({ ram: { attachBlocks: (b) => b.map((x) => (x.idstr === VGA ? undefined : Buffer.alloc(x.length))) } });
    dec.push(s.bytes);
    while (dec.next() !== NEED_MORE);
    dec.end();
    assert.deepEqual(
      dec.blockStats().map((b) => b.normalPages + b.zeroPages + b.xbzrlePages + b.compressedPages),
      [5, 3],
    );
  });
});

describe('other stream round trips', () => {
  it('configuration subsections decode to their values', () => {
    const w = new BatchWriter();
    writeStreamHeader(w);
    writeConfiguration(w, {
      machineType: 'pc-q35-7.2',
      targetPageBits: 12,
      capabilities: ['x-ignore-shared', 'mapped-ram'],
      uuid: '12345678-9abc-def0-1234-56789abcdef0',
    });
    const end = w.totalBytes;
    writeEof(w);
    const { events } = decode(w.flushConcat());
    assert.deepEqual(events[1], {
      kind: 'configuration',
      offset: 8,
      end,
      machineType: 'pc-q35-7.2',
      subsections: [
        { offset: 8 + 5 + 10, name: 'configuration/target-page-bits', version: 1 },
        { offset: 8 + 5 + 10 + (1 + 1 + 30 + 4 + 4), name: 'configuration/capabilities', version: 1 },
        { offset: end - (1 + 1 + 18 + 4 + 16), name: 'configuration/uuid', version: 1 },
      ],
      targetPageBits: 12,
      capabilities: ['x-ignore-shared', 'mapped-ram'],
      uuid: '12345678-9abc-def0-1234-56789abcdef0',
    });
    assert.deepEqual(events[2], { kind: 'eof', offset: end, depth: 0 });
  });

  it('x-ignore-shared in the configuration makes MEM_SIZE carry a gpa per block', () => {
    const w = new BatchWriter();
    writeStreamHeader(w);
    writeConfiguration(w, { machineType: 'pc', capabilities: ['x-ignore-shared'] });
    writeSectionHeader(w, { kind: 'start', sectionId: 1, idstr: 'ram', instanceId: 0, versionId: 4 });
    const blocks = [
      { idstr: PC, length: 2 * PAGE, gpa: 0 },
      { idstr: 'pc.bios', length: PAGE, gpa: 0xfffc0000 },
    ];
    writeMemSize(w, blocks, { ignoreShared: true });
    writeEos(w);
    writeSectionFooter(w, 1);
    writeEof(w);
    const { events } = decode(w.flushConcat());
    const rb = events.find((e) => e.kind === 'ramBlocks');
    assert.deepEqual(rb, { kind: 'ramBlocks', offset: 8 + 7 + (1 + 1 + 26 + 4 + 4 + 1 + 15) + 17, total: 3 * PAGE, blocks });
  });

  it('a recovery channel: RECV_BITMAP and RESUME commands, then a page that must name its block', () => {
    const w = new BatchWriter();
    const rw = new RamRecordWriter(); // a new channel: nothing named yet
    writeRecvBitmapRequest(w, PC);
    writeCommand(w, MigCmd.POSTCOPY_RESUME);
    writeSectionHeader(w, { kind: 'part', sectionId: 2 });
    const page = pattern(PAGE, 5);
    rw.page(w, PC, PAGE, page, 0);
    rw.zeroPage(w, PC, 0);
    writeEos(w);
    writeSectionFooter(w, 2);
    writeEof(w);
    const bytes = w.flushConcat();
    const start = 1000; // where the new connection's bytes start in our count
    const d = decode(bytes, 3, {
      startOffset: start,
      resume: {
        postcopyState: PostcopyState.RUNNING,
        sections: [{ sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 }],
        blocks: [{ idstr: PC, length: 2 * PAGE }],
      },
    });
    assert.deepEqual(
      d.events.map((e) => [e.kind, e.offset]),
      [
        ['command', start],
        ['command', start + 12],
        ['sectionStart', start + 17],
        ['sectionEnd', start + 17],
        ['eof', bytes.length + start - 1],
      ],
    );
    const c0 = d.events[0]!;
    assert.ok(c0.kind === 'command');
    assert.equal(c0.command.name, 'RECV_BITMAP');
    assert.equal(c0.command.block, PC);
    // A resumed decoder asks for block memory at construction (no MEM_SIZE on this channel).
    assert.equal(d.memory.length, 1);
    assert.ok(d.memory[0]!.equals(Buffer.concat([Buffer.alloc(PAGE), page])));
    const se = d.events[3]!;
    assert.ok(se.kind === 'sectionEnd');
    assert.deepEqual(se.ram, { zero: 1, normal: 1, xbzrle: 0, compressed: 0, named: 1, continued: 1, multifdFlush: 0, eosOffset: start + 17 + 5 + 8 + 7 + PAGE + 9 });
  });

  it('a resumed channel refuses CONTINUE before any block is named', () => {
    const w = new BatchWriter();
    writeSectionHeader(w, { kind: 'part', sectionId: 2 });
    w.be64(0x22).u8(0);
    const dec = new StreamDecoder({
      resume: { postcopyState: PostcopyState.RUNNING, sections: [{ sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 }], blocks: [{ idstr: PC, length: PAGE }] },
    });
    dec.push(w.flushConcat());
    const first = dec.next();
    assert.ok(first !== NEED_MORE && first.kind === 'sectionStart');
    assert.throws(() => dec.next(), { code: 'LM_ERR_CONTINUE_WITHOUT_BLOCK', streamOffset: 5 });
    // The failure sticks.
    assert.throws(() => dec.next(), { code: 'LM_ERR_CONTINUE_WITHOUT_BLOCK' });
  });

  it('once postcopy is listening, XBZRLE and COMPRESS_PAGE are refused', () => {
    const w = new BatchWriter();
    writeStreamHeader(w);
    writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
    writeMemSize(w, [{ idstr: PC, length: PAGE }]);
    writeEos(w);
    writeSectionFooter(w, 2);
    writePostcopyAdvise(w, { hostPageSizeSummary: PAGE, targetPageSize: PAGE });
    writeCommand(w, MigCmd.POSTCOPY_LISTEN);
    writeSectionHeader(w, { kind: 'part', sectionId: 2 });
    const at = w.totalBytes;
    new RamRecordWriter().xbzrlePage(w, PC, 0, Buffer.from('0001aa', 'hex'), 0, 3);
    const dec = new StreamDecoder({ ram: { attachBlocks: (b) => b.map((x) => Buffer.alloc(x.length)) } });
    dec.push(w.flushConcat());
    let err: unknown;
    try {
      while (dec.next() !== NEED_MORE);
    } catch (e) {
      err = e;
    }
    assert.equal((err as { code?: string }).code, 'LM_ERR_UNKNOWN_RAM_FLAG');
    assert.equal((err as { streamOffset?: number }).streamOffset, at);
  });
});

describe('return path round trip through ReturnPathDecoder', () => {
  const bm = new PageBitmap(100); // 100 pages → 13 bytes → rounded to 16
  bm.set(0);
  bm.set(9);
  bm.setRange(64, 36);
  const w = new BatchWriter();
  const at: number[] = [];
  const mark = (): void => {
    at.push(w.totalBytes);
  };
  mark();
  writeRpPong(w, 1);
  mark();
  writeRpReqPages(w, 0xff000, 0x1000, PC);
  mark();
  writeRpReqPages(w, 0xfd0000, 0x1000);
  mark();
  writeRpReqPages(w, 0x200000, 0x200000, 'mem1'); // a huge-page block: host page length
  mark();
  writeRpRecvBitmap(w, PC, bm.bytes);
  mark();
  writeRpResumeAck(w);
  mark();
  writeRpSwitchoverAck(w);
  mark();
  writeRpShut(w, 0);
  const bytes = w.flushConcat();

  const expected: ReturnPathMessage[] = [
    { type: 2, name: 'PONG', offset: at[0]!, length: 4, value: 1 },
    { type: 3, name: 'REQ_PAGES_ID', offset: at[1]!, length: 19, start: 0xff000, pageLength: 0x1000, block: PC },
    { type: 4, name: 'REQ_PAGES', offset: at[2]!, length: 12, start: 0xfd0000, pageLength: 0x1000, block: PC },
    { type: 3, name: 'REQ_PAGES_ID', offset: at[3]!, length: 17, start: 0x200000, pageLength: 0x200000, block: 'mem1' },
    { type: 5, name: 'RECV_BITMAP', offset: at[4]!, length: 7, block: PC, bitmap: Buffer.from(bm.bytes) },
    { type: 6, name: 'RESUME_ACK', offset: at[5]!, length: 4, value: 1 },
    { type: 7, name: 'SWITCHOVER_ACK', offset: at[6]!, length: 0 },
    { type: 1, name: 'SHUT', offset: at[7]!, length: 4, value: 0 },
  ];

  it('decodes every message with its offset, whole and byte by byte', () => {
    assert.equal(at[5]! - at[4]!, 4 + 7 + 8 + 16 + 8);
    for (const chunk of [bytes.length, 1, 5]) {
      assert.deepEqual(decodeRp(bytes, chunk, { maxType: 8, bitmapBytes: (b) => (b === PC ? 16 : undefined) }), expected);
    }
  });

  it('decodes through one reused read buffer when retainUnread() follows each drain', () => {
    for (const chunk of [1, 3, 7, 64]) {
      const d = new ReturnPathDecoder({ maxType: 8, bitmapBytes: (b) => (b === PC ? 16 : undefined) });
      const readBuffer = Buffer.alloc(chunk);
      const out: ReturnPathMessage[] = [];
      for (let at = 0; at < bytes.length; at += chunk) {
        const n = bytes.copy(readBuffer, 0, at, at + chunk);
        d.push(readBuffer.subarray(0, n));
        for (let m = d.next(); m !== NEED_MORE_RP; m = d.next()) out.push(m);
        d.retainUnread();
        readBuffer.fill(0xee); // the next read overwrites it
      }
      d.end();
      assert.deepEqual(out, expected, `reads of ${chunk} bytes`);
    }
  });

  it('the received bitmap reads back page by page', () => {
    const msgs = decodeRp(bytes, bytes.length, { maxType: 8 });
    const got = new PageBitmap(100, msgs[4]!.bitmap);
    for (let p = 0; p < 100; p++) assert.equal(got.has(p), p === 0 || p === 9 || p >= 64, `page ${p}`);
    assert.equal(got.count(), 38);
  });

  it('a 7.2 source (the default) refuses SWITCHOVER_ACK', () => {
    const d = new ReturnPathDecoder();
    d.push(bytes.subarray(at[6]!));
    assert.throws(() => d.next(), { code: 'LM_ERR_UNKNOWN_RP_MESSAGE', streamOffset: 0 });
  });

  it('refuses a bitmap of the wrong size, or without its end mark', () => {
    const d = new ReturnPathDecoder({ bitmapBytes: () => 8 });
    d.push(bytes.subarray(at[4]!, at[5]!));
    assert.throws(() => d.next(), { code: 'LM_ERR_BAD_RP_PAYLOAD', streamOffset: 11 });
    const bad = Buffer.from(bytes.subarray(at[4]!, at[5]!));
    bad[bad.length - 1] = 0xee;
    const d2 = new ReturnPathDecoder();
    d2.push(bad);
    assert.throws(() => d2.next(), { code: 'LM_ERR_BAD_RP_PAYLOAD', streamOffset: 11 + 8 + 16 });
  });

  it('REQ_PAGES with no block named before is refused; forgetBlock() forgets it', () => {
    const d = new ReturnPathDecoder();
    d.push(bytes.subarray(at[1]!, at[3]!));
    assert.equal((d.next() as ReturnPathMessage).name, 'REQ_PAGES_ID');
    d.forgetBlock();
    assert.throws(() => d.next(), { code: 'LM_ERR_BAD_RP_PAYLOAD' });
  });

  it('length rules: fixed lengths, the 512-byte cap, and a stream that stops mid-message', () => {
    const one = (hex: string): ReturnPathDecoder => {
      const d = new ReturnPathDecoder();
      d.push(Buffer.from(h(hex), 'hex'));
      return d;
    };
    assert.throws(() => one('0001 0003 000000').next(), { code: 'LM_ERR_RP_LENGTH' });
    assert.throws(() => one('0004 0201').next(), { code: 'LM_ERR_RP_LENGTH' });
    assert.throws(() => one('0000 0000').next(), { code: 'LM_ERR_UNKNOWN_RP_MESSAGE' });
    assert.throws(() => one('0006 0004 00000002').next(), { code: 'LM_ERR_BAD_RP_PAYLOAD' });
    const d = one('0002 0004 0000');
    assert.equal(d.next(), NEED_MORE_RP);
    assert.throws(() => d.end(), { code: 'LM_ERR_TRUNCATED' });
  });
});
