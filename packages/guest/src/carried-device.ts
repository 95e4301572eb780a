// A QEMU device livemig does not emulate, carried through a migration: the destination keeps its
// section data verbatim and a source sends it on unchanged, so a QEMU → livemig → QEMU chain
// hands the last QEMU the device state the first one saved. Its layout is the description
// recorded for the machine type (protocol/src/foreign-devices.ts); until something is loaded a
// source sends the state recorded from a QEMU that never ran.

import type { VmdescDevice, VmsdLayout } from '@livemig/protocol';
import { DeviceLoadError, type Device } from './devices.ts';

export class CarriedDevice implements Device {
  readonly idstr: string;
  readonly instanceId: number;
  readonly layout: VmsdLayout;
  /** The version the data was saved with (QEMU checks it against its own on load). */
  versionId: number;
  private data: Buffer;
  /** True once a migration brought this device's state (else the recorded one is sent). */
  loaded = false;

  constructor(description: VmdescDevice, initial: Buffer) {
    this.idstr = description.name;
    this.instanceId = description.instance_id;
    this.versionId = description.version ?? 0;
    this.layout = { framing: 'vmsd', description: { vmsd_name: description.vmsd_name ?? description.name, version: this.versionId, ...description } };
    this.data = initial;
  }

  save(): Buffer {
    return this.data;
  }

  load(data: Buffer, versionId: number): void {
    if (versionId < 0) throw new DeviceLoadError(this.idstr, `stream version ${versionId} is negative`);
    // The decoder hands a copy of its own: kept as is, no second copy.
    this.data = data;
    this.versionId = versionId;
    this.loaded = true;
  }

  /** QEMU's section data is carried, not read: described as one buffer (analyze shows it in hex). */
  describe(dataLength: number): VmdescDevice {
    return { name: this.idstr, instance_id: this.instanceId, vmsd_name: this.layout.description.vmsd_name, version: this.versionId, fields: [{ name: 'data', type: 'buffer', size: dataLength }] };
  }
}
