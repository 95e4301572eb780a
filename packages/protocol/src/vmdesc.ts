// VMDESCRIPTION JSON (wire-format.md §10): the layout of every FULL device section, written
// once after the final EOF of a precopy stream.
//
//   u8 0x06 | be32 len | json[len]          json = { page_size, devices: [DEVICE…] }
//   DEVICE := { name, instance_id, vmsd_name, version, fields: [FIELD…], subsections?: [VMSD…] }
//   FIELD  := { name, type, size, array_len? | index?, struct? }
//
// A reader sizes a device section as the sum of its field sizes (× array_len) plus, per
// subsection, 1 + 1 + name length + 4 header bytes and the subsection's own contents.

import type { SectionKind } from './constants.ts';
import { ErrorCode, ProtocolError } from './errors.ts';

export interface VmdescField {
  name: string;
  type: string;
  size: number;
  array_len?: number;
  index?: number;
  struct?: VmdescVmsd;
  /** A "tmp" field (QEMU's VMSTATE_WITH_TMP) carries its vmsd inline. */
  vmsd_name?: string;
  version?: number;
  fields?: VmdescField[];
  subsections?: VmdescVmsd[];
}

export interface VmdescVmsd {
  vmsd_name: string;
  version: number;
  fields?: VmdescField[];
  subsections?: VmdescVmsd[];
}

export interface VmdescDevice extends Partial<VmdescVmsd> {
  name: string;
  instance_id: number;
  size?: number;
  fields?: VmdescField[];
}

export interface Vmdescription {
  page_size: number;
  devices: VmdescDevice[];
  configuration?: VmdescVmsd;
  /**
   * livemig's addition (readers ignore keys they do not know): devices whose every section's
   * data is a be32 length and that many bytes, iterative ones included, which QEMU's format
   * leaves undescribed.
   */
  livemig?: { prefixed?: { name: string; instance_id: number }[] };
}

/** Parse and shape-check a VMDESCRIPTION JSON text. */
export function parseVmdescription(json: string, streamOffset: number): Vmdescription {
  let value: unknown;
  try {
    value = JSON.parse(json);
  } catch (cause) {
    throw new ProtocolError(ErrorCode.BAD_VMDESCRIPTION, `VMDESCRIPTION is not valid JSON: ${(cause as Error).message}`, {
      streamOffset,
      cause,
    });
  }
  if (
    typeof value !== 'object' ||
    value === null ||
    typeof (value as Vmdescription).page_size !== 'number' ||
    !Array.isArray((value as Vmdescription).devices)
  ) {
    throw new ProtocolError(ErrorCode.BAD_VMDESCRIPTION, 'VMDESCRIPTION lacks "page_size" or "devices"', { streamOffset });
  }
  const desc = value as Vmdescription;
  for (const d of desc.devices) {
    if (typeof d !== 'object' || d === null || typeof d.name !== 'string' || typeof d.instance_id !== 'number') {
      throw new ProtocolError(ErrorCode.BAD_VMDESCRIPTION, 'VMDESCRIPTION device entry lacks "name" or "instance_id"', {
        streamOffset,
      });
    }
    deviceDataLength(d, streamOffset); // shape-checks fields and subsections
  }
  return desc;
}

function badShape(message: string, streamOffset: number | undefined): never {
  throw new ProtocolError(ErrorCode.BAD_VMDESCRIPTION, `VMDESCRIPTION ${message}`, streamOffset === undefined ? {} : { streamOffset });
}

const isCount = (v: unknown): v is number => Number.isSafeInteger(v) && (v as number) >= 0;

function fieldsSize(fields: readonly VmdescField[] | undefined, streamOffset: number | undefined): number {
  if (fields === undefined) return 0;
  if (!Array.isArray(fields)) badShape('"fields" is not an array', streamOffset);
  let n = 0;
  for (const f of fields) {
    if (typeof f !== 'object' || f === null || !isCount(f.size) || !isCount(f.array_len ?? 1)) {
      badShape(`field "${(f as VmdescField | null)?.name}" has no valid "size" or "array_len"`, streamOffset);
    }
    n += f.size * (f.array_len ?? 1);
  }
  return n;
}

