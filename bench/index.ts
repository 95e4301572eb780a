// `pnpm bench`: every benchmark, each printing its figure next to a ceiling measured in the same
// run. `pnpm bench decode`, `pnpm bench migration`, `pnpm bench cpr-exec`, `pnpm bench postcopy`,
// `pnpm bench downtime` (downtime against downtime-limit) or `pnpm bench qemu` (livemig beside real
// QEMU: the precopy rows, then the postcopy and WAN rows; `qemu-postcopy` runs the latter alone) runs
// one group; `pnpm bench throughput` runs the first migration figure alone, `pnpm bench tls` the TLS
// one, `pnpm bench analyze` the stream-analysis figures.

const only = process.argv.slice(2);
const want = (name: string): boolean => only.length === 0 || only.includes(name);

if (want('decode')) await import('../packages/protocol/bench/decode.bench.ts');
if (only.includes('throughput')) {
  const { throughputBench } = await import('./migration.bench.ts');
  await throughputBench();
}
if (only.includes('tls')) {
  const { tlsBench } = await import('./migration.bench.ts');
  await tlsBench();
}
if (want('migration')) {
  const { migrationBench } = await import('./migration.bench.ts');
  await migrationBench();
}
if (want('cpr-exec')) {
  const { cprExecBench } = await import('./cpr-exec.bench.ts');
  await cprExecBench();
}
if (want('postcopy')) {
  const { postcopyBench } = await import('./postcopy.bench.ts');
  await postcopyBench();
}
if (want('downtime')) {
  const { downtimeBench } = await import('./downtime.bench.ts');
  await downtimeBench();
}
const qemuStarted = performance.now();
if (want('qemu')) {
  const { qemuCompareBench } = await import('./qemu-compare.bench.ts');
  await qemuCompareBench();
}
if (want('qemu-postcopy') || only.includes('qemu')) {
  const { qemuPostcopyBench } = await import('./qemu-postcopy.bench.ts');
  await qemuPostcopyBench();
}
if (want('qemu') || want('qemu-postcopy')) {
  const { loadavg } = await import('node:os');
  console.log(`\nthe QEMU rows took ${((performance.now() - qemuStarted) / 1000).toFixed(0)} s (load average now ${loadavg().map((l) => l.toFixed(2)).join(' ')})`);
}
if (want('analyze')) {
  const { analyzeBench } = await import('./analyze.bench.ts');
  await analyzeBench();
}
