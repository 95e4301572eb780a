// `pnpm bench`: every benchmark, each printing its figure next to a ceiling measured in the same run.
await import('../packages/protocol/bench/decode.bench.ts');
