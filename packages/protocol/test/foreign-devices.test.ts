// The recorded QEMU machine types (foreign-machines.data.ts) walk real QEMU streams: every device
// section of the QEMU 10.0 pc-q35-10.0 / pc-i440fx-10.0 fixtures and the QEMU 7.2 pc / q35
// fixtures is measured by the recorded description alone, and each length equals the one that
// stream's own VMDESCRIPTION gives (the footer after each section checks it too) — in one push
// and in 7-byte chunks, so every "more bytes needed" point is crossed.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { gunzipSync } from 'node:zlib';
import {
  bytesSource,
  ErrorCode,
  type ForeignMachine,
  findVmdescription,
  measureVmsdSection,
  MigCmd,
  mergeVmsd,
  NEED_MORE,
  parseVmdescription,
  recordedMachine,
  type SectionLayout,
  StreamDecoder,
  VmdescLayouts,
  type VmdescVmsd,
} from '../src/index.ts';
import { fixtureDir, fixturesMissing, repoRoot } from './fixtures.ts';

const STREAMS = [
  { machine: 'pc-q35-10.0', file: join(repoRoot, 'fixtures/qemu-10.0/pc-q35-10.0-16m.mig.gz') },
  { machine: 'pc-i440fx-10.0', file: join(repoRoot, 'fixtures/qemu-10.0/pc-i440fx-10.0-16m.mig.gz') },
  { machine: 'pc-i440fx-7.2', file: join(fixtureDir, 'pc-i440fx-7.2-64m.mig'), shared: true },
  { machine: 'pc-q35-7.2', file: join(fixtureDir, 'pc-q35-7.2-64m.mig'), shared: true },
];

function walk(stream: Buffer, machineType: string, chunk: number, edit: (m: ForeignMachine) => ForeignMachine = (m) => m): { idstr: string; instanceId: number; dataLength: number; layout: string | undefined }[] {
  const machine = edit(recordedMachine(machineType)!);
  const decoder = new StreamDecoder({
    ram: { attachBlocks: (blocks) => blocks.map((b) => new Uint8Array(b.length)) },
    deviceLayout: (s): SectionLayout | undefined => {
      const d = machine.devices.find((x) => x.name === s.idstr && x.instance_id === s.instanceId);
      return d === undefined ? undefined : { framing: 'vmsd', description: d as VmdescVmsd };
    },
    maxCommand: MigCmd.SWITCHOVER_START + 1,
  });
  const out: { idstr: string; instanceId: number; dataLength: number; layout: string | undefined }[] = [];
  for (let at = 0; at < stream.length; at += chunk) {
    decoder.push(stream.subarray(at, at + chunk));
    for (let ev = decoder.next(); ev !== NEED_MORE; ev = decoder.next()) {
      if (ev.kind === 'sectionEnd' && ev.idstr !== 'ram') out.push({ idstr: ev.idstr, instanceId: ev.instanceId, dataLength: ev.dataLength, layout: ev.layout });
    }
  }
  decoder.end();
  return out;
}

describe('recorded QEMU machine types walk real QEMU streams', () => {
  for (const s of STREAMS) {
    const skip = s.shared === true ? fixturesMissing() : undefined;
    it(`${s.machine}: every device section measured by the recording, lengths equal the stream's own VMDESCRIPTION`, { skip: skip ?? false }, () => {
      const raw = readFileSync(s.file);
      const stream = s.file.endsWith('.gz') ? gunzipSync(raw) : raw;
      const found = findVmdescription(stream, 0)!;
      const truth = new VmdescLayouts(parseVmdescription(found.json, found.offset));
      for (const chunk of [stream.length, 7]) {
        const sections = walk(stream, s.machine, chunk);
        assert.ok(sections.length >= 20, `${sections.length} device sections`);
        for (const x of sections) {
          assert.equal(x.layout, 'recorded-vmsd', `${x.idstr} walked by the recording`);
          if (chunk === stream.length) assert.equal(x.dataLength, truth.take(x.idstr, x.instanceId, 'full'), `${x.idstr} #${x.instanceId} length`);
        }
      }
    });
  }
});

