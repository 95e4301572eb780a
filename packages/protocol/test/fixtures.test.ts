// Every real QEMU 7.2 stream decodes to exactly what its manifest says.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { describe, it } from 'node:test';
import {
  type AnalysisReport,
  findVmdescription,
  NEED_MORE_RP,
  parseVmdescription,
  type RecordReport,
  ReturnPathDecoder,
  StreamAnalyzer,
  VmdescLayouts,
} from '../src/index.ts';
import { fixtureNames, fixturesMissing, countSkippedWithoutFixtures, loadFixture } from './fixtures.ts';

const TYPE: Record<string, string> = {
  SECTION_START: 'start',
  SECTION_PART: 'part',
  SECTION_END: 'end',
  SECTION_FULL: 'full',
};

function hex(n: number): string {
  return `0x${n.toString(16)}`;
}

/** Our report's records in the manifest's shape, so the two compare with deepEqual. */
function toManifestShape(records: RecordReport[]): unknown[] {
  return records.map((r) => {
    if (r.record === 'eof') return { type: 'EOF', offset: r.offset };
    if (r.record === 'command') {
      const c: Record<string, unknown> = { cmd: r.cmd, cmd_name: r.name, len: r.length, payload_hex: r.payloadHex, offset: r.offset };
      if (r.pingValue !== undefined) c['ping_value'] = r.pingValue;
      if (r.hostPageSizeSummary !== undefined) c['host_pagesize_summary'] = r.hostPageSizeSummary;
      if (r.targetPageSize !== undefined) c['target_page_size'] = r.targetPageSize;
      if (r.discard !== undefined) c['discard'] = { block: r.discard.block, ranges: r.discard.ranges.map(([s, l]) => [hex(s), hex(l)]) };
      if (r.blobLength !== undefined) c['blob_len'] = r.blobLength;
      if (r.package !== undefined) c['package'] = toManifestShape(r.package);
      return c;
    }
    const s: Record<string, unknown> = {
      type: r.type,
      offset: r.offset,
      section_id: r.sectionId,
      idstr: r.idstr,
      data_offset: r.dataOffset,
      data_len: r.dataLength,
      footer_offset: r.footerOffset,
      end: r.end,
    };
    if (r.type === 'start' || r.type === 'full') {
      s['instance_id'] = r.instanceId;
      s['version_id'] = r.versionId;
    }
    if (r.ram !== undefined) {
      const ram: Record<string, unknown> = {
        zero: r.ram.zero,
        normal: r.ram.normal,
        xbzrle: r.ram.xbzrle,
        named_records: r.ram.named,
        continue_records: r.ram.continued,
        eos_offset: r.ram.eosOffset,
      };
      if (r.ram.blocks !== undefined) {
        ram['mem_size'] = {
          offset: r.ram.memSizeOffset,
          total: r.ram.blocks.reduce((a, b) => a + b.length, 0),
          blocks: r.ram.blocks.map((b) => (b.gpa === undefined ? { idstr: b.idstr, used_length: b.length } : { idstr: b.idstr, used_length: b.length, gpa: b.gpa })),
        };
      }
      s['ram'] = ram;
    } else {
      s['data_sha256'] = r.dataSha256;
    }
    return s;
  });
}

function expectedShape(records: any[]): unknown[] {
  return records.map((m) => {
    if (m.type === 'EOF') return { type: 'EOF', offset: m.offset };
    if (m.type === 'COMMAND') {
      const c: Record<string, unknown> = { cmd: m.cmd, cmd_name: m.cmd_name, len: m.len, payload_hex: m.payload_hex, offset: m.offset };
      for (const k of ['ping_value', 'host_pagesize_summary', 'target_page_size', 'blob_len']) if (k in m) c[k] = m[k];
      if (m.discard !== undefined) c['discard'] = { block: m.discard.block, ranges: m.discard.ranges };
      if (m.package !== undefined) c['package'] = expectedShape(m.package);
      return c;
    }
    assert.equal(m.footer_hex, `7e${m.section_id.toString(16).padStart(8, '0')}`);
    const s: Record<string, unknown> = {
      type: TYPE[m.type],
      offset: m.offset,
      section_id: m.section_id,
      idstr: m.idstr,
      data_offset: m.data_offset,
      data_len: m.data_len,
      footer_offset: m.footer_offset,
      end: m.end,
    };
    if ('instance_id' in m) s['instance_id'] = m.instance_id;
    if ('version_id' in m) s['version_id'] = m.version_id;
    if (m.ram !== undefined) {
      const ram: Record<string, unknown> = {
        zero: m.ram.zero,
        normal: m.ram.normal,
        xbzrle: m.ram.xbzrle,
        named_records: m.ram.named_records,
        continue_records: m.ram.continue_records,
        eos_offset: m.ram.eos_offset,
      };
      if (m.ram.mem_size !== undefined) {
        ram['mem_size'] = { offset: m.ram.mem_size.offset, total: m.ram.mem_size.total, blocks: m.ram.mem_size.blocks };
      }
      s['ram'] = ram;
    } else {
      s['data_sha256'] = m.data_sha256;
    }
    return s;
  });
}

