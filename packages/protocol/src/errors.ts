// One error family with stable codes. Callers match on `err.code`, never on `instanceof`
// (the same class may be loaded twice: from src via tsx and from dist via the workspace link).
// Codes are never renamed or reused; docs/errors.md lists each with its meaning.

export const ErrorCode = {
  /** Input ended in the middle of a record. */
  TRUNCATED: 'LM_ERR_TRUNCATED',
  /** The stream does not start with "QEVM". */
  BAD_MAGIC: 'LM_ERR_BAD_MAGIC',
  /** Stream version other than 3 (version 2 included). */
  UNSUPPORTED_VERSION: 'LM_ERR_UNSUPPORTED_VERSION',
  /** Malformed configuration record or configuration subsection. */
  BAD_CONFIGURATION: 'LM_ERR_BAD_CONFIGURATION',
  /** A top-level type byte that is not a record type valid at that point. */
  UNKNOWN_RECORD_TYPE: 'LM_ERR_UNKNOWN_RECORD_TYPE',
  /** A counted string of length zero where a name is required. */
  EMPTY_IDSTR: 'LM_ERR_EMPTY_IDSTR',
  /** PART/END for a section id never opened by START/FULL. */
  UNKNOWN_SECTION: 'LM_ERR_UNKNOWN_SECTION',
  /** A section version this decoder cannot load (e.g. "ram" other than version 4). */
  UNSUPPORTED_SECTION_VERSION: 'LM_ERR_UNSUPPORTED_SECTION_VERSION',
  /** Section footer missing, or naming another section id. */
  BAD_FOOTER: 'LM_ERR_BAD_FOOTER',
  /** No section footer could be found for a device section whose layout is unknown. */
  FOOTER_NOT_FOUND: 'LM_ERR_FOOTER_NOT_FOUND',
  /** Command number 0, or above the highest known command. */
  UNKNOWN_COMMAND: 'LM_ERR_UNKNOWN_COMMAND',
  /** Command payload length that breaks the command's length rule. */
  COMMAND_LENGTH: 'LM_ERR_COMMAND_LENGTH',
  /** Command payload whose contents are invalid (discard version, terminator, ranges, page sizes). */
  BAD_COMMAND_PAYLOAD: 'LM_ERR_BAD_COMMAND_PAYLOAD',
  /** A command not allowed in the current postcopy state. */
  UNEXPECTED_COMMAND: 'LM_ERR_UNEXPECTED_COMMAND',
  /** A record overruns the PACKAGED blob it is inside. */
  PACKAGE_OVERRUN: 'LM_ERR_PACKAGE_OVERRUN',
  /** RAM record whose type flags are not exactly one known, allowed type. */
  UNKNOWN_RAM_FLAG: 'LM_ERR_UNKNOWN_RAM_FLAG',
  /** RAM page offset outside its block. */
  ILLEGAL_RAM_OFFSET: 'LM_ERR_ILLEGAL_RAM_OFFSET',
  /** RAM record naming a block that is not in the block list. */
  UNKNOWN_BLOCK: 'LM_ERR_UNKNOWN_BLOCK',
  /** CONTINUE flag with no block named before on this channel. */
  CONTINUE_WITHOUT_BLOCK: 'LM_ERR_CONTINUE_WITHOUT_BLOCK',
  /** MEM_SIZE block list whose lengths do not add up, or a block listed twice, or misaligned. */
  BAD_MEM_SIZE: 'LM_ERR_BAD_MEM_SIZE',
  BAD_MAPPED_RAM: 'LM_ERR_BAD_MAPPED_RAM',
  /** Malformed XBZRLE page (flag, length, run encoding or bounds). */
  BAD_XBZRLE: 'LM_ERR_BAD_XBZRLE',
  /** COMPRESS_PAGE record whose zlib data does not inflate to exactly one page. */
  BAD_COMPRESSED_PAGE: 'LM_ERR_BAD_COMPRESSED_PAGE',
  /** VFIO section data (QEMU's VFIO_MIG_FLAG_* framing) with an unknown marker, a missing END_OF_STATE, or bytes past it. */
  BAD_VFIO_FRAME: 'LM_ERR_BAD_VFIO_FRAME',
  /** A length read off the wire exceeds the configured limit. */
  LIMIT_EXCEEDED: 'LM_ERR_LIMIT_EXCEEDED',
  /** VMDESCRIPTION that is not valid JSON of the expected shape. */
  BAD_VMDESCRIPTION: 'LM_ERR_BAD_VMDESCRIPTION',
  /** A device section's data does not match its VMDESCRIPTION entry field by field. */
  DEVICE_STATE_MISMATCH: 'LM_ERR_DEVICE_STATE_MISMATCH',
  /** A QEMU device section that does not fit the layout recorded for its machine type (foreign-devices.ts). */
  FOREIGN_DEVICE_LAYOUT: 'LM_ERR_FOREIGN_DEVICE_LAYOUT',
  /** Bytes after the end of the stream (after EOF and VMDESCRIPTION). */
  TRAILING_DATA: 'LM_ERR_TRAILING_DATA',
  /** Return-path message type 0 or above the highest known type. */
  UNKNOWN_RP_MESSAGE: 'LM_ERR_UNKNOWN_RP_MESSAGE',
  /** Return-path message whose length breaks its rule (or exceeds 512 bytes). */
  RP_LENGTH: 'LM_ERR_RP_LENGTH',
  /** Return-path message with invalid contents (REQ_PAGES with no earlier block, bad bitmap, bad ack). */
  BAD_RP_PAYLOAD: 'LM_ERR_BAD_RP_PAYLOAD',
  /** The configuration of the two sides does not match (machine type, RAM block list). */
  CONFIG_MISMATCH: 'LM_ERR_CONFIG_MISMATCH',
  /** Malformed multifd init packet or packet (magic, version, page counts, block, offsets, compression). */
  BAD_MULTIFD: 'LM_ERR_BAD_MULTIFD',
  /** An invalid argument given to an encoder (a caller bug, not bad input). */
  INVALID_ARGUMENT: 'LM_ERR_INVALID_ARGUMENT',
  /** An event (QMP command, return-path message, stream command, channel event) not legal in the migration's current state. */
  WRONG_STATE: 'LM_ERR_WRONG_STATE',
  /** The migration was cancelled (migrate_cancel, or the process shutting down). */
  CANCELLED: 'LM_ERR_CANCELLED',
  /** A migration connection closed, was reset or failed while the migration needed it. */
  CHANNEL_LOST: 'LM_ERR_CHANNEL_LOST',
  /** The peer sent nothing for longer than the keepalive timeout: the link is presumed broken. */
  PEER_SILENT: 'LM_ERR_PEER_SILENT',
  /** The destination reported that it failed (SHUT with a non-zero status, or livemig's error message). */
  DESTINATION_FAILED: 'LM_ERR_DESTINATION_FAILED',
  /** An exception without a code reached the top of a migration: a bug in livemig, reported as such. */
  INTERNAL: 'LM_ERR_INTERNAL',
} as const;

