// What start-up warm-ups made, kept reachable until the process exits.

const kept: object[] = [];

/**
 * Keep `objects` (what a start-up warm-up made) reachable for the process's life. V8's optimised
 * code holds the objects it was specialised on weakly: once a full GC collects them V8 throws the
 * code away ("marking dependent code … for deoptimization, reason: weak objects") and the first
 * migration runs its per-page path unoptimised, compiling it again while pages stream. Seen with
 * --trace-deopt on a source and a destination waiting idle, polled over QMP: the memory reducer's
 * GC ~8 s after start dropped every per-page function their warm-ups had optimised.
 */
export function keepForProcessLife(...objects: object[]): void {
  kept.push(...objects);
}