function analyze(stream: Buffer, mode: 'vmdesc' | 'scan', chunk = stream.length): AnalysisReport {
  let layouts: VmdescLayouts | undefined;
  if (mode === 'vmdesc') {
    const found = findVmdescription(stream, 0);
    if (found !== undefined) layouts = new VmdescLayouts(parseVmdescription(found.json, found.offset));
  }
  const a = new StreamAnalyzer(layouts === undefined ? {} : { deviceLayout: (s) => layouts!.take(s.idstr, s.instanceId) });
  for (let i = 0; i < stream.length; i += chunk) a.push(stream.subarray(i, i + chunk));
  return a.end();
}

function checkAgainstManifest(rep: AnalysisReport, m: any): void {
  assert.equal(rep.version, m.header.version);
  assert.equal(m.header.magic, '0x5145564d');
  if (m.configuration === null) {
    assert.equal(rep.configuration, null);
  } else {
    assert.equal(rep.machine, m.configuration.machine_type);
    assert.equal(rep.configuration!.offset, m.configuration.offset);
    assert.equal(rep.configuration!.end, m.configuration.end);
    assert.deepEqual(
      rep.configuration!.subsections,
      m.configuration.subsections.map((s: any) => ({ offset: s.offset, name: s.name, version: s.version })),
    );
    for (const s of m.configuration.subsections) {
      if (s.uuid !== undefined) assert.equal(rep.configuration!.uuid!.replaceAll('-', ''), s.uuid);
      if (s.capabilities !== undefined) assert.deepEqual(rep.configuration!.capabilities, s.capabilities);
    }
  }
  assert.deepEqual(toManifestShape(rep.records), expectedShape(m.records));
  assert.equal(rep.eofOffset, m.eof_offset);
  assert.deepEqual(
    rep.ramBlocks.map((b) => [b.idstr, b.length, b.sha256, b.zeroPages, b.normalPages, b.xbzrlePages]),
    m.ram_blocks.map((b: any) => [b.idstr, b.used_length, b.expected_sha256, b.zero_page_records, b.normal_page_records, b.xbzrle_page_records]),
  );
  if (m.vmdescription === null) {
    assert.equal(rep.vmdescription, null);
  } else {
    const v = rep.vmdescription!;
    assert.equal(v.offset, m.vmdescription.offset);
    assert.equal(v.length, m.vmdescription.len);
    assert.equal(v.pageSize, m.vmdescription.page_size);
    assert.deepEqual(v.devices, m.vmdescription.devices);
    assert.deepEqual(v.layoutMismatches, []);
  }
  assert.equal(rep.streamSize, m.stream_size);
}

const missing = fixturesMissing();

