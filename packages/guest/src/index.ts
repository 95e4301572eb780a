/**
 * @packageDocumentation
 * The migrated guest, shared by the source and destination processes: RAM blocks on
 * SharedArrayBuffer with a KVM-style dirty log, vCPU worker threads running a workload, and
 * devices with vmstate (timer, globalstate, per-vCPU state, an msgpackr application device), and
 * a VFIO device behind a v1 migration region (VfioV1Region) with QEMU's side on top (VfioDevice).
 */
export * from './errors.ts';
export * from './control.ts';
export * from './ram.ts';
export * from './vcpus.ts';
export * from './request-line.ts';
export * from './threads.ts';
export * from './page-bitmap.ts';
export * from './devices.ts';
export * from './carried-device.ts';
export * from './guest.ts';
export * from './iterative.ts';
export * from './vfio-v1-region.ts';
export * from './vfio-device.ts';
export * from './dirty-rate.ts';
