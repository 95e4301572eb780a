// A migration's timeline (README "Timeline and report"): what the source measured every 100 ms
// and what happened when, as one JSON document. The source writes it (`--timeline FILE`, QMP
// `x-query-migration-timeline`), `livemig report` reads it and draws it.
//
//   { format: "livemig-timeline", version: 1, intervalMs, startedAt, uri, capabilities, parameters,
//     ramTotalBytes,
//     samples: [ { t, status, transferredBytes, remainingBytes, dirtyBytesPerSecond,
//                  bytesPerSecond, pass, expectedDowntimeMs, throttlePercent } … ],
//     events:  [ { t, kind: "status", status } | { t, kind: "pass", pass }
//              | { t, kind: "switchover-start" } | { t, kind: "downtime-end" }
//              | { t, kind: "postcopy-start" } | { t, kind: "throttle", percent }
//              | { t, kind: "convergence", step, reason, downtimeLimitMs } … ],
//     result:  { status, totalTimeMs, setupTimeMs, downtimeMs, downtimeLimitMs,
//                transferredBytes, passes, errorDesc } | null while it runs }
//
// `t` is milliseconds since the migration started (the source's monotonic clock).

/** The document's `format` value. */
export const TIMELINE_FORMAT = 'livemig-timeline';
/** The version this code writes and reads; a reader refuses any other. */
export const TIMELINE_VERSION = 1;
/** How often the source samples a running migration (ms): cheap, a handful of counters. */
export const TIMELINE_INTERVAL_MS = 100;

export interface TimelineSample {
  t: number;
  status: string;
  transferredBytes: number;
  remainingBytes: number;
  dirtyBytesPerSecond: number;
  bytesPerSecond: number;
  /** Dirty-bitmap syncs so far (QEMU's dirty-sync-count): the pass number. */
  pass: number;
  expectedDowntimeMs: number;
  throttlePercent: number;
}

export type TimelineEvent =
  | { t: number; kind: 'status'; status: string }
  | { t: number; kind: 'pass'; pass: number }
  | { t: number; kind: 'switchover-start' }
  | { t: number; kind: 'downtime-end' }
  | { t: number; kind: 'postcopy-start' }
  | { t: number; kind: 'throttle'; percent: number }
  /** A convergence policy decision: `step` downtime-limit, postcopy, cancel or none; downtimeLimitMs after it. */
  | { t: number; kind: 'convergence'; step: string; reason: string; downtimeLimitMs: number };

export interface TimelineResult {
  status: string;
  totalTimeMs: number;
  setupTimeMs: number;
  /** null when the migration did not complete. */
  downtimeMs: number | null;
  downtimeLimitMs: number;
  transferredBytes: number;
  passes: number;
  errorDesc: string | null;
}

export interface Timeline {
  format: typeof TIMELINE_FORMAT;
  version: typeof TIMELINE_VERSION;
  intervalMs: number;
  /** Wall-clock start, ISO 8601. */
  startedAt: string;
  uri: string;
  capabilities: string[];
  parameters: Record<string, number | string | boolean | string[]>;
  ramTotalBytes: number;
  samples: TimelineSample[];
  events: TimelineEvent[];
  /** Set once the migration has ended. */
  result: TimelineResult | null;
}

/** A timeline file that is not one livemig can read: what was wrong, and where in the document. */
export class TimelineError extends Error {
  readonly code = 'LM_ERR_BAD_TIMELINE';
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = 'TimelineError';
  }
}

const SAMPLE_NUMBERS = ['t', 'transferredBytes', 'remainingBytes', 'dirtyBytesPerSecond', 'bytesPerSecond', 'pass', 'expectedDowntimeMs', 'throttlePercent'] as const;
const EVENT_KINDS = new Set(['status', 'pass', 'switchover-start', 'downtime-end', 'postcopy-start', 'throttle', 'convergence']);

