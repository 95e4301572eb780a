// `@livemig/protocol/analysis`: what reading a stream file needs (the decoder, the analyzer, the
// VMDESCRIPTION and device-state readers, RAM digests, errors), without the state machines,
// encoders and msgpackr that the package entry also loads. `livemig analyze` starts faster.
export * from './analysis.ts';
export * from './device-state.ts';
export * from './errors.ts';
export * from './ram-digest.ts';
export * from './vmdesc.ts';
