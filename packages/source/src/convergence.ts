// Convergence decisions, pure and fed by measurements (wire-format.md §9): bandwidth, the
// switchover's plan (README "Downtime"), the per-turn decision, and auto-converge's CPU throttle.
//
//   expected downtime = (stop + final sync + device save + return-path round trip
//                        + (pending + device state + dirtied while stopping) / bandwidth) × margin
//
// QEMU counts only pending / bandwidth against the limit; the rest is what made its downtime
// (and ours) overshoot on a small guest, where the fixed costs are most of it.

/** QEMU's window for bandwidth measurement. */
export const BUFFER_DELAY_MS = 100;
/** Windows kept for the conservative bandwidth: about the last second of sending. */
export const BANDWIDTH_WINDOWS = 10;

/**
 * Bandwidth over QEMU's 100 ms windows. The switchover is planned on a conservative figure, the
 * 25th percentile of the recent windows, not the last one: one fast window (a burst into empty
 * socket buffers) must not promise a stop-and-copy the link cannot keep.
 */
export class BandwidthMeter {
  private windowStart: number;
  private windowBytes = 0;
  /** Bytes per millisecond of the recent non-empty windows, oldest first. */
  private readonly recent: number[] = [];
  /** Bytes per millisecond over the last complete window (0 before the first). */
  bandwidth = 0;
  mbps = 0;

  constructor(nowMs: number) {
    this.windowStart = nowMs;
  }

  add(bytes: number): void {
    this.windowBytes += bytes;
  }

  /** Close the window if ≥ 100 ms passed; returns true when a new measurement was made. */
  update(nowMs: number): boolean {
    const elapsed = nowMs - this.windowStart;
    if (elapsed < BUFFER_DELAY_MS) return false;
    this.bandwidth = this.windowBytes / elapsed;
    this.mbps = (this.windowBytes * 8) / (elapsed / 1000) / 1e6;
    // A window with nothing to send says nothing about the link.
    if (this.windowBytes > 0) {
      this.recent.push(this.bandwidth);
      if (this.recent.length > BANDWIDTH_WINDOWS) this.recent.shift();
    }
    this.windowBytes = 0;
    this.windowStart = nowMs;
    return true;
  }

  /**
   * Before the first window closes, the open window's rate so far (bytes per ms; 0 with nothing
   * sent yet); after, the conservative figure. Only planned with when nothing is pending: then
   * the device state is all it carries, and waiting the window out would add 100 ms to a
   * migration that has nothing left to send (an all-zero guest's, whose first pass takes a few ms).
   */
  provisional(nowMs: number): number {
    if (this.recent.length > 0) return this.conservative;
    const elapsed = nowMs - this.windowStart;
    return elapsed > 0 ? this.windowBytes / elapsed : 0;
  }

  /** Bytes per millisecond the switchover may count on: the recent windows' 25th percentile (0 before the first). */
  get conservative(): number {
    if (this.recent.length === 0) return 0;
    const sorted = [...this.recent].sort((a, b) => a - b);
    return sorted[Math.floor((sorted.length - 1) / 4)]!;
  }
}

/** What the switchover costs besides sending what is pending, as measured on this link. */
export interface SwitchoverCost {
  /** Stopping the vCPUs and devices (ms). */
  stopMs: number;
  /** The final dirty sync (ms). */
  syncMs: number;
  /** Saving the non-iterative devices (ms), and the bytes their sections take. */
  deviceSaveMs: number;
  deviceStateBytes: number;
  /** From the last byte written to the destination's answer on the return path (ms): its load and ack. */
  roundTripMs: number;
}

/** The plan is kept with this margin: the estimate × 1.25 must fit in the limit. */
export const SWITCHOVER_MARGIN = 1.25;

function fixedMs(c: SwitchoverCost): number {
  return c.stopMs + c.syncMs + c.deviceSaveMs + c.roundTripMs;
}

