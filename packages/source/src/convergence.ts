// Convergence decisions, pure and fed by measurements (wire-format.md §9): bandwidth and the
// switchover threshold, the per-turn decision, and auto-converge's CPU throttle.

/** QEMU's window for bandwidth measurement. */
export const BUFFER_DELAY_MS = 100;

export class BandwidthMeter {
  private windowStart: number;
  private windowBytes = 0;
  /** Bytes per millisecond over the last complete window (0 before the first). */
  bandwidth = 0;
  /** Bytes that fit in the downtime limit at the measured bandwidth (0 before the first window). */
  threshold = 0;
  mbps = 0;

  constructor(nowMs: number) {
    this.windowStart = nowMs;
  }

  add(bytes: number): void {
    this.windowBytes += bytes;
  }

  /** Close the window if ≥ 100 ms passed; returns true when a new measurement was made. */
  update(nowMs: number, downtimeLimitMs: number): boolean {
    const elapsed = nowMs - this.windowStart;
    if (elapsed < BUFFER_DELAY_MS) return false;
    this.bandwidth = this.windowBytes / elapsed;
    this.threshold = this.bandwidth * downtimeLimitMs;
    this.mbps = (this.windowBytes * 8) / (elapsed / 1000) / 1e6;
    this.windowBytes = 0;
    this.windowStart = nowMs;
    return true;
  }

  /** Downtime expected if we switched over now with `pendingBytes` left (ms). */
  expectedDowntime(pendingBytes: number): number {
    return this.bandwidth > 0 ? pendingBytes / this.bandwidth : 0;
  }
}

export type NextStep = 'complete' | 'postcopy' | 'iterate';

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
}): NextStep {
  const { pendingBytes, thresholdBytes } = input;
  const canSwitchover = input.canSwitchover ?? true;
  if ((pendingBytes === 0 || pendingBytes < thresholdBytes) && canSwitchover) return 'complete';
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
