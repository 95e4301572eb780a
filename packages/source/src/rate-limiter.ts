// Bandwidth limiting for the migration stream. Time is passed in, never read.
//
// QEMU grants max-bandwidth/10 bytes per 100 ms window and lets the first window overshoot.
// Here the allowance grows continuously: at time t a sender may have sent at most
// rate × (t − epoch) + burst bytes, so every window of any length stays on the rate and only
// one batch (the burst) may run ahead. Changing the rate rebases the epoch without a jump.

export class RateLimiter {
  private bytesPerSecond: number;
  private epochMs: number;
  private sentSinceEpoch = 0;
  /** How far a sender may run ahead of the line, bytes. */
  readonly burstBytes: number;

  /** `bytesPerSecond` 0 = unlimited. */
  constructor(bytesPerSecond: number, nowMs: number, burstBytes = 256 * 1024) {
    this.bytesPerSecond = bytesPerSecond;
    this.epochMs = nowMs;
    this.burstBytes = burstBytes;
  }

  get rate(): number {
    return this.bytesPerSecond;
  }

  get unlimited(): boolean {
    return this.bytesPerSecond === 0;
  }

  /** Change the rate from now on; credit or debt so far carries over (bounded by one burst). */
  setRate(bytesPerSecond: number, nowMs: number): void {
    const balance = this.unlimited ? this.burstBytes : Math.min(this.allowance(nowMs), this.burstBytes);
    this.bytesPerSecond = bytesPerSecond;
    this.epochMs = nowMs;
    // allowance(now) = burst − sent: keep the balance (a debt stays owed, credit caps at one burst).
    this.sentSinceEpoch = this.burstBytes - balance;
  }

  /** Bytes that may be sent now without passing the line. */
  allowance(nowMs: number): number {
    if (this.unlimited) return Infinity;
    const allowance = (this.bytesPerSecond * (nowMs - this.epochMs)) / 1000 + this.burstBytes - this.sentSinceEpoch;
    // Time not used for sending (blocked on a stalled peer) banks at most one QEMU window
    // (100 ms of the rate, at least one burst): QEMU's per-window budget does not carry over.
    const cap = Math.max(this.burstBytes, this.bytesPerSecond / 10);
    if (allowance <= cap) return allowance;
    this.epochMs = nowMs;
    this.sentSinceEpoch = this.burstBytes - cap;
    return cap;
  }

  /**
   * Milliseconds to wait before `bytes` more may go (0: now). More than the allowance can ever
   * bank (one window) is waited for as that much: the wait would otherwise never reach 0.
   */
  delayFor(bytes: number, nowMs: number): number {
    if (this.unlimited) return 0;
    const most = Math.max(this.burstBytes, this.bytesPerSecond / 10);
    const short = Math.min(bytes, most) - this.allowance(nowMs);
    return short <= 0 ? 0 : (short * 1000) / this.bytesPerSecond;
  }

  consume(bytes: number): void {
    this.sentSinceEpoch += bytes;
  }
}
