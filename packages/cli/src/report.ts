// `livemig report TIMELINE [-o OUT.html]`: one self-contained HTML page from a migration timeline
// (@livemig/machine's timeline.ts): inline SVG charts, inline CSS, no script, font or network
// access. Every string taken from the file is escaped before it goes into the page.
//
//   ┌ summary table: status, total time, downtime vs limit, bytes, throughput, passes ┐
//   ├ chart: bandwidth and dirty rate (GiB/s) over time                               ┤
//   ├ chart: remaining dirty bytes and bytes transferred (GiB) over time              ┤
//   │   each chart: pass starts (dotted), status changes (labelled), the downtime     │
//   │   window (shaded), postcopy start and throttle changes                          │
//   └ event list                                                                      ┘

import { readFile, writeFile } from 'node:fs/promises';
import { checkTimeline, formatGiB, formatGiBps, type Timeline, type TimelineSample, TimelineError } from '@livemig/machine';

const GiB = 2 ** 30;

/** Text for HTML element content and quoted attribute values. */
export function escapeHtml(text: string): string {
  return text.replace(/[&<>"']/g, (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' })[c]!);
}

interface Series {
  name: string;
  className: string;
  color: string;
  value(s: TimelineSample): number;
}

interface Marker {
  t: number;
  label: string;
  className: string;
}

interface ChartOptions {
  title: string;
  unit: string;
  scale: number;
  series: Series[];
}

const WIDTH = 1100;
const HEIGHT = 280;
const MARGIN = { left: 70, right: 30, top: 56, bottom: 36 };

function niceMax(v: number): number {
  if (!(v > 0)) return 1;
  const p = 10 ** Math.floor(Math.log10(v));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

function fmt(v: number, digits = 2): string {
  return Number.isFinite(v) ? v.toFixed(digits) : '0';
}

/** One line chart over the migration's time axis (0 … spanMs), with the shared markers. */
function chart(doc: Timeline, spanMs: number, o: ChartOptions, markers: Marker[], downtime: { from: number; to: number } | undefined): string {
  const plotW = WIDTH - MARGIN.left - MARGIN.right;
  const plotH = HEIGHT - MARGIN.top - MARGIN.bottom;
  const yMax = niceMax(Math.max(0, ...o.series.flatMap((s) => doc.samples.map((x) => s.value(x) / o.scale))));
  // Enough decimals that the 4 grid steps read differently (0.0125 GiB/s, not 0.01).
  const yDigits = Math.min(6, Math.max(0, 2 - Math.floor(Math.log10(yMax))));
  const x = (t: number): number => MARGIN.left + (Math.min(Math.max(t, 0), spanMs) / spanMs) * plotW;
  const y = (v: number): number => MARGIN.top + plotH - (Math.min(Math.max(v, 0), yMax) / yMax) * plotH;
  const parts: string[] = [];
  parts.push(`<svg class="chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 ${WIDTH} ${HEIGHT}" width="${WIDTH}" height="${HEIGHT}" role="img" aria-label="${escapeHtml(o.title)}">`);
  parts.push(`<text class="title" x="${MARGIN.left}" y="18">${escapeHtml(o.title)}</text>`);
  parts.push(`<rect class="plot" x="${MARGIN.left}" y="${MARGIN.top}" width="${plotW}" height="${plotH}"/>`);
  if (downtime !== undefined) {
    const x0 = x(downtime.from);
    const w = Math.max(2, x(downtime.to) - x0);
    parts.push(`<rect class="downtime" x="${fmt(x0)}" y="${MARGIN.top}" width="${fmt(w)}" height="${plotH}"><title>downtime ${Math.round(downtime.to - downtime.from)} ms</title></rect>`);
    parts.push(`<text class="downtime-label" x="${fmt(x0 - 4)}" y="${MARGIN.top + 12}" text-anchor="end">downtime ${Math.round(downtime.to - downtime.from)} ms</text>`);
  }
  // Grid and axes: 4 steps each way.
  for (let i = 0; i <= 4; i++) {
    const v = (yMax * i) / 4;
    const yy = y(v);
    parts.push(`<line class="grid" x1="${MARGIN.left}" x2="${MARGIN.left + plotW}" y1="${fmt(yy)}" y2="${fmt(yy)}"/>`);
    parts.push(`<text class="axis" x="${MARGIN.left - 6}" y="${fmt(yy + 4)}" text-anchor="end">${fmt(v, yDigits)}</text>`);
    const t = (spanMs * i) / 4;
    parts.push(`<text class="axis" x="${fmt(x(t))}" y="${HEIGHT - MARGIN.bottom + 16}" text-anchor="middle">${fmt(t / 1000, 2)} s</text>`);
  }
  parts.push(`<text class="axis" x="${MARGIN.left - 6}" y="${MARGIN.top - 8}" text-anchor="end">${escapeHtml(o.unit)}</text>`);
  for (const m of markers) {
    const xx = fmt(x(m.t));
    parts.push(`<line class="marker ${m.className}" x1="${xx}" x2="${xx}" y1="${MARGIN.top}" y2="${MARGIN.top + plotH}"><title>${escapeHtml(m.label)} at ${Math.round(m.t)} ms</title></line>`);
  }
  // Status labels above the plot, alternating rows so neighbours do not overlap.
  markers
    .filter((m) => m.className === 'status')
    .forEach((m, i) => {
      // Near the right edge the label ends at its line instead of starting there.
      const right = x(m.t) > WIDTH - MARGIN.right - 80;
      const anchor = right ? ` text-anchor="end"` : '';
      parts.push(`<text class="status-label" x="${fmt(x(m.t) + (right ? -2 : 2))}" y="${MARGIN.top - 4 - (i % 2) * 11}"${anchor}>${escapeHtml(m.label)}</text>`);
    });
  for (const s of o.series) {
    const pts = doc.samples.map((p) => `${fmt(x(p.t), 1)},${fmt(y(s.value(p) / o.scale), 1)}`).join(' ');
    parts.push(`<polyline class="series ${s.className}" fill="none" stroke="${s.color}" stroke-width="2" points="${pts}"/>`);
  }
  // Legend.
  o.series.forEach((s, i) => {
    const lx = MARGIN.left + plotW - 200 * (o.series.length - i);
    parts.push(`<rect x="${lx}" y="12" width="14" height="4" fill="${s.color}"/><text class="legend" x="${lx + 20}" y="18">${escapeHtml(s.name)}</text>`);
  });
  parts.push('</svg>');
  return parts.join('\n');
}

/** A convergence policy decision in a few words. */
function convergenceLabel(e: { step: string; downtimeLimitMs: number }): string {
  return e.step === 'downtime-limit' ? `downtime-limit ${e.downtimeLimitMs} ms` : `last step ${e.step}`;
}

/** The HTML page for a checked timeline. */
export function renderReport(doc: Timeline): string {
  const r = doc.result;
  const lastSample = doc.samples.at(-1)?.t ?? 0;
  const lastEvent = doc.events.reduce((m, e) => Math.max(m, e.t), 0);
  const spanMs = Math.max(1, r?.totalTimeMs ?? 0, lastSample, lastEvent);
  const switchover = doc.events.find((e) => e.kind === 'switchover-start');
  const downtimeEnd = doc.events.find((e) => e.kind === 'downtime-end');
  const downtime = switchover !== undefined && downtimeEnd !== undefined ? { from: switchover.t, to: downtimeEnd.t } : undefined;
  const passes = doc.events.filter((e) => e.kind === 'pass');
  const markers: Marker[] = [];
  // Many passes near the end (each exact-pending check syncs): draw at most one a pixel.
  let lastPassX = Number.NEGATIVE_INFINITY;
  for (const p of passes) {
    if (((p.t - lastPassX) / spanMs) * (WIDTH - MARGIN.left - MARGIN.right) < 1) continue;
    lastPassX = p.t;
    markers.push({ t: p.t, label: `pass ${p.kind === 'pass' ? p.pass : ''}`, className: 'pass' });
  }
  for (const e of doc.events) {
    if (e.kind === 'status') markers.push({ t: e.t, label: e.status, className: 'status' });
    else if (e.kind === 'postcopy-start') markers.push({ t: e.t, label: 'postcopy start', className: 'postcopy' });
    else if (e.kind === 'throttle') markers.push({ t: e.t, label: `throttle ${e.percent} %`, className: 'throttle' });
    else if (e.kind === 'convergence') markers.push({ t: e.t, label: convergenceLabel(e), className: 'convergence' });
  }
  const rates = chart(
    doc,
    spanMs,
    {
      title: 'Bandwidth and dirty rate',
      unit: 'GiB/s',
      scale: GiB,
      series: [
        { name: 'bandwidth', className: 'bandwidth', color: '#1f77b4', value: (s) => s.bytesPerSecond },
        { name: 'dirty rate', className: 'dirty-rate', color: '#d62728', value: (s) => s.dirtyBytesPerSecond },
      ],
    },
    markers,
    downtime,
  );
  const bytes = chart(
    doc,
    spanMs,
    {
      title: 'Remaining (dirty) and transferred',
      unit: 'GiB',
      scale: GiB,
      series: [
        { name: 'remaining', className: 'remaining', color: '#2ca02c', value: (s) => s.remainingBytes },
        { name: 'transferred', className: 'transferred', color: '#9467bd', value: (s) => s.transferredBytes },
      ],
    },
    markers,
    downtime,
  );
  const rows: [string, string][] = [];
  rows.push(['Status', r?.status ?? `${doc.samples.at(-1)?.status ?? 'unknown'} (still running when written)`]);
  if (r?.errorDesc != null) rows.push(['Error', r.errorDesc]);
  rows.push(['Destination', doc.uri], ['Started', doc.startedAt]);
  if (r !== null) {
    rows.push(['Total time', `${r.totalTimeMs} ms`], ['Setup time', `${r.setupTimeMs} ms`]);
    const verdict = r.downtimeMs === null ? '' : r.downtimeMs <= r.downtimeLimitMs ? ' (within the limit)' : ' (OVER the limit)';
    rows.push(['Downtime', r.downtimeMs === null ? `- (limit ${r.downtimeLimitMs} ms)` : `${r.downtimeMs} ms of a ${r.downtimeLimitMs} ms limit${verdict}`]);
    rows.push(['Transferred', `${formatGiB(r.transferredBytes)} (${r.transferredBytes} bytes) for ${formatGiB(doc.ramTotalBytes)} of RAM`]);
    rows.push(['Throughput', r.totalTimeMs > 0 ? `${formatGiBps(r.transferredBytes / (r.totalTimeMs / 1000))} average` : '-']);
    rows.push(['Passes', `${r.passes} dirty-bitmap syncs`]);
  }
  const peak = doc.samples.reduce((m, s) => Math.max(m, s.bytesPerSecond), 0);
  rows.push(['Peak bandwidth', formatGiBps(peak)]);
  rows.push(['Capabilities', doc.capabilities.length === 0 ? 'none' : doc.capabilities.join(', ')]);
  rows.push(['Samples', `${doc.samples.length}, every ${doc.intervalMs} ms`]);
  const eventRows = doc.events.map((e) => {
    const what =
      e.kind === 'status'
        ? `status ${e.status}`
        : e.kind === 'pass'
          ? `pass ${e.pass}`
          : e.kind === 'throttle'
            ? `throttle ${e.percent} %`
            : e.kind === 'convergence'
              ? `convergence policy (${e.reason}): ${convergenceLabel(e)}`
              : e.kind;
    return `<tr class="event ${escapeHtml(e.kind)}"><td>${Math.round(e.t)} ms</td><td>${escapeHtml(what)}</td></tr>`;
  });
  const title = `livemig migration to ${doc.uri}`;
  return `<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="default-src 'none'; style-src 'unsafe-inline'">
<title>${escapeHtml(title)}</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px 24px; color: #222; background: #fff; }
h1 { font-size: 20px; margin: 0 0 12px; }
table.summary td:first-child { font-weight: 600; padding-right: 16px; }
table.summary { margin-bottom: 16px; border-collapse: collapse; }
table.summary td { padding: 2px 8px 2px 0; }
svg.chart { display: block; margin: 8px 0 16px; }
svg .plot { fill: #fafafa; stroke: #888; }
svg .grid { stroke: #e2e2e2; }
svg .axis, svg .legend, svg .status-label, svg .downtime-label { font: 11px system-ui, sans-serif; fill: #444; }
svg .title { font: 600 14px system-ui, sans-serif; fill: #222; }
svg .downtime { fill: #ffbf00; fill-opacity: 0.45; }
svg .marker.pass { stroke: #999; stroke-dasharray: 2 3; }
svg .marker.status { stroke: #444; }
svg .marker.postcopy { stroke: #ff7f0e; stroke-width: 2; }
svg .marker.throttle { stroke: #8c564b; stroke-dasharray: 6 3; }
svg .marker.convergence { stroke: #ff7f0e; stroke-dasharray: 2 2; }
details { margin-top: 8px; }
</style>
</head>
<body>
<h1>${escapeHtml(title)}</h1>
<table class="summary">
${rows.map(([k, v]) => `<tr><td>${escapeHtml(k)}</td><td>${escapeHtml(v)}</td></tr>`).join('\n')}
</table>
${rates}
${bytes}
<details><summary>${doc.events.length} events</summary>
<table class="events">
${eventRows.join('\n')}
</table>
</details>
</body>
</html>
`;
}

/** Read a timeline file, check it, write its page. Throws TimelineError (not a timeline) or an fs error. */
export async function runReport(input: string, output: string): Promise<void> {
  const text = await readFile(input, 'utf8');
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    throw new TimelineError(`not JSON: ${(err as Error).message}`, { cause: err });
  }
  await writeFile(output, renderReport(checkTimeline(parsed)));
}
