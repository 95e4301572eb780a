/**
 * @packageDocumentation
 * QEMU's migration stream (QEMU_VM_FILE, version 3) as pure encoders and an incremental
 * decoder: bytes in, events and bytes out; no sockets, timers or logging.
 *
 * @example
 * ```ts
 * import { StreamDecoder, NEED_MORE } from '@livemig/protocol';
 * const dec = new StreamDecoder({ ram: { attachBlocks: (blocks) => blocks.map((b) => Buffer.alloc(b.length)) } });
 * dec.push(chunk);
 * for (let ev = dec.next(); ev !== NEED_MORE; ev = dec.next()) console.log(ev.kind);
 * dec.end();
 * ```
 */
export * from './constants.ts';
export * from './errors.ts';
export * from './reader.ts';
export * from './writer.ts';
export * from './xbzrle.ts';
export * from './command.ts';
export * from './ram.ts';
export * from './dialect.ts';
export * from './stream.ts';
export * from './vmdesc.ts';
export * from './foreign-devices.ts';
export * from './recorded-machines.ts';
export * from './bitmap.ts';
export * from './return-path.ts';
export * from './ram-record-decoder.ts';
export * from './stream-events.ts';
export * from './stream-decoder.ts';
export * from './analysis.ts';
export * from './ram-digest.ts';
export * from './device-state.ts';
export * from './migration-config.ts';
export * from './convergence-policy.ts';
export * from './multifd.ts';
export * from './request-batch.ts';
export * from './livemig-ext.ts';
export * from './vfio-framing.ts';
export * from './source-machine.ts';
export * from './destination-machine.ts';
