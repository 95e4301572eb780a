export * from './rate-limiter.ts';
export * from './convergence.ts';
export * from './xbzrle-cache.ts';
export * from './ram-saver.ts';
export * from './stream-out.ts';
export * from './migration.ts';
export * from './timeline-recorder.ts';
export * from './errors.ts';
