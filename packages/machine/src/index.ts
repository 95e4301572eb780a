export * from './flags.ts';
export * from './qmp-common.ts';
export * from './progress.ts';
export * from './startup.ts';
export * from './timeline.ts';
