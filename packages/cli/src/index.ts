export * from './analyze.ts';
export * from './demo.ts';