/**
 * Downtime if the switchover started now (ms, with the margin): the fixed costs, and the bytes
 * left (pending, the device sections, and what the guest dirties while it is being stopped) at
 * `bytesPerMs`. Before any bandwidth is measured only the fixed costs are known.
 */
export function expectedDowntimeMs(pendingBytes: number, cost: SwitchoverCost, bytesPerMs: number, dirtyBytesPerMs = 0): number {
  const bytes = pendingBytes + cost.deviceStateBytes + dirtyBytesPerMs * cost.stopMs;
  return (fixedMs(cost) + (bytesPerMs > 0 ? bytes / bytesPerMs : 0)) * SWITCHOVER_MARGIN;
}

/**
 * The most that may be pending for the switchover to fit in `downtimeLimitMs` (bytes; 0 when
 * the fixed costs alone do not fit, or before any bandwidth is measured): QEMU's threshold_size,
 * less what it leaves out.
 */
export function switchoverThresholdBytes(downtimeLimitMs: number, cost: SwitchoverCost, bytesPerMs: number, dirtyBytesPerMs = 0): number {
  const budgetMs = downtimeLimitMs / SWITCHOVER_MARGIN - fixedMs(cost);
  if (bytesPerMs <= 0 || budgetMs <= 0) return 0;
  return Math.max(0, budgetMs * bytesPerMs - cost.deviceStateBytes - dirtyBytesPerMs * cost.stopMs);
}

/** Samples kept per measured cost: the largest of the recent ones is planned with. */
const COST_SAMPLES = 4;
/** Before anything is measured: stopping a few vCPU threads and the devices (ms). */
export const DEFAULT_STOP_MS = 10;
/** Before the first PONG: a loopback round trip through both processes' event loops (ms). */
export const DEFAULT_ROUND_TRIP_MS = 5;

function pushCapped(list: number[], value: number): void {
  list.push(value);
  if (list.length > COST_SAMPLES) list.shift();
}

function largest(list: number[], otherwise: number): number {
  return list.length === 0 ? otherwise : Math.max(...list);
}

/**
 * The switchover's costs as they are measured during the migration: the largest of the recent
 * samples of each (a loaded machine's bad moment is what the plan must survive), defaults
 * before the first sample.
 */
export class SwitchoverCostMeter {
  private readonly stops: number[] = [];
  private readonly syncs: number[] = [];
  private readonly roundTrips: number[] = [];
  private deviceSave = { ms: 0, bytes: 0 };
  /** Without a return path nothing answers: the downtime ends when the last byte is written. */
  private readonly returnPath: boolean;

  constructor(returnPath: boolean) {
    this.returnPath = returnPath;
  }

  noteStop(ms: number): void {
    pushCapped(this.stops, ms);
  }

  noteSync(ms: number): void {
    pushCapped(this.syncs, ms);
  }

  /** A PING's PONG came back `ms` after the PING was written. */
  noteRoundTrip(ms: number): void {
    pushCapped(this.roundTrips, ms);
  }

  /** The non-iterative devices were saved (for real or as a trial) in `ms`, into `bytes`. */
  noteDeviceSave(ms: number, bytes: number): void {
    this.deviceSave = { ms, bytes };
  }

  get cost(): SwitchoverCost {
    return {
      stopMs: largest(this.stops, DEFAULT_STOP_MS),
      syncMs: largest(this.syncs, 0),
      deviceSaveMs: this.deviceSave.ms,
      deviceStateBytes: this.deviceSave.bytes,
      roundTripMs: this.returnPath ? largest(this.roundTrips, DEFAULT_ROUND_TRIP_MS) : 0,
    };
  }
}

/** What a finished migration's downtime was against the limit it was planned for (whole ms). */
export function downtimeVerdict(downtimeMs: number, limitMs: number): { downtimeMs: number; limitMs: number; overshootMs: number } {
  const d = Math.round(downtimeMs);
  return { downtimeMs: d, limitMs, overshootMs: Math.max(0, d - limitMs) };
}

export type NextStep = 'complete' | 'postcopy' | 'iterate';