export type ErrorCodeValue = (typeof ErrorCode)[keyof typeof ErrorCode];

export interface ErrorContext {
  /** Bytes since the start of the stream where the faulty record or field starts. */
  streamOffset?: number;
  sectionId?: number;
  idstr?: string;
  block?: string;
  pageOffset?: number;
  cause?: unknown;
}

export class MigrationError extends Error {
  readonly code: ErrorCodeValue;
  constructor(code: ErrorCodeValue, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.name = new.target.name;
  }

  toJSON(): Record<string, unknown> {
    return { name: this.name, code: this.code, message: this.message };
  }
}

/** Something wrong with the bytes: carries where it happened. */
export class ProtocolError extends MigrationError {
  readonly streamOffset: number | undefined;
  readonly sectionId: number | undefined;
  readonly idstr: string | undefined;
  readonly block: string | undefined;
  readonly pageOffset: number | undefined;

  constructor(code: ErrorCodeValue, message: string, context: ErrorContext = {}) {
    super(code, withPlace(message, context), { cause: context.cause });
    this.streamOffset = context.streamOffset;
    this.sectionId = context.sectionId;
    this.idstr = context.idstr;
    this.block = context.block;
    this.pageOffset = context.pageOffset;
  }

  override toJSON(): Record<string, unknown> {
    const out: Record<string, unknown> = { ...super.toJSON() };
    if (this.streamOffset !== undefined) out['offset'] = this.streamOffset;
    if (this.sectionId !== undefined) out['sectionId'] = this.sectionId;
    if (this.idstr !== undefined) out['idstr'] = this.idstr;
    if (this.block !== undefined) out['block'] = this.block;
    if (this.pageOffset !== undefined) out['pageOffset'] = this.pageOffset;
    return out;
  }
}

/** The two sides are configured differently (block list, machine type). */
export class ConfigError extends ProtocolError {}

/**
 * An event that the migration's state machine does not accept in its current state (a QMP
 * command, a return-path message or stream command, a channel event). `state` is QEMU's status
 * name, `event` the event's name.
 */
