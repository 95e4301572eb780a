// Wire constants of QEMU's migration stream, version 3 (wire-format.md §§2–6).
// Names keep QEMU's spelling so a grep of the spec or of QEMU finds them.

/** "QEVM" as a big-endian u32. */
export const QEMU_VM_FILE_MAGIC = 0x5145564d;
/** The only stream version we speak. */
export const QEMU_VM_FILE_VERSION = 3;
/** The obsolete v2 format, refused with its own message as QEMU does. */
export const QEMU_VM_FILE_VERSION_COMPAT = 2;

/** x86 target page size; every RAM offset and length is counted in these. */
export const TARGET_PAGE_SIZE = 4096;
export const TARGET_PAGE_BITS = 12;

/** Top-level record type bytes (wire-format.md §3). */
export const RecordType = {
  EOF: 0x00,
  SECTION_START: 0x01,
  SECTION_PART: 0x02,
  SECTION_END: 0x03,
  SECTION_FULL: 0x04,
  SUBSECTION: 0x05,
  VMDESCRIPTION: 0x06,
  CONFIGURATION: 0x07,
  COMMAND: 0x08,
  SECTION_FOOTER: 0x7e,
} as const;

export type SectionKind = 'start' | 'part' | 'end' | 'full';

/** RAM record flags, the low bits of each record's be64 word (wire-format.md §6.1). */
export const RamFlag = {
  FULL: 0x001,
  ZERO: 0x002,
  MEM_SIZE: 0x004,
  PAGE: 0x008,
  EOS: 0x010,
  CONTINUE: 0x020,
  XBZRLE: 0x040,
  HOOK: 0x080,
  COMPRESS_PAGE: 0x100,
  MULTIFD_FLUSH: 0x200,
} as const;

/** The RAM section's format version; "ram" sections of any other version are refused. */
export const RAM_SECTION_VERSION = 4;
/** The XBZRLE record's encoding-flag byte. */
export const ENCODING_FLAG_XBZRLE = 0x01;

/** Migration commands (type byte 0x08), wire-format.md §4. */
export const MigCmd = {
  INVALID: 0,
  OPEN_RETURN_PATH: 1,
  PING: 2,
  POSTCOPY_ADVISE: 3,
  POSTCOPY_LISTEN: 4,
  POSTCOPY_RUN: 5,
  POSTCOPY_RAM_DISCARD: 6,
  PACKAGED: 7,
  ENABLE_COLO: 8,
  POSTCOPY_RESUME: 9,
  RECV_BITMAP: 10,
  /** QEMU 10.0 only; a 7.2 peer rejects it, so it is decoded only when asked for. */
  SWITCHOVER_START: 11,
} as const;
export type MigCmdValue = (typeof MigCmd)[keyof typeof MigCmd];

/** First command number a QEMU 7.2 destination rejects. */
export const MIG_CMD_MAX_7_2 = 11;

export const MIG_CMD_NAMES: readonly string[] = [
  'INVALID',
  'OPEN_RETURN_PATH',
  'PING',
  'POSTCOPY_ADVISE',
  'POSTCOPY_LISTEN',
  'POSTCOPY_RUN',
  'POSTCOPY_RAM_DISCARD',
  'PACKAGED',
  'ENABLE_COLO',
  'POSTCOPY_RESUME',
  'RECV_BITMAP',
  'SWITCHOVER_START',
];

/** Return-path message types (destination → source), wire-format.md §5. */
export const RpMsg = {
  INVALID: 0,
  SHUT: 1,
  PONG: 2,
  REQ_PAGES_ID: 3,
  REQ_PAGES: 4,
  RECV_BITMAP: 5,
  RESUME_ACK: 6,
  SWITCHOVER_ACK: 7,
} as const;
export type RpMsgValue = (typeof RpMsg)[keyof typeof RpMsg];

export const RP_MSG_NAMES: readonly string[] = [
  'INVALID',
  'SHUT',
  'PONG',
  'REQ_PAGES_ID',
  'REQ_PAGES',
  'RECV_BITMAP',
  'RESUME_ACK',
  'SWITCHOVER_ACK',
];

/**
 * livemig's own return-path message type ("LM"), sent only to a source that announced itself
 * with LIVEMIG_HELLO_PING (a QEMU source would reject an unknown type). Payload: msgpack.
 */
export const RP_LIVEMIG_EXT = 0x4c4d;
/**
 * The PING value a livemig source sends after PING(1): a QEMU destination just echoes it in a
 * PONG, a livemig destination learns it may use RP_LIVEMIG_EXT and echoes it too.
 */
export const LIVEMIG_HELLO_PING = 0x4c4d4731;

/**
 * Postcopy keepalive (livemig): the source PINGs with values KEEPALIVE_PING_BASE + n every
 * KEEPALIVE_INTERVAL_MS; every PONG (or any return-path byte) proves the link. A QEMU
 * destination just answers them. Silence for KEEPALIVE_TIMEOUT_MS on either side means the link
 * is gone (TCP alone takes minutes to say so) and postcopy pauses.
 */
export const KEEPALIVE_PING_BASE = 0x4c4b0000;
export const KEEPALIVE_INTERVAL_MS = 500;
export const KEEPALIVE_TIMEOUT_MS = 3000;

/** A QEMU source rejects any return-path message longer than its 512-byte receive buffer. */
export const RP_MAX_PAYLOAD = 512;
/** The trailer after a RECV_BITMAP bitmap. */
export const RECV_BITMAP_END_MARK_HI = 0x01234567;
export const RECV_BITMAP_END_MARK_LO = 0x89abcdef;
/** The only RESUME_ACK value QEMU accepts. */
export const MIGRATION_RESUME_ACK_VALUE = 1;

/** Destination postcopy sub-states (wire-format.md §8.2, not visible in QMP). */
export const PostcopyState = {
  NONE: 0,
  ADVISE: 1,
  DISCARD: 2,
  LISTENING: 3,
  RUNNING: 4,
  END: 5,
} as const;
export type PostcopyStateValue = (typeof PostcopyState)[keyof typeof PostcopyState];

/** Longest counted string (u8 length). */
export const CSTR_MAX = 255;
