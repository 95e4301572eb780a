// Decode throughput: a synthetic 1 GiB stream of non-zero pages decoded into prefaulted guest
// RAM, next to this machine's 4 KiB page-copy ceiling (mem-limit.mjs) measured in the same run.

import { performance } from 'node:perf_hooks';
import {
  BatchWriter,
  NEED_MORE,
  RamRecordWriter,
  StreamDecoder,
  TARGET_PAGE_SIZE,
  writeConfiguration,
  writeEof,
  writeEos,
  writeMemSize,
  writeSectionFooter,
  writeSectionHeader,
  writeStreamHeader,
  writeVmdescription,
} from '../src/index.ts';
import { fmt, memLimit, summarize } from '../../../bench/ceilings.ts';

const GiB = 2 ** 30;
const ramBytes = Number(process.env['LIVEMIG_BENCH_DECODE_BYTES'] ?? GiB);
const reps = Number(process.env['LIVEMIG_BENCH_REPS'] ?? 3);
const chunkBytes = 1024 * 1024;

/** A 1 GiB guest with distinct, non-zero content in every page, as QEMU would send it. */
function buildStream(): { whole: Buffer; chunks: Buffer[]; pagePositions: Float64Array } {
  const src = Buffer.allocUnsafe(ramBytes);
  const words = new Uint32Array(src.buffer, src.byteOffset, ramBytes / 4);
  for (let i = 0; i < words.length; i++) words[i] = Math.imul(i, 2654435761) | 1;
  const w = new BatchWriter({ slabSize: 4 * 1024 * 1024 });
  const rec = new RamRecordWriter();
  writeStreamHeader(w);
  writeConfiguration(w, { machineType: 'none' });
  writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
  writeMemSize(w, [{ idstr: 'pc.ram', length: ramBytes }]);
  writeEos(w);
  writeSectionFooter(w, 2);
  const perSection = 16384;
  const pagePositions = new Float64Array(ramBytes / TARGET_PAGE_SIZE);
  for (let page = 0; page < ramBytes / TARGET_PAGE_SIZE; page += perSection) {
    writeSectionHeader(w, { kind: 'part', sectionId: 2 });
    for (let p = page; p < page + perSection; p++) {
      rec.page(w, 'pc.ram', p * TARGET_PAGE_SIZE, src, p * TARGET_PAGE_SIZE);
      pagePositions[p] = w.totalBytes - TARGET_PAGE_SIZE;
    }
    writeEos(w);
    writeSectionFooter(w, 2);
  }
  writeSectionHeader(w, { kind: 'end', sectionId: 2 });
  writeEos(w);
  writeSectionFooter(w, 2);
  writeEof(w);
  writeVmdescription(w, '{"page_size": 4096, "devices": []}');
  // Re-cut into fixed-size chunks, as a socket would deliver them.
  const whole = Buffer.concat(w.flush());
  const chunks: Buffer[] = [];
  for (let i = 0; i < whole.length; i += chunkBytes) chunks.push(whole.subarray(i, i + chunkBytes));
  return { whole, chunks, pagePositions };
}

const { whole, chunks, pagePositions } = buildStream();
const ram = Buffer.alloc(ramBytes, 1); // touched: the destination prefaults its RAM before the stream comes
const samples: number[] = [];
for (let rep = 0; rep < reps; rep++) {
  const dec = new StreamDecoder({ ram: { attachBlocks: () => [ram] } });
  const t0 = performance.now();
  for (const c of chunks) {
    dec.push(c);
    while (dec.next() !== NEED_MORE);
  }
  dec.end();
  const s = (performance.now() - t0) / 1000;
  samples.push(ramBytes / GiB / s);
}
const decode = summarize(samples);
// The least work possible on the same buffers: copy each page out of the stream by its known
// position, no parsing. What separates the decoder from this is its own overhead.
const rawSamples: number[] = [];
for (let rep = 0; rep < reps; rep++) {
  const t0 = performance.now();
  for (let p = 0; p < pagePositions.length; p++) {
    const at = pagePositions[p]!;
    whole.copy(ram, p * TARGET_PAGE_SIZE, at, at + TARGET_PAGE_SIZE);
  }
  rawSamples.push(ramBytes / GiB / ((performance.now() - t0) / 1000));
}
const raw = summarize(rawSamples);
const ceiling = memLimit('copy/buf.copy 4K', '1G', reps);
console.log(`decode ${ramBytes / GiB} GiB of non-zero pages into prefaulted RAM (1 MiB chunks), ${reps} runs, GiB/s median [min-max]`);
console.log(`  livemig StreamDecoder                       ${fmt(decode)}`);
console.log(`  memcpy of the same pages, no parsing        ${fmt(raw)}`);
console.log(`  ceiling: mem-limit.mjs "copy/buf.copy 4K"   ${fmt(ceiling)}`);
console.log(`  ratio decode / mem-limit page copy          ${(decode.median / ceiling.median).toFixed(2)}`);
console.log(`  ratio decode / memcpy of the same pages     ${(decode.median / raw.median).toFixed(2)}`);
