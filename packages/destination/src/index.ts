export * from './incoming.ts';