export class StateError extends MigrationError {
  readonly state: string;
  readonly event: string;
  constructor(state: string, event: string, message?: string) {
    super(ErrorCode.WRONG_STATE, message ?? `${event} is not allowed while the migration is ${state}`);
    this.state = state;
    this.event = event;
  }

  override toJSON(): Record<string, unknown> {
    return { ...super.toJSON(), state: this.state, event: this.event };
  }
}

/** The migration was cancelled. */
export class CancelledError extends MigrationError {
  constructor(message = 'migration cancelled') {
    super(ErrorCode.CANCELLED, message);
  }
}

/** Which migration connection a transport failure happened on. */
export type ChannelRole = 'main' | 'return-path' | 'preempt' | 'multifd';

/**
 * A migration connection failed: closed, reset, or silent past the keepalive timeout
 * (`LM_ERR_CHANNEL_LOST` or `LM_ERR_PEER_SILENT`). `errno` is the system error code (ECONNRESET,
 * EPIPE …) when there was one: callers test it, never the message.
 */
export class TransportError extends MigrationError {
  readonly channel: ChannelRole;
  readonly errno: string | undefined;
  constructor(code: 'LM_ERR_CHANNEL_LOST' | 'LM_ERR_PEER_SILENT', channel: ChannelRole, message: string, options: { errno?: string; cause?: unknown } = {}) {
    super(code, message, options.cause === undefined ? undefined : { cause: options.cause });
    this.channel = channel;
    this.errno = options.errno;
  }

  /** A closed or failed connection, from a stream's 'error' (with its errno) or 'close'. */
  static lost(channel: ChannelRole, message: string, cause?: unknown): TransportError {
    const errno = (cause as { code?: unknown } | undefined)?.code;
    return new TransportError(ErrorCode.CHANNEL_LOST, channel, message, typeof errno === 'string' ? { cause, errno } : { cause });
  }

  override toJSON(): Record<string, unknown> {
    const out = { ...super.toJSON(), channel: this.channel };
    return this.errno === undefined ? out : { ...out, errno: this.errno };
  }
}

/** The destination said it failed; `remoteCode` and `remoteOffset` are its own error's, when it sent them. */
export class DestinationFailedError extends MigrationError {
  readonly remoteCode: string | undefined;
  readonly remoteOffset: number | undefined;
  readonly shutStatus: number | undefined;
  constructor(message: string, detail: { remoteCode?: string; remoteOffset?: number; shutStatus?: number } = {}) {
    super(ErrorCode.DESTINATION_FAILED, message);
    this.remoteCode = detail.remoteCode;
    this.remoteOffset = detail.remoteOffset;
    this.shutStatus = detail.shutStatus;
  }

  override toJSON(): Record<string, unknown> {
    return withDefined(super.toJSON(), { remoteCode: this.remoteCode, remoteOffset: this.remoteOffset, shutStatus: this.shutStatus });
  }
}

/** `base` plus those of `fields` that are set. */
function withDefined(base: Record<string, unknown>, fields: Record<string, unknown>): Record<string, unknown> {
  const out = { ...base };
  for (const [k, v] of Object.entries(fields)) if (v !== undefined) out[k] = v;
  return out;
}

/** Wraps an exception that has no code of ours (a bug) so it is still reported with one. */
export class InternalError extends MigrationError {
  constructor(cause: unknown) {
    super(ErrorCode.INTERNAL, `internal error: ${(cause as Error | undefined)?.message ?? String(cause)}`, { cause });
  }
}

/** `err` itself when it carries one of our `LM_ERR_*` codes, else an InternalError wrapping it. */
export function coded(err: unknown): Error & { code: string } {
  const code = (err as { code?: unknown } | null)?.code;
  if (err instanceof Error && typeof code === 'string' && code.startsWith('LM_ERR_')) return err as Error & { code: string };
  return new InternalError(err);
}

function withPlace(message: string, context: ErrorContext): string {
  const where: string[] = [];
  if (context.streamOffset !== undefined) where.push(`at stream offset ${context.streamOffset}`);
  if (context.sectionId !== undefined) {
    where.push(
      context.idstr === undefined
        ? `in section ${context.sectionId}`
        : `in section ${context.sectionId} "${context.idstr}"`,
    );
  }
  if (context.block !== undefined) where.push(`block "${context.block}"`);
  if (context.pageOffset !== undefined) where.push(`page offset 0x${context.pageOffset.toString(16)}`);
  return where.length === 0 ? message : `${message} (${where.join(', ')})`;
}

/** True when `err` is one of ours with the given code (works across duplicate module copies). */
export function hasCode(err: unknown, code: ErrorCodeValue): boolean {
  return typeof err === 'object' && err !== null && (err as { code?: unknown }).code === code;
}
