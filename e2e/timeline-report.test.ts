// A real two-process migration with `--timeline FILE`, its page from `livemig report`, and that
// page opened in a real headless browser (chromium): the DOM after rendering holds the charts
// (SVG, their lines, the downtime window), and the screenshot is a PNG of the window's size
// with more than a handful of colours. Strings from the file reach the page escaped.

import assert from 'node:assert/strict';
import { existsSync, readFileSync, writeFileSync } from 'node:fs';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { pathToFileURL } from 'node:url';
import { chromiumSkip, decodePng, runChromium } from './helpers/chromium.ts';
import { MiB, queryMigrate, waitForStatus } from './helpers/migration.ts';
import { migrateIntoPostcopy, postcopyPair } from './helpers/postcopy.ts';
import { livemig, type Harness, withHarness } from './helpers/processes.ts';

const T = { timeout: 240_000 };

interface Timeline {
  format: string;
  version: number;
  intervalMs: number;
  uri: string;
  ramTotalBytes: number;
  samples: { t: number; status: string; transferredBytes: number; remainingBytes: number; bytesPerSecond: number; dirtyBytesPerSecond: number; pass: number }[];
  events: { t: number; kind: string; status?: string; pass?: number }[];
  result: { status: string; totalTimeMs: number; downtimeMs: number | null; downtimeLimitMs: number; transferredBytes: number; passes: number } | null;
}

async function waitForFile(path: string, timeoutMs = 15_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!existsSync(path)) {
    if (Date.now() > deadline) assert.fail(`${path} was not written within ${timeoutMs} ms`);
    await sleep(50);
  }
}

function count(html: string, re: RegExp): number {
  return [...html.matchAll(re)].length;
}

/** Open the page in chromium: the DOM after rendering, and a 1200×900 screenshot decoded. */
async function openInBrowser(h: Harness, page: string): Promise<{ dom: string; png: ReturnType<typeof decodePng> }> {
  const url = pathToFileURL(page).href;
  const dom = await runChromium(h.dir, ['--dump-dom', url]);
  assert.equal(dom.code, 0, dom.stderr.slice(-2000));
  const shot = h.path('shot.png');
  const s = await runChromium(h.dir, [`--screenshot=${shot}`, '--window-size=1200,900', '--hide-scrollbars', url]);
  assert.equal(s.code, 0, s.stderr.slice(-2000));
  assert.ok(existsSync(shot), 'the screenshot was written');
  return { dom: dom.stdout, png: decodePng(readFileSync(shot)) };
}