describe('QEMU 7.2 fixtures', { skip: missing }, () => {
  for (const name of fixtureNames()) {
    describe(name, () => {
      const f = loadFixture(name);
      const m = f.manifest;

      it('stream bytes match the manifest', () => {
        assert.equal(f.stream.length, m.stream_size);
        assert.equal(createHash('sha256').update(f.stream).digest('hex'), m.stream_sha256);
      });

      it('decodes to the manifest, device sections sized by VMDESCRIPTION (or footers without one)', () => {
        const rep = analyze(f.stream, 'vmdesc');
        checkAgainstManifest(rep, m);
        if (m.vmdescription !== null) {
          const full = rep.sections.filter((s) => s.type === 'full' && s.depth === 0);
          assert.ok(full.length > 0 && full.every((s) => s.layout === 'declared'));
        }
      });

      it('decodes to the manifest with footer scanning alone', () => {
        const rep = analyze(f.stream, 'scan');
        checkAgainstManifest(rep, m);
        assert.ok(rep.sections.filter((s) => s.ram === undefined).every((s) => s.layout === 'footer-scan'));
      });

      it('gives identical results in 4093-byte chunks', () => {
        assert.deepEqual(analyze(f.stream, 'scan', 4093), analyze(f.stream, 'scan'));
      });

      it('hashes RAM to the manifest without rebuilding it (pages read back from the stream), in 4093-byte chunks into one reused buffer', () => {
        let readBacks = 0;
        const a = new StreamAnalyzer({
          readStreamBytes: (at, dst, dstOffset, length) => {
            readBacks++;
            dst.set(f.stream.subarray(at, at + length), dstOffset);
          },
        });
        // One buffer, overwritten for every chunk: what is left undecoded must have been copied out.
        const reused = Buffer.alloc(4093);
        for (let i = 0; i < f.stream.length; i += reused.length) {
          const n = f.stream.copy(reused, 0, i, i + reused.length);
          a.push(reused.subarray(0, n));
          a.retainUnread();
          reused.fill(0xa5);
        }
        const rep = a.end();
        checkAgainstManifest(rep, m);
        assert.deepEqual(rep, analyze(f.stream, 'scan'));
        // A stopped guest's single pass is hashed as it passes; re-sent, out-of-order and delta pages are read back.
        if (/^(none|pc-i440fx|pc-q35)-/.test(name)) assert.equal(readBacks, 0);
        if (/xbzrle|postcopy-requests/.test(name)) assert.ok(readBacks > 0);
      });

      it('gives the same report read as a file is by livemig analyze: undecoded bytes dropped and read again, the buffer doubled for a record longer than half of it, device data lent', () => {
        const a = new StreamAnalyzer({
          lendDeviceData: true,
          readStreamBytes: (at, dst, dstOffset, length) => void dst.set(f.stream.subarray(at, at + length), dstOffset),
        });
        let buf = Buffer.alloc(4093);
        let position = 0;
        let grown = 0;
        for (;;) {
          const n = f.stream.copy(buf, 0, position, position + buf.length);
          if (n === 0) break;
          a.push(buf.subarray(0, n));
          if (n < buf.length) break;
          const next = a.streamOffset;
          a.dropUnread();
          // What was not decoded must be read again: spoil it.
          buf.fill(0xa5);
          if (position + n - next > buf.length / 2) {
            buf = Buffer.alloc(2 * buf.length);
            grown++;
          }
          position = next;
        }
        const rep = a.end();
        checkAgainstManifest(rep, m);
        assert.deepEqual(rep, analyze(f.stream, 'scan'));
        // It grows only for records that do not fit: device sections and the VMDESCRIPTION (RAM is read record by record).
        const largest = Math.max(4093, rep.vmdescription?.length ?? 0, ...rep.sections.filter((s) => s.ram === undefined).map((s) => s.dataLength)) + 512;
        assert.ok(buf.length <= 2 * largest, `buffer grew to ${buf.length} (${grown} times), largest record about ${largest} bytes`);
      });

      if (f.returnPath !== undefined) {
        it('return-path capture decodes to the manifest', () => {
          const dec = new ReturnPathDecoder();
          dec.push(f.returnPath!);
          const got: unknown[] = [];
          for (let msg = dec.next(); msg !== NEED_MORE_RP; msg = dec.next()) {
            const o: Record<string, unknown> = { offset: msg.offset, type: msg.type, name: msg.name, len: msg.length };
            o['hex'] = f.returnPath!.subarray(msg.offset, msg.offset + 4 + msg.length).toString('hex');
            if (msg.value !== undefined) o['value'] = msg.value;
            if (msg.start !== undefined) {
              o['start'] = hex(msg.start);
              o['length'] = msg.pageLength;
            }
            if (msg.type === 3) o['block'] = msg.block;
            got.push(o);
          }
          dec.end();
          assert.deepEqual(got, m.return_path_messages);
        });
      }
    });
  }
});

countSkippedWithoutFixtures('QEMU 7.2 fixtures');
