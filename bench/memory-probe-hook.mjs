// Loaded into a livemig process by bench/source-memory-probe.ts (node --expose-gc --import this):
// on SIGUSR2 it forces a full GC and appends one JSON line of the process's memory figures to
// $LIVEMIG_MEMORY_PROBE_OUT; the Nth request also writes a heap snapshot when N is listed in
// $LIVEMIG_MEMORY_PROBE_SNAPSHOTS (e.g. "3,10"), to compare what is kept between two migrations.
import { appendFileSync, readFileSync } from 'node:fs';
import { writeHeapSnapshot } from 'node:v8';

const out = process.env['LIVEMIG_MEMORY_PROBE_OUT'];
const snapshots = new Set((process.env['LIVEMIG_MEMORY_PROBE_SNAPSHOTS'] ?? '').split(',').filter((s) => s !== '').map(Number));
let requests = 0;
/**
 * The highest RSS seen since the last sample (memoryUsage every 10 ms), with what made it up then:
 * what sets a migration's VmHWM, which a sample after the migration no longer shows.
 */
let top;
setInterval(() => {
  const m = process.memoryUsage();
  if (top === undefined || m.rss > top.rss) top = m;
}, 10).unref();

if (out !== undefined && typeof globalThis.gc === 'function') {
  process.on('SIGUSR2', () => {
    requests++;
    const kib = (name, status = readFileSync('/proc/self/status', 'utf8')) => Number(new RegExp(`${name}:\\s+(\\d+)`).exec(status)?.[1] ?? NaN);
    // Before the GC: what the process holds with its garbage, as a long-lived source does.
    const rssBeforeGcKiB = kib('VmRSS');
    // LIVEMIG_MEMORY_PROBE_GC=0: no forced GC, to see what garbage a long-lived source carries.
    if (process.env['LIVEMIG_MEMORY_PROBE_GC'] !== '0') globalThis.gc();
    const status = readFileSync('/proc/self/status', 'utf8');
    const m = process.memoryUsage();
    const handles = process.getActiveResourcesInfo();
    const line = {
      n: requests,
      rssBeforeGcKiB,
      vmRssKiB: kib('VmRSS'),
      vmHwmKiB: kib('VmHWM'),
      heapUsed: m.heapUsed,
      external: m.external,
      arrayBuffers: m.arrayBuffers,
      peak: top === undefined ? undefined : { rss: top.rss, heapTotal: top.heapTotal, heapUsed: top.heapUsed, external: top.external, arrayBuffers: top.arrayBuffers },
      handles: handles.length,
      handleKinds: Object.fromEntries([...new Set(handles)].map((k) => [k, handles.filter((x) => x === k).length])),
      snapshot: snapshots.has(requests) ? writeHeapSnapshot(`${out}.${requests}.heapsnapshot`) : undefined,
    };
    top = undefined;
    appendFileSync(out, `${JSON.stringify(line)}\n`);
  });
}
