// Real QEMU 10.0 streams (fixtures/qemu-10.0, written by its make.ts) decode to what their
// manifests say: the RAM block list QEMU reported, the pattern block byte for byte, the firmware
// in pc.bios, the machine type, and a footer on every section — in one push and in odd chunks.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, it } from 'node:test';
import { gunzipSync } from 'node:zlib';
import { type AnalysisReport, StreamAnalyzer } from '../src/index.ts';
import { repoRoot } from './fixtures.ts';

const dir = join(repoRoot, 'fixtures', 'qemu-10.0');
const names = readdirSync(dir).filter((f) => f.endsWith('.json')).map((f) => f.slice(0, -5)).sort();

function analyze(stream: Buffer, chunk: number): AnalysisReport {
  const a = new StreamAnalyzer();
  for (let at = 0; at < stream.length; at += chunk) a.push(stream.subarray(at, at + chunk));
  return a.end();
}

describe('QEMU 10.0 fixtures', () => {
  it('are there', () => assert.ok(names.length >= 3, `fixtures: ${names.join(', ')}`));
  for (const name of names) {
    it(name, () => {
      const m = JSON.parse(readFileSync(join(dir, `${name}.json`), 'utf8'));
      const stream = gunzipSync(readFileSync(join(dir, m.stream_file)));
      assert.equal(stream.length, m.stream_size);
      assert.equal(createHash('sha256').update(stream).digest('hex'), m.stream_sha256);
      for (const chunk of [stream.length, 4093]) {
        const r = analyze(stream, chunk);
        assert.equal(r.machine, m.machine_type);
        assert.deepEqual(
          r.ramBlocks.map((b) => ({ idstr: b.idstr, used_length: b.length })),
          m.ram_blocks,
          "the block list is QEMU's info ramblock",
        );
        const pattern = r.ramBlocks.find((b) => b.idstr === m.pattern_block);
        assert.equal(pattern?.sha256, m.expected_sha256, `${m.pattern_block} = the image QEMU held (chunk ${chunk})`);
        for (const [block, sha] of Object.entries((m.firmware_sha256 ?? {}) as Record<string, string>)) {
          assert.equal(r.ramBlocks.find((b) => b.idstr === block)?.sha256, sha, `${block} = the firmware QEMU loaded`);
        }
        const sections = r.records.filter((x) => x.record === 'section');
        assert.ok(sections.length > 0);
        assert.equal(sections.every((s) => s.footerOffset > 0), m.footers_present, 'footers');
        assert.ok(r.vmdescription !== null, 'the VMDESCRIPTION trailer was read');
      }
    });
  }
});
