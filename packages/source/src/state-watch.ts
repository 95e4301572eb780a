// The migration thread's one way to wait: until the state machine has taken another step (or a
// time has passed). Every wait of the outgoing migration — for SHUT, for a recovery, for a
// page request during a rate-limit sleep — is this plus a look at the machine's state, instead
// of one closure per purpose.

export class StateWatch {
  private waiters: (() => void)[] = [];

  /** The machine stepped: wake every waiter. */
  notify(): void {
    const w = this.waiters;
    if (w.length === 0) return;
    this.waiters = [];
    for (const wake of w) wake();
  }

  /** Resolves at the next notify, or after `timeoutMs` (never, if undefined). */
  next(timeoutMs?: number): Promise<void> {
    return new Promise((resolve) => {
      if (timeoutMs === undefined) {
        this.waiters.push(resolve);
        return;
      }
      const timer = setTimeout(done, timeoutMs);
      const self = this;
      function done(): void {
        clearTimeout(timer);
        const i = self.waiters.indexOf(done);
        if (i >= 0) self.waiters.splice(i, 1);
        resolve();
      }
      this.waiters.push(done);
    });
  }

  /** Resolves once `holds()` is true, checked now and after every step. */
  async until(holds: () => boolean): Promise<void> {
    while (!holds()) await this.next();
  }
}
