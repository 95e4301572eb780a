// Keepalive PINGs the source machine asked for (sendKeepalivePing) and the migration thread has
// not written yet: precopy writes them between sections, postcopy at the start of a batch. One
// queue for both phases, so their values (KEEPALIVE_PING_BASE + n) never repeat.

import { type BatchWriter, KEEPALIVE_PING_BASE, writePing } from '@livemig/protocol';

export class KeepalivePings {
  private due = 0;
  private sent = 0;

  /** The machine wants one more PING. */
  add(): void {
    this.due++;
  }

  get pending(): boolean {
    return this.due > 0;
  }

  /** Write every due PING into `w`. */
  writeDue(w: BatchWriter): void {
    for (; this.due > 0; this.due--) writePing(w, (KEEPALIVE_PING_BASE + (this.sent++ & 0xffff)) >>> 0);
  }
}