function subsectionsSize(subs: readonly VmdescVmsd[] | undefined, streamOffset: number | undefined): number {
  if (subs === undefined) return 0;
  if (!Array.isArray(subs)) badShape('"subsections" is not an array', streamOffset);
  let n = 0;
  for (const s of subs) {
    if (typeof s !== 'object' || s === null || typeof s.vmsd_name !== 'string') badShape('subsection lacks "vmsd_name"', streamOffset);
    n += 1 + 1 + s.vmsd_name.length + 4 + fieldsSize(s.fields, streamOffset) + subsectionsSize(s.subsections, streamOffset);
  }
  return n;
}

/**
 * Bytes of section data (without header and footer) that a described device occupies. Throws
 * LM_ERR_BAD_VMDESCRIPTION (at `streamOffset`, if given) when sizes or nesting are malformed.
 */
export function deviceDataLength(device: VmdescDevice, streamOffset?: number): number {
  return fieldsSize(device.fields, streamOffset) + subsectionsSize(device.subsections, streamOffset);
}

/**
 * Per-section data lengths from a VMDESCRIPTION, handed out in stream order: the n-th FULL
 * section of (idstr, instance) gets the n-th description of that device.
 */
export class VmdescLayouts {
  private readonly queues = new Map<string, number[]>();
  private readonly prefixed = new Set<string>();

  constructor(desc: Vmdescription) {
    const extra = desc.livemig?.prefixed;
    if (Array.isArray(extra)) for (const d of extra) this.prefixed.add(`${d?.name}\u0000${d?.instance_id}`);
    for (const d of desc.devices) {
      const key = `${d.name}\u0000${d.instance_id}`;
      let q = this.queues.get(key);
      if (q === undefined) this.queues.set(key, (q = []));
      q.push(deviceDataLength(d));
    }
  }

  /**
   * Data length of the next section of this device: a FULL section's from its description,
   * 'be32-prefixed' for livemig's self-sized devices, undefined when not described. Only FULL
   * sections are described: given another `kind`, nothing is taken from the queue.
   */
  take(idstr: string, instanceId: number, kind?: SectionKind): number | 'be32-prefixed' | undefined {
    const key = `${idstr}\u0000${instanceId}`;
    if (this.prefixed.has(key)) return 'be32-prefixed';
    if (kind !== undefined && kind !== 'full') return undefined;
    return this.queues.get(key)?.shift();
  }
}

/**
 * Find the VMDESCRIPTION record at the end of a stream file, given its last bytes. The record
 * is `00 (EOF) 06 be32 len {json…}` and its length runs exactly to the end of the file, which
 * pins it down without guessing. Returns its stream offset and JSON text, or undefined.
 */
export function findVmdescription(tail: Uint8Array, tailStreamOffset: number): { offset: number; json: string } | undefined {
  const end = tail.length;
  for (let p = end - 6; p >= 1; p--) {
    if (tail[p] !== 0x06 || tail[p + 5] !== 0x7b /* { */ || tail[p - 1] !== 0x00) continue;
    const len = ((tail[p + 1]! << 24) >>> 0) + ((tail[p + 2]! << 16) | (tail[p + 3]! << 8) | tail[p + 4]!);
    if (p + 5 + len !== end) continue;
    return { offset: tailStreamOffset + p, json: Buffer.from(tail.buffer, tail.byteOffset + p + 5, len).toString('utf8') };
  }
  return undefined;
}

/** JSON in QEMU's compact style: ", " between members and ": " after keys, no newlines. */
export function toQemuJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(toQemuJson).join(', ')}]`;
  if (typeof value === 'object' && value !== null) {
    const parts: string[] = [];
    for (const [k, v] of Object.entries(value)) if (v !== undefined) parts.push(`${JSON.stringify(k)}: ${toQemuJson(v)}`);
    return `{${parts.join(', ')}}`;
  }
  return JSON.stringify(value);
}