test('a migration with --timeline: the file records it, livemig report draws it, a real browser renders the charts', { ...T, skip: chromiumSkip() }, (t) =>
  withHarness(async (h) => {
    // 64 MiB at 32 MiB/s while the guest dirties ~20 MB/s: a few seconds, several passes.
    const guest = ['-m', '64M', '--workload', 'incrementer:20'];
    const file = h.path('timeline.json');
    const dst = await h.destination({ incoming: 'tcp', guest });
    const src = await h.source({ guest, args: ['--capabilities', 'return-path', '--parameters', `max-bandwidth=${32 * MiB},downtime-limit=300`, '--timeline', file] });
    await src.execute('migrate', { uri: dst.incomingUri });
    await waitForStatus(src, 'active');
    const running = await src.execute<Timeline>('x-query-migration-timeline');
    assert.equal(running.result, null, 'no result while it runs');
    await waitForStatus(src, 'completed', { timeoutMs: 120_000 });
    const info = await queryMigrate(src);
    await waitForFile(file);
    const doc = JSON.parse(readFileSync(file, 'utf8')) as Timeline;

    // The document: versioned, samples in time order, the migration's course as events.
    assert.deepEqual([doc.format, doc.version, doc.intervalMs, doc.uri], ['livemig-timeline', 1, 100, dst.incomingUri]);
    assert.deepEqual(await src.execute('x-query-migration-timeline'), doc, 'QMP gives the same document as the file');
    assert.ok(doc.samples.length >= 3, `samples: ${doc.samples.length}`);
    for (let i = 1; i < doc.samples.length; i++) {
      const [a, b] = [doc.samples[i - 1]!, doc.samples[i]!];
      assert.ok(b.t >= a.t && b.transferredBytes >= a.transferredBytes && b.pass >= a.pass, `samples ${i - 1}→${i} go forward`);
    }
    assert.ok(doc.samples.some((s) => s.status === 'active' && s.bytesPerSecond > 0), 'a measured bandwidth while active');
    assert.ok(doc.samples.some((s) => s.dirtyBytesPerSecond > 0), 'the incrementer shows as a dirty rate');
    const statuses = doc.events.filter((e) => e.kind === 'status').map((e) => e.status);
    assert.deepEqual(statuses, ['setup', 'active', 'completed']);
    const passes = doc.events.filter((e) => e.kind === 'pass').map((e) => e.pass!);
    assert.ok(passes.length >= 2 && passes.every((p, i) => i === 0 || p > passes[i - 1]!), `passes ${passes.join(',')}`);
    const start = doc.events.find((e) => e.kind === 'switchover-start')!;
    const end = doc.events.find((e) => e.kind === 'downtime-end')!;
    assert.ok(start !== undefined && end !== undefined && start.t <= end.t, 'a downtime window');
    const r = doc.result!;
    assert.equal(r.status, 'completed');
    assert.equal(r.downtimeMs, info.downtime, 'downtime as query-migrate reports it');
    assert.ok(Math.abs(end.t - start.t - r.downtimeMs!) <= 1, `window ${start.t}…${end.t} is the downtime ${r.downtimeMs} ms`);
    assert.equal(r.totalTimeMs, info['total-time']);
    assert.equal(r.transferredBytes, info.ram!.transferred);
    assert.equal(r.passes, info.ram!['dirty-sync-count']);
    assert.equal(doc.samples.at(-1)!.transferredBytes, r.transferredBytes);

    // The page: self-contained, nothing fetched.
    const page = h.path('report.html');
    const rep = await livemig(['report', file, '-o', page]);
    assert.equal(rep.code, 0, rep.stderr);
    assert.equal(rep.stdout.trim(), page);
    const html = readFileSync(page, 'utf8');
    assert.doesNotMatch(html, /<script|<link|<img|<iframe|\ssrc=|\shref=|@import|url\(/i, 'no script and nothing loaded from elsewhere');
    assert.match(html, /Downtime<\/td><td>\d+ ms of a 300 ms limit/);

    // A real browser: the DOM after rendering, and what it drew.
    const { dom, png } = await openInBrowser(h, page);
    assert.equal(count(dom, /<svg class="chart"/g), 2, 'two charts');
    assert.equal(count(dom, /<polyline class="series /g), 4, 'bandwidth, dirty rate, remaining, transferred');
    assert.equal(count(dom, /<rect class="downtime"/g), 2, 'the downtime window on both charts');
    assert.ok(count(dom, /<line class="marker pass"/g) >= 2, 'pass starts marked');
    assert.ok(count(dom, /<text class="status-label"[^>]*>completed</g) === 2, 'status changes annotated');
    assert.deepEqual([png.width, png.height], [1200, 900]);
    t.diagnostic(`${doc.samples.length} samples, ${doc.events.length} events, downtime ${r.downtimeMs} ms; screenshot ${png.width}×${png.height}, ${png.distinctColours} colours`);
    assert.ok(png.distinctColours > 16, `not blank: ${png.distinctColours} distinct colours`);
  }),
);

test('livemig report escapes what it takes from the file, and refuses what is not a timeline in one line', { ...T, skip: chromiumSkip() }, () =>
  withHarness(async (h) => {
    const evil = '<script>document.title="owned"</script><img src=x onerror=alert(1)>';
    const doc = {
      format: 'livemig-timeline',
      version: 1,
      intervalMs: 100,
      startedAt: `2026-01-01T00:00:00Z"><b>`,
      uri: `tcp:${evil}`,
      capabilities: [evil],
      parameters: {},
      ramTotalBytes: 4096,
      samples: [
        { t: 0, status: evil, transferredBytes: 0, remainingBytes: 4096, dirtyBytesPerSecond: 0, bytesPerSecond: 0, pass: 1, expectedDowntimeMs: 0, throttlePercent: 0 },
        { t: 100, status: 'completed', transferredBytes: 4096, remainingBytes: 0, dirtyBytesPerSecond: 0, bytesPerSecond: 40960, pass: 1, expectedDowntimeMs: 0, throttlePercent: 0 },
      ],
      events: [{ t: 0, kind: 'status', status: evil }],
      result: { status: evil, totalTimeMs: 100, setupTimeMs: 1, downtimeMs: null, downtimeLimitMs: 300, transferredBytes: 4096, passes: 1, errorDesc: evil },
    };
    const file = h.path('evil.json');
    writeFileSync(file, JSON.stringify(doc));
    const page = h.path('evil.html');
    const rep = await livemig(['report', file, '-o', page]);
    assert.equal(rep.code, 0, rep.stderr);
    const html = readFileSync(page, 'utf8');
    assert.doesNotMatch(html, /<script|<img|<b>/i, 'no markup from the file');
    assert.match(html, /&lt;script&gt;document\.title=&quot;owned&quot;&lt;\/script&gt;/);
    const dom = await runChromium(h.dir, ['--dump-dom', pathToFileURL(page).href]);
    assert.equal(dom.code, 0);
    assert.doesNotMatch(dom.stdout, /<script|<img/i, 'the rendered DOM has no element from the file');
    assert.doesNotMatch(dom.stdout, /<title>owned<\/title>/);

    // Not a timeline: one line naming what is wrong, exit status 2, no page.
    const broken = { ...doc, samples: [{ ...doc.samples[0], bytesPerSecond: 'fast' }] };
    writeFileSync(file, JSON.stringify(broken));
    const bad = await livemig(['report', file, '-o', h.path('bad.html')]);
    assert.equal(bad.code, 2);
    assert.equal(bad.stderr, `livemig: report: ${file}: samples[0].bytesPerSecond is not a number\n`);
    assert.equal(existsSync(h.path('bad.html')), false);
    writeFileSync(file, '{"format":"livemig-timeline","version":7}');
    const newer = await livemig(['report', file]);
    assert.equal(newer.code, 2);
    assert.match(newer.stderr, /^livemig: report: .*: version 7 is not one this livemig reads \(1\)\n$/);
    const missing = await livemig(['report', h.path('nope.json')]);
    assert.equal(missing.code, 1);
    assert.match(missing.stderr, /^livemig: report: ENOENT: no such file or directory, open '.*nope\.json'\n$/);
  }),
);

test('the timeline of a postcopy migration marks postcopy start, and of an auto-converge one its throttle steps', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '64M', '--workload', 'incrementer'];
    const { src, dst } = await postcopyPair(h, { guest });
    await migrateIntoPostcopy(src, dst, dst.incomingUri);
    await src.execute('migrate-set-parameters', { 'max-postcopy-bandwidth': 0 });
    await waitForStatus(src, 'completed', { timeoutMs: 90_000 });
    const doc = await src.execute<Timeline>('x-query-migration-timeline');
    assert.deepEqual(doc.events.filter((e) => e.kind === 'status').map((e) => e.status), ['setup', 'active', 'postcopy-active', 'completed']);
    const postcopy = doc.events.find((e) => e.kind === 'postcopy-start');
    const switchover = doc.events.find((e) => e.kind === 'switchover-start');
    const end = doc.events.find((e) => e.kind === 'downtime-end');
    assert.ok(postcopy !== undefined && switchover !== undefined && end !== undefined, JSON.stringify(doc.events));
    assert.ok(switchover.t <= postcopy.t && switchover.t <= end.t, 'the switchover starts the downtime, before postcopy runs');
    assert.ok(doc.samples.some((x) => x.status === 'postcopy-active') || doc.result!.totalTimeMs - postcopy.t < doc.intervalMs, 'sampled while in postcopy');

    // auto-converge (as in precopy.test.ts: random:120 on 32 MiB at 32 MiB/s converges only at 70 %).
    const g2 = ['-m', '32M', '--workload', 'random:120'];
    const params = `max-bandwidth=${32 * MiB},cpu-throttle-initial=30,cpu-throttle-increment=20,max-cpu-throttle=70`;
    const file = h.path('converge.json');
    const src2 = await h.source({ name: 'src2', guest: g2, args: ['--capabilities', 'return-path,auto-converge', '--parameters', params, '--timeline', file] });
    const dst2 = await h.destination({ name: 'dst2', incoming: 'tcp', guest: g2 });
    await src2.execute('migrate', { uri: dst2.incomingUri });
    await waitForStatus(src2, 'completed', { timeoutMs: 90_000 });
    await waitForFile(file);
    const d2 = JSON.parse(readFileSync(file, 'utf8')) as Timeline;
    const steps = d2.events.filter((e) => e.kind === 'throttle').map((e) => (e as { percent?: number }).percent);
    assert.ok(steps.length >= 1 && steps[0] === 30, `starts at cpu-throttle-initial: ${JSON.stringify(steps)}`);
    for (let i = 1; i < steps.length; i++) assert.equal(steps[i], steps[i - 1]! + 20, `rises by cpu-throttle-increment: ${JSON.stringify(steps)}`);
    // The page draws them (no browser needed for the markup).
    const page = h.path('converge.html');
    assert.equal((await livemig(['report', file, '-o', page])).code, 0);
    assert.equal(count(readFileSync(page, 'utf8'), /<line class="marker throttle"/g), 2 * steps.length, 'throttle steps marked on both charts');
  }),
);
