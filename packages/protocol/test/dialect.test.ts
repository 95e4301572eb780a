import assert from 'node:assert/strict';
import { test } from 'node:test';
import {
  BatchWriter,
  machineTypeVersion,
  NEED_MORE,
  parseQemuVersion,
  RamRecordWriter,
  StreamDecoder,
  streamDialect,
  writeConfiguration,
  writeEof,
  writeEos,
  writeMemSize,
  writeSectionHeader,
  writeStreamHeader,
} from '../src/index.ts';

const v72 = { major: 7, minor: 2 };
const v10 = { major: 10, minor: 0 };

test('machine type versions: versioned types carry theirs, unversioned ones none', () => {
  assert.deepEqual(machineTypeVersion('pc-q35-10.0'), v10);
  assert.deepEqual(machineTypeVersion('pc-i440fx-2.3'), { major: 2, minor: 3 });
  assert.deepEqual(machineTypeVersion('pc-1.3'), { major: 1, minor: 3 });
  for (const t of ['none', 'pc', 'q35', 'isapc', 'microvm', 'livemig-pc']) assert.equal(machineTypeVersion(t), undefined, t);
});

test("each feature switches on at the machine type QEMU's hw_compat tables give it", () => {
  const at = (t: string, q = v72) => streamDialect(t, q);
  // Configuration record and section footers: 2.4 on (hw_compat_2_3 turned both off).
  assert.equal(at('pc-i440fx-2.3').configuration, false);
  assert.equal(at('pc-i440fx-2.3').sectionFooters, false);
  assert.equal(at('pc-i440fx-2.4').configuration, true);
  assert.equal(at('pc-i440fx-2.4').sectionFooters, true);
  // Multifd flush per round: 8.1 on (hw_compat_8_0: multifd-flush-after-each-section=on).
  assert.equal(at('pc-q35-8.0', v10).multifdFlush, 'per-section');
  assert.equal(at('pc-q35-8.1', v10).multifdFlush, 'per-round');
  // Zero pages in multifd packets: 9.0 on (hw_compat_8_2: zero-page-detection=legacy).
  assert.equal(at('pc-q35-8.2', v10).multifdZeroPages, false);
  assert.equal(at('pc-q35-9.0', v10).multifdZeroPages, true);
  // SWITCHOVER_START: 10.0 on (hw_compat_9_2: send-switchover-start=off).
  assert.equal(at('pc-q35-9.2', v10).switchoverStart, false);
  assert.equal(at('pc-q35-10.0', v10).switchoverStart, true);
  // Postcopy-preempt channel setup: 8.0's from machine type 8.0 on a QEMU that has it.
  assert.equal(at('pc-q35-7.2', v10).preemptSetup, '7.2');
  assert.equal(at('pc-q35-8.0', v10).preemptSetup, '8.0');
  assert.equal(at('none', v72).preemptSetup, '7.2');
});

test('an unversioned machine type speaks the dialect of the QEMU that runs it', () => {
  const none72 = streamDialect('none', v72);
  assert.equal(none72.multifdFlush, 'per-section');
  assert.equal(none72.multifdZeroPages, false);
  assert.equal(none72.switchoverStart, false);
  const none10 = streamDialect('none', v10);
  assert.equal(none10.multifdFlush, 'per-round');
  assert.equal(none10.multifdZeroPages, true);
  assert.equal(none10.switchoverStart, true);
  // livemig's default: QEMU 7.2's.
  assert.deepEqual(streamDialect('livemig-pc'), none72);
});

test('a machine type newer than the QEMU named implies a QEMU at least that new; an older one keeps its own dialect', () => {
  const d = streamDialect('pc-q35-10.0', v72);
  assert.equal(d.switchoverStart, true);
  const old = streamDialect('pc-i440fx-7.2', v10);
  assert.equal(old.multifdFlush, 'per-section');
  assert.equal(old.switchoverStart, false);
});

test('--qemu-version takes the versions livemig speaks and names what was wrong otherwise', () => {
  assert.deepEqual(parseQemuVersion('10.0'), v10);
  assert.deepEqual(parseQemuVersion('7.2.0'), v72);
  assert.throws(() => parseQemuVersion('ten'), /"ten" is not MAJOR\.MINOR/);
  assert.throws(() => parseQemuVersion('8.2'), /QEMU version 8\.2 is not one livemig speaks \(7\.2, 10\.0\)/);
});

/** A stream as machine types up to 2.3 write it, or (`configuration`) with a configuration record but still no footers. */
function oldStream(configuration: boolean): Buffer {
  const w = new BatchWriter();
  writeStreamHeader(w);
  if (configuration) writeConfiguration(w, { machineType: 'pc-i440fx-2.4' });
  writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
  writeMemSize(w, [{ idstr: 'pc.ram', length: 0x4000 }]);
  writeEos(w);
  writeSectionHeader(w, { kind: 'part', sectionId: 2 });
  const rec = new RamRecordWriter();
  rec.page(w, 'pc.ram', 0x1000, Buffer.alloc(4096, 0x5a), 0);
  rec.zeroPage(w, 'pc.ram', 0x2000);
  writeEos(w);
  writeSectionHeader(w, { kind: 'end', sectionId: 2 });
  writeEos(w);
  writeEof(w);
  return w.flushConcat();
}

function decodeAll(bytes: Buffer, ram = Buffer.alloc(0x4000, 0xee)): { kind: string }[] {
  const dec = new StreamDecoder({ ram: { attachBlocks: () => [ram] }, expectFooters: 'auto' });
  const events: { kind: string }[] = [];
  dec.push(bytes);
  for (let ev = dec.next(); ev !== NEED_MORE; ev = dec.next()) events.push(ev as { kind: string });
  dec.end();
  return events;
}

test('with expectFooters auto (analyze), a stream that starts with a section (no configuration record) is read without footers, as machine types up to 2.3 write it', () => {
  const ram = Buffer.alloc(0x4000, 0xee);
  const events = decodeAll(oldStream(false), ram);
  assert.ok(!events.some((e) => e.kind === 'configuration'));
  assert.ok(ram.subarray(0x1000, 0x2000).every((b) => b === 0x5a), 'the normal page landed');
  assert.ok(ram.subarray(0x2000, 0x3000).every((b) => b === 0), 'the zero page landed');
  assert.ok(events.some((e) => e.kind === 'eof'), `events: ${events.map((e) => e.kind).join(' ')}`);
});

test('with expectFooters auto, a stream with a configuration record must have footers: their absence is named with its offset', () => {
  assert.throws(() => decodeAll(oldStream(true)), (err: { code?: string; message?: string }) => err.code === 'LM_ERR_BAD_FOOTER' && /expected section footer 0x7e/.test(err.message ?? ''));
});
