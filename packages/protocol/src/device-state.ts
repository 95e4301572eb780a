// Device fields read off a FULL (or START) device section by its VMDESCRIPTION entry
// (wire-format.md §10), shown as QEMU's scripts/analyze-migration.py `-d state` shows them, so
// the two outputs can be compared key by key:
//
//   section data := FIELD… SUBSECTION…          (in the description's order)
//   FIELD        := size bytes, array_len times (a list) | a nested struct (an object)
//   SUBSECTION   := u8 0x05 | u8 len | name[len] | be32 version | its own FIELD… SUBSECTION…
//
// Values, by field type:
//   integer types   big-endian, "0x" + 2×size hex digits; a negative signed value adds " (-n)"
//                   (as that script: "int32 le" is read big-endian too, "uint8/16 equal" signed)
//   bool            true / false (first byte non-zero)
//   anything else   the bytes as two-digit hex separated by spaces ("" for none)
//
// The whole dump is one object: per section "idstr (section id)" in first-seen order; the RAM
// section shows {"section sizes": {block: "0x%016x"}}.

import { ErrorCode, ProtocolError } from './errors.ts';
import type { RamBlockInfo } from './ram.ts';
import type { VmdescDevice, VmdescField, VmdescVmsd, Vmdescription } from './vmdesc.ts';

export type StateValue = string | boolean | StateValue[] | StateObject;
export interface StateObject {
  [key: string]: StateValue;
}

/** Type names read as signed integers (the rest of the integer names unsigned). */
const SIGNED = new Set(['int8', 'int16', 'int32', 'int32 equal', 'int32 le', 'int64', 'int64 equal', 'uint8 equal', 'uint16 equal']);
const UNSIGNED = new Set(['uint8', 'uint16', 'uint32', 'uint32 equal', 'uint64']);
const SUBSECTION_MARK = 0x05;

class StateReader {
  pos = 0;
  readonly data: Uint8Array;
  /** Stream offset of data[0], for error places. */
  readonly streamOffset: number;
  readonly where: { sectionId: number; idstr: string };

  constructor(data: Uint8Array, streamOffset: number, where: { sectionId: number; idstr: string }) {
    this.data = data;
    this.streamOffset = streamOffset;
    this.where = where;
  }

  take(n: number, what: string): Uint8Array {
    if (this.pos + n > this.data.length) {
      this.fail(`field "${what}" needs ${n} bytes at data offset ${this.pos}, only ${this.data.length - this.pos} left`);
    }
    const bytes = this.data.subarray(this.pos, this.pos + n);
    this.pos += n;
    return bytes;
  }

  fail(message: string): never {
    throw new ProtocolError(ErrorCode.DEVICE_STATE_MISMATCH, `device section "${this.where.idstr}" does not match its VMDESCRIPTION: ${message}`, {
      streamOffset: this.streamOffset + Math.min(this.pos, this.data.length),
      sectionId: this.where.sectionId,
      idstr: this.where.idstr,
    });
  }
}

function hexBytes(b: Uint8Array): string {
  let s = '';
  for (let i = 0; i < b.length; i++) s += (i === 0 ? '' : ' ') + b[i]!.toString(16).padStart(2, '0');
  return s;
}

function intValue(b: Uint8Array, signed: boolean): string {
  const digits = Buffer.from(b.buffer, b.byteOffset, b.byteLength).toString('hex');
  const formatted = `0x${digits}`;
  if (!signed || b.length === 0 || (b[0]! & 0x80) === 0) return formatted;
  const negative = BigInt(formatted) - (1n << BigInt(8 * b.length));
  return `${formatted} (${negative})`;
}

function fieldValue(r: StateReader, f: VmdescField): StateValue {
  if (f.type === 'struct' && f.struct !== undefined) return readStruct(r, f.struct);
  const bytes = r.take(f.size, f.name);
  if (f.type === 'bool') return f.size > 0 && bytes[0] !== 0;
  if (SIGNED.has(f.type)) return intValue(bytes, true);
  if (UNSIGNED.has(f.type)) return intValue(bytes, false);
  return hexBytes(bytes);
}

function readStruct(r: StateReader, vmsd: Pick<VmdescVmsd, 'fields' | 'subsections'>): StateObject {
  const out: StateObject = {};
  for (const f of vmsd.fields ?? []) {
    if (f.array_len !== undefined) {
      const list: StateValue[] = [];
      for (let i = 0; i < f.array_len; i++) list.push(fieldValue(r, f));
      out[f.name] = list;
    } else if (f.index !== undefined) {
      // One element of an array the description lists element by element.
      const list = (out[f.name] ??= []) as StateValue[];
      if (!Array.isArray(list) || list.length !== f.index) r.fail(`element ${f.index} of "${f.name}" out of order`);
      list.push(fieldValue(r, f));
    } else {
      out[f.name] = fieldValue(r, f);
    }
  }
  for (const sub of vmsd.subsections ?? []) {
    const mark = r.take(1, `${sub.vmsd_name} subsection mark`)[0];
    if (mark !== SUBSECTION_MARK) r.fail(`subsection "${sub.vmsd_name}" expected (byte 0x05), found 0x${mark!.toString(16).padStart(2, '0')}`);
    const len = r.take(1, `${sub.vmsd_name} subsection name length`)[0]!;
    const name = Buffer.from(r.take(len, `${sub.vmsd_name} subsection name`)).toString('latin1');
    r.take(4, `${name} subsection version`);
    out[name] = readStruct(r, sub);
  }
  return out;
}

/**
 * The fields of one device section, read by its description. Throws
 * LM_ERR_DEVICE_STATE_MISMATCH when the data is too short, a subsection is missing, or bytes are
 * left over.
 */
export function decodeDeviceState(
  data: Uint8Array,
  device: VmdescDevice,
  where: { sectionId: number; idstr: string; dataOffset: number },
): StateObject {
  const r = new StateReader(data, where.dataOffset, where);
  const state = readStruct(r, device);
  if (r.pos !== data.length) r.fail(`${data.length - r.pos} bytes left after the described fields`);
  return state;
}

/**
 * Builds the `-d state` dump as sections arrive: the RAM section's block list, and each device
 * section that the VMDESCRIPTION describes (the n-th FULL/START section of a device gets its n-th
 * description). Sections with no description (livemig's own, VFIO) are left out.
 */
export class DeviceStateDump {
  readonly state: StateObject = {};
  private readonly queues = new Map<string, VmdescDevice[]>();

  constructor(desc: Vmdescription) {
    for (const d of desc.devices) {
      const key = `${d.name}\u0000${d.instance_id}`;
      let q = this.queues.get(key);
      if (q === undefined) this.queues.set(key, (q = []));
      q.push(d);
    }
  }

  ramBlocks(sectionId: number, idstr: string, blocks: readonly RamBlockInfo[]): void {
    const sizes: StateObject = {};
    for (const b of blocks) sizes[b.idstr] = `0x${b.length.toString(16).padStart(16, '0')}`;
    this.state[`${idstr} (${sectionId})`] = { 'section sizes': sizes };
  }

  /** A START or FULL device section's data. */
  deviceSection(s: { sectionId: number; idstr: string; instanceId: number; dataOffset: number }, data: Uint8Array): void {
    const device = this.queues.get(`${s.idstr}\u0000${s.instanceId}`)?.shift();
    if (device === undefined) return;
    this.state[`${s.idstr} (${s.sectionId})`] = decodeDeviceState(data, device, s);
  }
}