/**
 * With nothing pending but a plan that does not fit (a slow round trip or stop on a loaded
 * moment, or a limit below the fixed costs), how long to wait for the costs to come down before
 * switching over anyway, as QEMU does at once: iterating cannot lower the costs, time may.
 */
export const NOTHING_PENDING_GRACE_MS = 1000;

/** One loop turn's decision (QEMU's migration_iteration_run). */
export function decideNext(input: {
  pendingBytes: number;
  thresholdBytes: number;
  /** Bytes that must go in precopy (all of RAM without postcopy-ram). */
  mustPrecopyBytes: number;
  postcopyRequested: boolean;
  inPostcopy: boolean;
  /** switchover-ack: false until the destination's SWITCHOVER_ACK (source-machine's maySwitchOver). */
  canSwitchover?: boolean;
  /** How long ago nothing was first found pending (ms); without it, nothing pending completes at once. */
  nothingPendingForMs?: number;
}): NextStep {
  const { pendingBytes, thresholdBytes } = input;
  const canSwitchover = input.canSwitchover ?? true;
  const waitedEnough = input.nothingPendingForMs === undefined || input.nothingPendingForMs >= NOTHING_PENDING_GRACE_MS;
  if (((pendingBytes === 0 && waitedEnough) || pendingBytes < thresholdBytes) && canSwitchover) return 'complete';
  if (!input.inPostcopy && input.postcopyRequested && input.mustPrecopyBytes <= thresholdBytes && canSwitchover) return 'postcopy';
  return 'iterate';
}

export interface ThrottleParameters {
  throttleTriggerThreshold: number;
  cpuThrottleInitial: number;
  cpuThrottleIncrement: number;
  maxCpuThrottle: number;
  cpuThrottleTailslow: boolean;
}

/**
 * Auto-converge (QEMU's mig_throttle_guest_down): each dirty sync at least 1 s after the
 * last period compares bytes dirtied with bytes sent; every second period in which the guest
 * dirtied more than threshold % of what was sent raises the vCPU throttle.
 */
export class AutoConverge {
  private periodStart: number;
  private periodSentStart = 0;
  private periodDirtyPages = 0;
  private dirtyPeriods = 0;
  /** Current throttle percentage (0 = not throttling). */
  percent = 0;

  constructor(nowMs: number) {
    this.periodStart = nowMs;
  }

  /** Pages newly dirtied by the guest since the last sync. */
  addDirty(pages: number): void {
    this.periodDirtyPages += pages;
  }

  /**
   * Called at each dirty sync with the total bytes sent so far; returns the new throttle
   * percentage when it changed, else undefined.
   */
  onSync(nowMs: number, totalSentBytes: number, pageSize: number, p: ThrottleParameters, enabled: boolean): number | undefined {
    if (nowMs - this.periodStart < 1000) return undefined;
    const sent = totalSentBytes - this.periodSentStart;
    const dirtied = this.periodDirtyPages * pageSize;
    this.periodStart = nowMs;
    this.periodSentStart = totalSentBytes;
    this.periodDirtyPages = 0;
    if (dirtied <= (sent * p.throttleTriggerThreshold) / 100) return undefined;
    if (++this.dirtyPeriods < 2) return undefined;
    this.dirtyPeriods = 0;
    if (!enabled) return undefined;
    let next: number;
    if (this.percent === 0) next = p.cpuThrottleInitial;
    else if (p.cpuThrottleTailslow) {
      const ratio = sent > 0 ? dirtied / ((sent * p.throttleTriggerThreshold) / 100) : 2;
      const wanted = this.percent + Math.ceil((100 - this.percent) * (1 - 1 / ratio));
      next = Math.min(this.percent + p.cpuThrottleIncrement, Math.max(this.percent + 1, wanted));
    } else next = this.percent + p.cpuThrottleIncrement;
    next = Math.min(next, p.maxCpuThrottle, 99);
    if (next === this.percent) return undefined;
    this.percent = next;
    return next;
  }
}