function isObject(v: unknown): v is Record<string, unknown> {
  return typeof v === 'object' && v !== null && !Array.isArray(v);
}

function finite(v: unknown): v is number {
  return typeof v === 'number' && Number.isFinite(v);
}

/**
 * Check a parsed document is a timeline this version reads; returns it typed. Throws a
 * TimelineError naming the first thing wrong (e.g. `samples[3].bytesPerSecond is not a number`).
 */
export function checkTimeline(doc: unknown): Timeline {
  const bad = (what: string): never => {
    throw new TimelineError(what);
  };
  if (!isObject(doc)) return bad('not a JSON object');
  if (doc['format'] !== TIMELINE_FORMAT) return bad(`format is ${JSON.stringify(doc['format'])}, not "${TIMELINE_FORMAT}"`);
  if (doc['version'] !== TIMELINE_VERSION) return bad(`version ${JSON.stringify(doc['version'])} is not one this livemig reads (${TIMELINE_VERSION})`);
  for (const k of ['intervalMs', 'ramTotalBytes'] as const) if (!finite(doc[k])) bad(`${k} is not a number`);
  for (const k of ['startedAt', 'uri'] as const) if (typeof doc[k] !== 'string') bad(`${k} is not a string`);
  if (!Array.isArray(doc['capabilities']) || !doc['capabilities'].every((c) => typeof c === 'string')) bad('capabilities is not a list of strings');
  if (!isObject(doc['parameters'])) bad('parameters is not an object');
  const samples = doc['samples'];
  if (!Array.isArray(samples)) return bad('samples is not a list');
  samples.forEach((s: unknown, i) => {
    if (!isObject(s)) return bad(`samples[${i}] is not an object`);
    for (const k of SAMPLE_NUMBERS) if (!finite(s[k])) bad(`samples[${i}].${k} is not a number`);
    if (typeof s['status'] !== 'string') bad(`samples[${i}].status is not a string`);
    return undefined;
  });
  const events = doc['events'];
  if (!Array.isArray(events)) return bad('events is not a list');
  events.forEach((e: unknown, i) => {
    if (!isObject(e)) return bad(`events[${i}] is not an object`);
    if (!finite(e['t'])) bad(`events[${i}].t is not a number`);
    if (typeof e['kind'] !== 'string' || !EVENT_KINDS.has(e['kind'])) bad(`events[${i}].kind ${JSON.stringify(e['kind'])} is not one of ${[...EVENT_KINDS].join(', ')}`);
    if (e['kind'] === 'status' && typeof e['status'] !== 'string') bad(`events[${i}].status is not a string`);
    if (e['kind'] === 'pass' && !finite(e['pass'])) bad(`events[${i}].pass is not a number`);
    if (e['kind'] === 'throttle' && !finite(e['percent'])) bad(`events[${i}].percent is not a number`);
    if (e['kind'] === 'convergence') {
      for (const k of ['step', 'reason'] as const) if (typeof e[k] !== 'string') bad(`events[${i}].${k} is not a string`);
      if (!finite(e['downtimeLimitMs'])) bad(`events[${i}].downtimeLimitMs is not a number`);
    }
    return undefined;
  });
  const r = doc['result'];
  if (r !== null) {
    if (!isObject(r)) return bad('result is neither an object nor null');
    if (typeof r['status'] !== 'string') bad('result.status is not a string');
    for (const k of ['totalTimeMs', 'setupTimeMs', 'downtimeLimitMs', 'transferredBytes', 'passes'] as const) if (!finite(r[k])) bad(`result.${k} is not a number`);
    if (r['downtimeMs'] !== null && !finite(r['downtimeMs'])) bad('result.downtimeMs is neither a number nor null');
    if (r['errorDesc'] !== null && typeof r['errorDesc'] !== 'string') bad('result.errorDesc is neither a string nor null');
  }
  return doc as unknown as Timeline;
}
