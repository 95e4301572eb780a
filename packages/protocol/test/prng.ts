// The tests' deterministic random numbers: xorshift32, so a failing sequence replays from its seed.

/** Numbers in [0, n) from xorshift32 started at `seed` (0 is taken as 1: xorshift never leaves 0). */
export function xorshift32(seed: number): (n: number) => number {
  let x = seed >>> 0 || 1;
  return (n) => {
    x ^= x << 13;
    x >>>= 0;
    x ^= x >>> 17;
    x ^= x << 5;
    x >>>= 0;
    return x % n;
  };
}
