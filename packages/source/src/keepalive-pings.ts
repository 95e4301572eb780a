// Keepalive PINGs the source machine asked for (sendKeepalivePing) and the migration thread has
// not written yet: precopy writes them between sections, postcopy at the start of a batch. One
// queue for both phases, so their values (KEEPALIVE_PING_BASE + n) never repeat.

import { type BatchWriter, KEEPALIVE_PING_BASE, writePing } from '@livemig/protocol';

/** PINGs remembered for their round trip; older ones are forgotten (their PONG is long overdue). */
const TIMED_PINGS = 8;

export class KeepalivePings {
  private due = 0;
  private sent = 0;
  /** When each recent PING was written (ms), by value: its PONG gives the link's round trip. */
  private readonly writtenAt = new Map<number, number>();

  /** The machine wants one more PING. */
  add(): void {
    this.due++;
  }

  get pending(): boolean {
    return this.due > 0;
  }

  /** Write every due PING into `w`; with `nowMs`, their PONGs are timed. */
  writeDue(w: BatchWriter, nowMs?: number): void {
    for (; this.due > 0; this.due--) {
      const value = (KEEPALIVE_PING_BASE + (this.sent++ & 0xffff)) >>> 0;
      writePing(w, value);
      if (nowMs === undefined) continue;
      this.writtenAt.set(value, nowMs);
      if (this.writtenAt.size > TIMED_PINGS) this.writtenAt.delete(this.writtenAt.keys().next().value!);
    }
  }

  /** A PONG: ms since its PING was written, when it answers a timed one. */
  answered(value: number, nowMs: number): number | undefined {
    const at = this.writtenAt.get(value);
    if (at === undefined) return undefined;
    this.writtenAt.delete(value);
    return nowMs - at;
  }
}
