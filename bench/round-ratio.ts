// A ratio taken within one round of the QEMU benches, or why that round has none. A figure of 0
// (QEMU counts total-time in whole ms, and a small all-zero guest can move in under one) or a
// missing one (a field QEMU left out) would print Infinity or NaN and poison the median: such a
// round is skipped, with its reason printed, and left out of the median.

export type RoundRatio = { value: number } | { skipped: string };

/** How a figure that cannot be divided (`divisor`: or divided by) is described; undefined when it can. */
function describe(x: number, unit: string, divisor: boolean): string | undefined {
  // A rate is NaN when its time was 0 or absent (see the rows' figures).
  if (Number.isNaN(x)) return unit === 'GiB/s' ? 'none (total-time 0 ms or absent)' : 'absent';
  if (!Number.isFinite(x)) return 'infinite';
  if (x < 0 || (divisor && x === 0)) return `${x} ${unit}`.trimEnd();
  return undefined;
}

/**
 * `a ÷ b` when both figures are finite, `a` ≥ 0 and `b` > 0; otherwise the reason, naming the figure
 * (`aName`, `bName`: "livemig's total-time", "QEMU 7.2's total-time") and its value.
 */
export function roundRatio(a: number, b: number, aName: string, bName: string, unit = ''): RoundRatio {
  const whyA = describe(a, unit, false);
  const whyB = describe(b, unit, true);
  const bad = [whyA === undefined ? undefined : `${aName} was ${whyA}`, whyB === undefined ? undefined : `${bName} was ${whyB}`].filter((x) => x !== undefined).join(', ');
  return bad === '' ? { value: a / b } : { skipped: bad };
}
