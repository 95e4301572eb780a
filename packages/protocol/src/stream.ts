// Stream framing encoders (wire-format.md §§2, 3, 10).
//
//   be32 magic "QEVM" | be32 version 3
//   u8 0x07 | be32 name_len | name | [u8 0x05 cstr "configuration/…" be32 ver fields]*
//   u8 0x01|0x04 | be32 section_id | cstr idstr | be32 instance_id | be32 version_id | data | footer
//   u8 0x02|0x03 | be32 section_id | data | footer
//   footer: u8 0x7e | be32 section_id
//   u8 0x00 (EOF) | u8 0x06 be32 len json (VMDESCRIPTION, only after the final EOF)

import { MigCmd, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION, RecordType, type SectionKind } from './constants.ts';
import { ErrorCode, MigrationError, ProtocolError } from './errors.ts';
import type { BatchWriter } from './writer.ts';

export const STREAM_HEADER_LENGTH = 8;
export const FOOTER_LENGTH = 5;

export interface ConfigurationInfo {
  machineType: string;
  /** configuration/capabilities: validated capabilities that are on (e.g. "x-ignore-shared"). */
  capabilities?: string[];
  /** configuration/uuid: 16 bytes, as a lowercase hex string with dashes. */
  uuid?: string;
  /** configuration/target-page-bits, when the target's page bits exceed its minimum. */
  targetPageBits?: number;
}

/**
 * The incoming port's handshake (issue 14): whether the first bytes of a connection are a stream
 * header, "QEVM" then version 3. `null`: not enough bytes to tell yet. A QEMU or livemig source
 * sends it at once, so anything else (silence included, see the destination's handshake
 * deadline) is not a source.
 */
export function checkStreamHeader(first: Uint8Array): 'valid' | ProtocolError | null {
  const b = Buffer.from(first.buffer, first.byteOffset, Math.min(first.byteLength, STREAM_HEADER_LENGTH));
  if (b.length >= 4 && b.readUInt32BE(0) !== QEMU_VM_FILE_MAGIC) {
    return new ProtocolError(ErrorCode.BAD_MAGIC, `not a QEMU migration stream: magic 0x${b.readUInt32BE(0).toString(16).padStart(8, '0')}, expected 0x5145564d ("QEVM")`, { streamOffset: 0 });
  }
  if (b.length < STREAM_HEADER_LENGTH) return null;
  const version = b.readUInt32BE(4);
  if (version !== QEMU_VM_FILE_VERSION) {
    return new ProtocolError(ErrorCode.UNSUPPORTED_VERSION, `stream version ${version} is not supported (only version 3)`, { streamOffset: 4 });
  }
  return 'valid';
}

/** Bytes checkRecoveryStart needs: the record type and the command number. */
export const RECOVERY_START_LENGTH = 3;

/**
 * The recovery port's handshake: whether a connection starts as a postcopy recovery channel.
 * It carries no stream header; a resuming source (QEMU 7.2 and livemig alike) first asks for
 * the destination's received bitmaps, so its first record is QEMU_VM_COMMAND RECV_BITMAP.
 * `null`: not enough bytes to tell yet.
 */
export function checkRecoveryStart(first: Uint8Array): 'valid' | ProtocolError | null {
  if (first.byteLength < 1) return null;
  if (first[0] !== RecordType.COMMAND) {
    return new ProtocolError(ErrorCode.UNKNOWN_RECORD_TYPE, `not a postcopy recovery channel: it starts with 0x${first[0]!.toString(16).padStart(2, '0')}, expected a RECV_BITMAP command (0x08)`, { streamOffset: 0 });
  }
  if (first.byteLength < RECOVERY_START_LENGTH) return null;
  const command = (first[1]! << 8) | first[2]!;
  if (command !== MigCmd.RECV_BITMAP) {
    return new ProtocolError(ErrorCode.UNEXPECTED_COMMAND, `not a postcopy recovery channel: its first command is ${command}, expected RECV_BITMAP (${MigCmd.RECV_BITMAP})`, { streamOffset: 1 });
  }
  return 'valid';
}

/**
 * A guest UUID as QEMU's -uuid takes it (8-4-4-4-12 hex digits), lowercased as the decoder
 * reports configuration/uuid; throws LM_ERR_INVALID_ARGUMENT for anything else.
 */
export function normalizeUuid(text: string): string {
  if (!/^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i.test(text)) {
    throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `"${text}" is not a UUID (xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx)`);
  }
  return text.toLowerCase();
}

export function writeStreamHeader(w: BatchWriter, version = QEMU_VM_FILE_VERSION): void {
  w.be32(QEMU_VM_FILE_MAGIC).be32(version);
}

export function writeConfiguration(w: BatchWriter, config: ConfigurationInfo): void {
  const name = Buffer.from(config.machineType, 'latin1');
  w.u8(RecordType.CONFIGURATION).be32(name.length).bytes(name);
  if (config.targetPageBits !== undefined) {
    w.u8(RecordType.SUBSECTION).cstr('configuration/target-page-bits').be32(1).be32(config.targetPageBits);
  }
  if (config.capabilities !== undefined && config.capabilities.length > 0) {
    w.u8(RecordType.SUBSECTION).cstr('configuration/capabilities').be32(1).be32(config.capabilities.length);
    for (const c of config.capabilities) w.cstr(c);
  }
  if (config.uuid !== undefined) {
    const bytes = Buffer.from(config.uuid.replaceAll('-', ''), 'hex');
    if (bytes.length !== 16) throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `uuid "${config.uuid}" is not 16 bytes`);
    w.u8(RecordType.SUBSECTION).cstr('configuration/uuid').be32(1).bytes(bytes);
  }
}

const SECTION_TYPE: Record<SectionKind, number> = {
  start: RecordType.SECTION_START,
  part: RecordType.SECTION_PART,
  end: RecordType.SECTION_END,
  full: RecordType.SECTION_FULL,
};

export interface SectionHeader {
  kind: SectionKind;
  sectionId: number;
  /** START/FULL only. */
  idstr?: string;
  instanceId?: number;
  versionId?: number;
}

export function writeSectionHeader(w: BatchWriter, h: SectionHeader): void {
  w.u8(SECTION_TYPE[h.kind]).be32(h.sectionId);
  if (h.kind === 'start' || h.kind === 'full') {
    if (h.idstr === undefined) throw new MigrationError(ErrorCode.INVALID_ARGUMENT, `${h.kind} section needs an idstr`);
    w.cstr(h.idstr).be32(h.instanceId ?? 0).be32(h.versionId ?? 1);
  }
}

/** `footers` false: the dialect has none (machine types before 2.4), nothing is written. */
export function writeSectionFooter(w: BatchWriter, sectionId: number, footers = true): void {
  if (footers) w.u8(RecordType.SECTION_FOOTER).be32(sectionId);
}

export function writeEof(w: BatchWriter): void {
  w.u8(RecordType.EOF);
}

/** VMDESCRIPTION: QEMU's compact JSON style (", " and ": "), no terminator. */
export function writeVmdescription(w: BatchWriter, json: string | Uint8Array): void {
  const bytes = typeof json === 'string' ? Buffer.from(json, 'utf8') : json;
  w.u8(RecordType.VMDESCRIPTION).be32(bytes.length).bytes(bytes);
}