describe('a subsection the recording lacks, in a stream with footers', () => {
  it("pc-q35-10.0's fw_cfg without fw_cfg/acpi_mr in its description: that section is measured by its footer instead, at the right length", () => {
    const stream = gunzipSync(readFileSync(STREAMS[0]!.file));
    const found = findVmdescription(stream, 0)!;
    const truth = new VmdescLayouts(parseVmdescription(found.json, found.offset));
    const withoutAcpiMr = (m: ForeignMachine): ForeignMachine => ({
      ...m,
      devices: m.devices.map((d) => (d.name === 'fw_cfg' ? { ...d, subsections: (d.subsections ?? []).filter((s) => s.vmsd_name !== 'fw_cfg/acpi_mr') } : d)),
    });
    const sections = walk(stream, 'pc-q35-10.0', 4093, withoutAcpiMr);
    const fwCfg = sections.find((s) => s.idstr === 'fw_cfg')!;
    assert.equal(fwCfg.layout, 'footer-scan');
    assert.equal(fwCfg.dataLength, truth.take('fw_cfg', 0, 'full'));
    assert.ok(sections.filter((s) => s.idstr !== 'fw_cfg').every((s) => s.layout === 'recorded-vmsd'), 'the others still by the recording');
  });
});

describe('measureVmsdSection', () => {
  const vmsd: VmdescVmsd = {
    vmsd_name: 'dev',
    version: 1,
    fields: [{ name: 'a', type: 'uint32', size: 4 }],
    subsections: [{ vmsd_name: 'dev/x', version: 1, fields: [{ name: 'b', type: 'uint16', size: 2 }] }],
  };
  const place = { sectionId: 9, idstr: 'dev', dataOffset: 1000 };
  const sub = (name: string, body: number[]): number[] => [0x05, name.length, ...Buffer.from(name, 'latin1'), 0, 0, 0, 1, ...body];

  it('fields only: the length once the byte after them shows no subsection', () => {
    const bytes = Uint8Array.from([1, 2, 3, 4, 0x7e]);
    assert.equal(measureVmsdSection(bytesSource(bytes.subarray(0, 4)), vmsd, place, 1 << 20), undefined, 'the next byte decides');
    assert.equal(measureVmsdSection(bytesSource(bytes), vmsd, place, 1 << 20), 4);
  });

  it('a known subsection is walked; every shorter prefix asks for more', () => {
    const bytes = Uint8Array.from([1, 2, 3, 4, ...sub('dev/x', [7, 8]), 0x00]);
    const full = bytes.length - 1;
    for (let n = 0; n < bytes.length; n++) assert.equal(measureVmsdSection(bytesSource(bytes.subarray(0, n)), vmsd, place, 1 << 20), undefined, `prefix ${n}`);
    assert.equal(measureVmsdSection(bytesSource(bytes), vmsd, place, 1 << 20), full);
  });

  it('an unknown subsection is refused by name, at its offset', () => {
    const bytes = Uint8Array.from([1, 2, 3, 4, ...sub('dev/y', [7, 8]), 0x00]);
    assert.throws(
      () => measureVmsdSection(bytesSource(bytes), vmsd, place, 1 << 20),
      (err: { code?: string; streamOffset?: number; message: string; sectionId?: number }) =>
        err.code === ErrorCode.FOREIGN_DEVICE_LAYOUT && err.streamOffset === 1004 && err.sectionId === 9 && /"dev\/y".*known: dev\/x/.test(err.message),
    );
  });

  it('a section longer than the limit is refused', () => {
    const bytes = Uint8Array.from([1, 2, 3, 4, 0]);
    assert.throws(() => measureVmsdSection(bytesSource(bytes), vmsd, place, 3), { code: ErrorCode.LIMIT_EXCEEDED });
  });
});

describe('mergeVmsd', () => {
  const base: VmdescVmsd = { vmsd_name: 'cpu', version: 12, fields: [{ name: 'eax', type: 'uint64', size: 8 }], subsections: [{ vmsd_name: 'cpu/a', version: 1 }] };
  it('unites subsections in first-seen order', () => {
    const other = { ...base, subsections: [{ vmsd_name: 'cpu/b', version: 1 }, { vmsd_name: 'cpu/a', version: 1 }] };
    assert.deepEqual(mergeVmsd(base, other, 'cpu').subsections!.map((s) => s.vmsd_name), ['cpu/a', 'cpu/b']);
  });
  it('refuses fields whose size differs between recordings', () => {
    const other = { ...base, fields: [{ name: 'eax', type: 'uint64', size: 4 }] };
    assert.throws(() => mergeVmsd(base, other, 'cpu'), /cpu\.eax: 8 bytes in one recording, 4 in another/);
  });
});
