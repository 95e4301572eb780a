// Every error code has at least one case that produces it (style.md §3.4-3.5): from bytes through
// StreamDecoder, StreamAnalyzer or ReturnPathDecoder, from an encoder call (INVALID_ARGUMENT), or
// from a RamTarget that refuses the block list (CONFIG_MISMATCH). Each case checks the code, that
// the message names what was wrong, and the stream offset (err.streamOffset) where there is one.
// Byte cases run twice, pushed whole and one byte at a time, and must fail identically.
// Errors are matched by err.code, never by instanceof.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { deflateSync } from 'node:zlib';
import {
  BatchWriter,
  CancelledError,
  coded,
  ConfigError,
  decodeDeviceState,
  decodeRequestBatch,
  DestinationFailedError,
  type DestinationEvent,
  type DestinationState,
  destinationStep,
  initialDestinationState,
  KEEPALIVE_TIMEOUT_MS,
  LIVEMIG_HELLO_PING,
  TransportError,
  ErrorCode,
  type ErrorCodeValue,
  MigCmd,
  MULTIFD_FLAG_SYNC,
  MULTIFD_INIT_LENGTH,
  MULTIFD_PACKET_HEADER_LENGTH,
  MultifdReceiver,
  NEED_MORE,
  NEED_MORE_RP,
  parseVmdescription,
  RamFlag,
  RamRecordWriter,
  ReturnPathDecoder,
  type ReturnPathDecoderOptions,
  RpMsg,
  StreamAnalyzer,
  StateError,
  StreamDecoder,
  type StreamDecoderOptions,
  TransportError,
  writeCommand,
  writeMultifdInit,
  writeMultifdPacketHeader,
  writeConfiguration,
  writeEof,
  writeEos,
  writeMemSize,
  writePackaged,
  writePing,
  writePostcopyAdvise,
  writeRamDiscard,
  writeRpRecvBitmap,
  writeRpReqPages,
  writeSectionFooter,
  writeSectionHeader,
  writeStreamHeader,
  writeVmdescription,
} from '../src/index.ts';

// ---- harness ----------------------------------------------------------------------------------

interface Coded {
  code: string;
  message: string;
  streamOffset?: number;
  sectionId?: number;
  idstr?: string;
  block?: string;
  pageOffset?: number;
}

/** Where the bytes go. */
type Sink = 'decoder' | 'analyzer' | 'rp' | 'multifd';

interface Case {
  name: string;
  /** The message must match (it names what was wrong). */
  message: RegExp;
  /** Expected err.streamOffset (omit for encoder errors). */
  at?: number;
  /** Other fields of the error to check. */
  fields?: Partial<Pick<Coded, 'sectionId' | 'idstr' | 'block' | 'pageOffset'>>;
  /** Bytes to decode… */
  bytes?: Buffer;
  sink?: Sink;
  options?: StreamDecoderOptions;
  rpOptions?: ReturnPathDecoderOptions;
  /** …or a call that throws. */
  call?: () => unknown;
}

function run(c: Case, oneByteAtATime: boolean): Coded {
  try {
    if (c.call !== undefined) {
      c.call();
    } else {
      const b = c.bytes!;
      const chunks = oneByteAtATime ? Array.from(b, (_, i) => b.subarray(i, i + 1)) : [b];
      switch (c.sink ?? 'decoder') {
        case 'decoder': {
          const dec = new StreamDecoder(c.options);
          for (const ch of chunks) {
            dec.push(ch);
            while (dec.next() !== NEED_MORE);
          }
          dec.end();
          break;
        }
        case 'analyzer': {
          const a = new StreamAnalyzer();
          for (const ch of chunks) a.push(ch);
          a.end();
          break;
        }
        case 'multifd': {
          // One channel into a 64 KiB block "pc.ram", each chunk read into the buffer it offers.
          const recv = new MultifdReceiver((name) => (name === 'pc.ram' ? Buffer.alloc(65536) : undefined));
          for (const ch of chunks) {
            for (let at = 0; at < ch.length; ) {
              const dst = recv.nextBuffer();
              const n = Math.min(dst.length, ch.length - at);
              dst.set(ch.subarray(at, at + n));
              at += n;
              recv.advance(n);
            }
          }
          break;
        }
        case 'rp': {
          const dec = new ReturnPathDecoder(c.rpOptions);
          for (const ch of chunks) {
            dec.push(ch);
            while (dec.next() !== NEED_MORE_RP);
          }
          dec.end();
          break;
        }
      }
    }
  } catch (err) {
    assert.equal(typeof (err as Coded)?.code, 'string', `threw without a code: ${(err as Error)?.stack ?? String(err)}`);
    return err as Coded;
  }
  assert.fail(`${c.name}: nothing was thrown`);
}

/** Build bytes with a BatchWriter; `mark()` inside gives the current offset. */
function bytes(build: (w: BatchWriter, mark: () => number) => void): Buffer {
  const w = new BatchWriter();
  build(w, () => w.totalBytes);
  return w.flushConcat();
}

/** Build bytes and remember one offset. */
function withOffset(build: (w: BatchWriter, here: () => void) => void): { bytes: Buffer; at: number } {
  const w = new BatchWriter();
  let at = -1;
  build(w, () => {
    at = w.totalBytes;
  });
  return { bytes: w.flushConcat(), at };
}

const BLOCK = { idstr: 'm0', length: 0x10000 };

/**
 * A mapped-ram stream up to block m0's header: configuration with capability mapped-ram, RAM START,
 * MEM_SIZE (m0, 64 KiB), then MappedRamHeader(version, pageSize, offsets(headerEnd)); `at` = the header.
 */
function mappedRamStream(
  version: number,
  pageSize: number,
  offsets: (headerEnd: number) => { bitmap: number; pages: number } = (e) => ({ bitmap: e, pages: 0x100000 }),
): { bytes: Buffer; at: number } {
  return withOffset((w, here) => {
    writeStreamHeader(w);
    writeConfiguration(w, { machineType: 'none', capabilities: ['mapped-ram'] });
    writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
    w.be64(0x10000 + RamFlag.MEM_SIZE).cstr('m0').be64(0x10000);
    here();
    const { bitmap, pages } = offsets(w.totalBytes + 28);
    w.be32(version).be64(pageSize).be64(bitmap).be64(pages);
  });
}

/** Header, configuration "none", RAM START (MEM_SIZE: m0 of 64 KiB) with EOS and footer. */
function ramSetup(w: BatchWriter): void {
  writeStreamHeader(w);
  writeConfiguration(w, { machineType: 'none' });
  writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
  writeMemSize(w, [BLOCK]);
  writeEos(w);
  writeSectionFooter(w, 2);
}

/** ramSetup, then a RAM PART section whose records `body` writes, then EOS, footer and EOF. */
function ramPart(body: (w: BatchWriter, here: () => void) => void, setup: (w: BatchWriter) => void = ramSetup): { bytes: Buffer; at: number } {
  return withOffset((w, here) => {
    setup(w);
    writeSectionHeader(w, { kind: 'part', sectionId: 2 });
    body(w, here);
    writeEos(w);
    writeSectionFooter(w, 2);
    writeEof(w);
  });
}

/** A stream with one command (or other records) after the header, then EOF. */
function afterHeader(body: (w: BatchWriter, here: () => void) => void): { bytes: Buffer; at: number } {
  return withOffset((w, here) => {
    writeStreamHeader(w);
    body(w, here);
    writeEof(w);
  });
}

const rp = (hex: string): Buffer => Buffer.from(hex.replace(/[\s|]/g, ''), 'hex');

// ---- the table: every code → the cases that produce it ----------------------------------------

const CASES: Record<ErrorCodeValue, Case[]> = {
  LM_ERR_TRUNCATED: [
    { name: 'a stream of the header alone', bytes: bytes((w) => writeStreamHeader(w)), at: 8, message: /stream ended inside the configuration record \(0 bytes of it buffered\)/ },
    (() => {
      const s = afterHeader((w, here) => {
        here();
        writePing(w, 1);
      });
      return { name: 'a PING cut after 3 of its 9 bytes', bytes: s.bytes.subarray(0, s.at + 3), at: s.at, message: /stream ended inside a record \(no EOF seen\) \(3 bytes of it buffered\)/ };
    })(),
    (() => {
      const s = ramPart((w, here) => {
        here();
        new RamRecordWriter().page(w, 'm0', 0, Buffer.alloc(4096, 1), 0);
      });
      return { name: 'a RAM page cut in its data', bytes: s.bytes.subarray(0, s.at + 1000), at: s.at, message: /stream ended inside a RAM record of section 2 "ram"/, fields: { sectionId: 2, idstr: 'ram' } };
    })(),
    { name: 'a return-path message cut in its payload', sink: 'rp', bytes: rp('0002 0004 0000'), at: 0, message: /return path ended inside a message \(6 bytes left\)/ },
  ],
  LM_ERR_BAD_MAGIC: [{ name: 'magic "QEVX"', bytes: Buffer.from('5145565800000003', 'hex'), at: 0, message: /not a QEMU migration stream: magic 0x51455658, expected 0x5145564d/ }],
  LM_ERR_UNSUPPORTED_VERSION: [
    { name: 'version 2', bytes: bytes((w) => writeStreamHeader(w, 2)), at: 4, message: /stream version 2 .* is not supported/ },
    { name: 'version 4', bytes: bytes((w) => writeStreamHeader(w, 4)), at: 4, message: /stream version 4 is not supported \(only version 3\)/ },
  ],
  LM_ERR_BAD_CONFIGURATION: [
    { name: 'machine type name of 256 bytes', bytes: Buffer.from('5145564d00000003' + '07' + '00000100', 'hex'), at: 9, message: /machine type name of 256 bytes \(at most 255\)/ },
    (() => {
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeConfiguration(w, { machineType: 'none' });
        here();
        w.u8(0x05).cstr('configuration/foo').be32(1);
        writeEof(w);
      });
      return { name: 'unknown configuration subsection', ...s, message: /unknown configuration subsection "configuration\/foo"/ };
    })(),
    (() => {
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeConfiguration(w, { machineType: 'none' });
        w.u8(0x05).cstr('configuration/capabilities').be32(1);
        here();
        w.be32(1000);
      });
      return { name: '1000 capabilities', ...s, message: /configuration lists 1000 capabilities \(at most 64\)/ };
    })(),
  ],
  LM_ERR_UNKNOWN_RECORD_TYPE: [
    { name: 'type byte 0x09', bytes: Buffer.concat([bytes((w) => writeStreamHeader(w)), Buffer.from([0x09])]), at: 8, message: /unknown record type 0x09/ },
    { name: 'a stray section footer', bytes: Buffer.concat([bytes((w) => writeStreamHeader(w)), Buffer.from('7e00000000', 'hex')]), at: 8, message: /unknown record type 0x7e/ },
    { name: 'VMDESCRIPTION before the final EOF', bytes: bytes((w) => (writeStreamHeader(w), writeVmdescription(w, '{}'))), at: 8, message: /VMDESCRIPTION before the final EOF/ },
  ],
  LM_ERR_EMPTY_IDSTR: [
    { name: 'section START with an empty idstr', bytes: Buffer.from('5145564d00000003' + '01' + '00000002' + '00' + '00000000' + '00000004', 'hex'), at: 13, message: /section header with an empty idstr/ },
    (() => {
      const s = afterHeader((w, here) => {
        writePostcopyAdvise(w, { hostPageSizeSummary: 4096, targetPageSize: 4096 });
        here();
        w.u8(0x08).be16(MigCmd.POSTCOPY_RAM_DISCARD).be16(20).u8(0).u8(0).u8(0).be64(0).be64(4096).u8(0);
      });
      return { name: 'POSTCOPY_RAM_DISCARD naming no block', ...s, at: s.at + 6, message: /POSTCOPY_RAM_DISCARD names no block/ };
    })(),
    (() => {
      const s = memSizeStream((w) => w.be64(0x10000 + RamFlag.MEM_SIZE).u8(0));
      return { name: 'block list entry with an empty name', ...s, at: s.at + 8, message: /block list entry with an empty name/ };
    })(),
    { name: 'return-path REQ_PAGES_ID naming no block', sink: 'rp', bytes: rp('0003 000d 0000000000000000 00001000 00'), at: 0, message: /REQ_PAGES_ID names no block/ },
  ],
  LM_ERR_UNKNOWN_SECTION: [
    {
      name: 'PART for a section never opened',
      ...afterHeader((w, here) => {
        here();
        writeSectionHeader(w, { kind: 'part', sectionId: 9 });
      }),
      message: /PART section for unknown section id 9/,
    },
  ],
  LM_ERR_UNSUPPORTED_SECTION_VERSION: [
    (() => {
      const s = afterHeader((w, here) => {
        here();
        writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 3 });
      });
      return { name: '"ram" version 3', ...s, at: s.at + 13, message: /"ram" section version 3 \(only version 4 is supported\)/ };
    })(),
  ],
  LM_ERR_BAD_FOOTER: [
    (() => {
      const s = withOffset((w, here) => {
        ramSetup(w);
        writeSectionHeader(w, { kind: 'part', sectionId: 2 });
        writeEos(w);
        here();
        writeSectionFooter(w, 3);
      });
      return { name: 'footer naming another section', ...s, message: /section footer names section 3/, fields: { sectionId: 2, idstr: 'ram' } };
    })(),
    (() => {
      const s = withOffset((w, here) => {
        ramSetup(w);
        writeSectionHeader(w, { kind: 'part', sectionId: 2 });
        writeEos(w);
        here();
        w.u8(0x7f).be32(2);
      });
      return { name: 'footer mark 0x7f', ...s, message: /expected section footer 0x7e, found 0x7f/ };
    })(),
  ],
  LM_ERR_FOOTER_NOT_FOUND: [
    (() => {
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeSectionHeader(w, { kind: 'full', sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 });
        here();
        w.bytes(Buffer.alloc(300, 0x11));
      });
      return { name: 'no footer within maxSectionBytes', ...s, options: { maxSectionBytes: 256 }, message: /no footer for section 0 "timer" within 256 bytes of its data/, fields: { sectionId: 0, idstr: 'timer' } };
    })(),
    (() => {
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeSectionHeader(w, { kind: 'full', sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 });
        here();
        w.be64(0);
      });
      return { name: 'no layout and no footers', ...s, options: { expectFooters: false }, message: /section "timer" has no declared layout and the stream has no footers/ };
    })(),
  ],
  LM_ERR_UNKNOWN_COMMAND: [
    { name: 'command 0', ...afterHeader((w, here) => (here(), writeCommand(w, 0))), message: /unknown migration command 0/ },
    { name: 'command 11 (SWITCHOVER_START) to a 7.2 decoder', ...afterHeader((w, here) => (here(), writeCommand(w, MigCmd.SWITCHOVER_START))), message: /unknown migration command 11/ },
  ],
  LM_ERR_COMMAND_LENGTH: [
    { name: 'PING of 3 bytes', ...afterHeader((w, here) => (here(), writeCommand(w, MigCmd.PING, Buffer.alloc(3)))), message: /command PING has payload length 3/ },
    { name: 'POSTCOPY_ADVISE of 8 bytes', ...afterHeader((w, here) => (here(), writeCommand(w, MigCmd.POSTCOPY_ADVISE, Buffer.alloc(8)))), message: /command POSTCOPY_ADVISE has payload length 8/ },
    (() => {
      const s = afterHeader((w, here) => {
        here();
        w.u8(0x08).be16(MigCmd.RECV_BITMAP).be16(4).cstr('m0').u8(0);
      });
      return { name: 'RECV_BITMAP longer than its name', ...s, at: s.at + 5, message: /RECV_BITMAP payload length 4 is not 1 \+ name length 2/ };
    })(),
  ],
  LM_ERR_BAD_COMMAND_PAYLOAD: [
    (() => {
      const s = afterHeader((w, here) => {
        here();
        writePostcopyAdvise(w, { hostPageSizeSummary: 4096, targetPageSize: 8192 });
      });
      return { name: 'POSTCOPY_ADVISE with target page size 8192', ...s, at: s.at + 13, message: /POSTCOPY_ADVISE target page size 8192 differs from ours \(4096\)/ };
    })(),
    (() => {
      const s = afterHeader((w, here) => {
        writePostcopyAdvise(w, { hostPageSizeSummary: 4096, targetPageSize: 4096 });
        here();
        w.u8(0x08).be16(MigCmd.POSTCOPY_RAM_DISCARD).be16(21).u8(1).cstr('m0').u8(0).be64(0).be64(4096);
      });
      return { name: 'POSTCOPY_RAM_DISCARD version 1', ...s, at: s.at + 5, message: /POSTCOPY_RAM_DISCARD version 1 \(expected 0\)/ };
    })(),
    (() => {
      const s = afterHeader((w, here) => {
        writePostcopyAdvise(w, { hostPageSizeSummary: 4096, targetPageSize: 4096 });
        here();
        w.u8(0x08).be16(MigCmd.POSTCOPY_RAM_DISCARD).be16(21).u8(0).cstr('m0').u8(0).be64(100).be64(4096);
      });
      return { name: 'unaligned discard range', ...s, at: s.at + 10, message: /POSTCOPY_RAM_DISCARD range is not page aligned/, fields: { block: 'm0' } };
    })(),
  ],
  LM_ERR_UNEXPECTED_COMMAND: [
    { name: 'POSTCOPY_LISTEN without ADVISE', ...afterHeader((w, here) => (here(), writeCommand(w, MigCmd.POSTCOPY_LISTEN))), message: /POSTCOPY_LISTEN is not allowed in postcopy state NONE/ },
    (() => {
      const s = afterHeader((w, here) => {
        writePostcopyAdvise(w);
        here();
        writePostcopyAdvise(w);
      });
      return { name: 'a second POSTCOPY_ADVISE', ...s, message: /POSTCOPY_ADVISE is not allowed in postcopy state ADVISE/ };
    })(),
    (() => {
      const s = afterHeader((w, here) => {
        writePackaged(w, 10);
        here();
        writePackaged(w, 1);
        writeEof(w);
      });
      return { name: 'PACKAGED inside a PACKAGED blob', ...s, message: /PACKAGED inside a PACKAGED blob/ };
    })(),
  ],
  LM_ERR_PACKAGE_OVERRUN: [
    (() => {
      const s = afterHeader((w, here) => {
        writePackaged(w, 3);
        here();
        writePing(w, 1);
      });
      return { name: 'a PING running past a 3-byte blob', ...s, message: /record runs past the end of its PACKAGED blob \(blob ends at \d+\)/ };
    })(),
  ],
  LM_ERR_UNKNOWN_RAM_FLAG: [
    { name: 'flag FULL (0x001)', ...ramPart((w, here) => (here(), w.be64(RamFlag.FULL))), message: /RAM record flags 0x001 \(FULL\) are not a valid record type/, fields: { sectionId: 2, idstr: 'ram' } },
    { name: 'ZERO|PAGE together', ...ramPart((w, here) => (here(), w.be64(RamFlag.ZERO | RamFlag.PAGE))), message: /flags 0x00a \(ZERO\|PAGE\)/ },
    (() => {
      const s = ramPart(
        (w, here) => {
          here();
          w.be64(RamFlag.XBZRLE).cstr('m0').u8(1).be16(2).u8(0).u8(1);
        },
        (w) => {
          ramSetup(w);
          writePostcopyAdvise(w, { hostPageSizeSummary: 4096, targetPageSize: 4096 });
          writeCommand(w, MigCmd.POSTCOPY_LISTEN);
        },
      );
      return { name: 'XBZRLE once postcopy is listening', ...s, message: /flags 0x040 \(XBZRLE\) are not a valid record type once postcopy is listening/ };
    })(),
  ],
  LM_ERR_ILLEGAL_RAM_OFFSET: [
    {
      name: 'a page at the block length',
      ...ramPart((w, here) => (here(), new RamRecordWriter().page(w, 'm0', 0x10000, Buffer.alloc(4096), 0))),
      message: /RAM offset 0x10000 is outside block "m0" \(length 0x10000\)/,
      fields: { block: 'm0', pageOffset: 0x10000, sectionId: 2 },
    },
  ],
  LM_ERR_UNKNOWN_BLOCK: [
    { name: 'a record naming "nope"', ...ramPart((w, here) => (here(), new RamRecordWriter().zeroPage(w, 'nope', 0))), message: /RAM record names unknown block "nope"/, fields: { block: 'nope' } },
  ],
  LM_ERR_CONTINUE_WITHOUT_BLOCK: [
    { name: 'ZERO|CONTINUE as the first record', ...ramPart((w, here) => (here(), w.be64(RamFlag.ZERO | RamFlag.CONTINUE).u8(0))), message: /RAM record with CONTINUE before any block was named/ },
  ],
  LM_ERR_BAD_MAPPED_RAM: [
    (() => {
      const s = mappedRamStream(2, 0x1000);
      return { name: 'mapped-ram header version 2', ...s, message: /mapped-ram header version 2 \(livemig reads version 1\)/, fields: { block: 'm0' } };
    })(),
    (() => {
      const s = mappedRamStream(1, 0x1000, (headerEnd) => ({ bitmap: headerEnd, pages: headerEnd + 4 }));
      return { name: 'mapped-ram bitmap running into the pages', ...s, at: s.at + 12, message: /mapped-ram bitmap at file offset \d+ \(8 bytes\) does not lie between/, fields: { block: 'm0' } };
    })(),
  ],
  LM_ERR_BAD_MEM_SIZE: [
    (() => {
      const s = memSizeStream((w) => w.be64(0x10000 + RamFlag.MEM_SIZE).cstr('m0').be64(0x20000));
      return { name: 'a block longer than the total', ...s, at: s.at + 8, message: /block "m0" length 131072 exceeds the 65536 bytes the list has left/, fields: { block: 'm0' } };
    })(),
    (() => {
      const s = memSizeStream((w) => w.be64(0x10000 + RamFlag.MEM_SIZE).cstr('m0').be64(0x800));
      return { name: 'a misaligned block length', ...s, at: s.at + 8, message: /block "m0" length 0x800 is not page aligned/ };
    })(),
    (() => {
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
        w.be64(0x20000 + RamFlag.MEM_SIZE).cstr('m0').be64(0x10000);
        here();
        w.cstr('m0').be64(0x10000);
      });
      return { name: 'a block listed twice', ...s, message: /block "m0" listed twice/ };
    })(),
  ],
  LM_ERR_BAD_XBZRLE: [
    (() => {
      const s = ramPart((w, here) => (here(), w.be64(RamFlag.XBZRLE).cstr('m0').u8(2).be16(2).u8(0).u8(1)));
      return { name: 'encoding flag 0x02', ...s, at: s.at + 11, message: /XBZRLE encoding flag 0x2 \(expected 0x01\)/ };
    })(),
    (() => {
      const s = ramPart((w, here) => (here(), w.be64(RamFlag.XBZRLE).cstr('m0').u8(1).be16(4097)));
      return { name: 'enc_len 4097', ...s, at: s.at + 12, message: /XBZRLE length 4097 exceeds the page size/ };
    })(),
    (() => {
      // zrun 0, nzrun 0: a zero-length verbatim run.
      const s = ramPart((w, here) => (here(), w.be64(0x3000 + RamFlag.XBZRLE).cstr('m0').u8(1).be16(3).u8(0).u8(0).u8(0xaa)));
      return { name: 'a zero-length verbatim run', ...s, at: s.at + 14, message: /malformed XBZRLE page: zero-length run/, fields: { block: 'm0', pageOffset: 0x3000 } };
    })(),
    (() => {
      const s = ramPart((w, here) => (here(), w.be64(RamFlag.XBZRLE).cstr('m0').u8(1).be16(3).u8(0).u8(5).u8(0xaa)));
      return { name: 'a verbatim run past the input', ...s, at: s.at + 14, message: /malformed XBZRLE page: input overflow/ };
    })(),
  ],
  LM_ERR_BAD_COMPRESSED_PAGE: [
    (() => {
      const s = ramPart((w, here) => (here(), new RamRecordWriter().compressedPage(w, 'm0', 0x1000, Buffer.from('not zlib at all'))));
      return { name: 'data that is not zlib', ...s, at: s.at + 15, message: /compressed page does not inflate/, fields: { block: 'm0', pageOffset: 0x1000 } };
    })(),
    (() => {
      const s = ramPart((w, here) => (here(), new RamRecordWriter().compressedPage(w, 'm0', 0, deflateSync(Buffer.alloc(100, 7)))));
      return { name: 'zlib data of 100 bytes', ...s, at: s.at + 15, message: /compressed page inflates to 100 bytes, not a page/ };
    })(),
  ],
  LM_ERR_BAD_VFIO_FRAME: [
    (() => {
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeConfiguration(w, { machineType: 'none' });
        writeSectionHeader(w, { kind: 'start', sectionId: 3, idstr: '0000:00:04.0/vfio', instanceId: 0, versionId: 1 });
        w.be32(0xffffffff).be32(0xef100003);
        here();
        w.be32(0xffffffff).be32(0xef100004);
        writeSectionFooter(w, 3);
        writeEof(w);
      });
      return { name: 'a VFIO setup section whose SETUP is followed by DATA, not END_OF_STATE', ...s, message: /DEV_DATA_STATE where END_OF_STATE must close the setup or config/ };
    })(),
  ],
  LM_ERR_LIMIT_EXCEEDED: [
    (() => {
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeEof(w);
        here();
        w.u8(0x06).be32(0xffffffff);
      });
      return { name: 'VMDESCRIPTION of 0xffffffff bytes (before they arrive)', ...s, at: s.at + 1, message: /VMDESCRIPTION of 4294967295 bytes exceeds the 16777216-byte limit/ };
    })(),
    { name: 'a block list of 2 TiB', ...memSizeStream((w) => w.be64(2 ** 41 + RamFlag.MEM_SIZE)), options: {}, message: /block list announces 2199023255552 bytes of RAM \(limit 1099511627776\)/ },
    (() => {
      const s = ramPart((w, here) => (here(), w.be64(RamFlag.COMPRESS_PAGE).cstr('m0').be32(0xffffffff)));
      return { name: 'COMPRESS_PAGE of 0xffffffff bytes', ...s, at: s.at + 11, message: /compressed page of 4294967295 bytes \(at most 4110\)/ };
    })(),
    (() => {
      const s = afterHeader((w, here) => {
        writeSectionHeader(w, { kind: 'full', sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 });
        here();
      });
      return { name: 'a declared device length past maxSectionBytes', ...s, options: { deviceLayout: () => 2 ** 30 }, message: /device section data of 1073741824 bytes exceeds the 16777216-byte limit/, fields: { idstr: 'timer' } };
    })(),
    { name: 'a RECV_BITMAP of 2^40 bytes', sink: 'rp', bytes: rp('0005 0003 02 6d30 0000010000000000'), at: 7, message: /RECV_BITMAP for "m0" announces 1099511627776 bytes/, fields: { block: 'm0' } },
  ],
  LM_ERR_BAD_VMDESCRIPTION: [
    (() => {
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeEof(w);
        here();
        writeVmdescription(w, '{"page_size": 4096, "devices": [');
      });
      return { name: 'JSON that does not parse', sink: 'analyzer' as const, ...s, message: /VMDESCRIPTION is not valid JSON/ };
    })(),
    (() => {
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeEof(w);
        here();
        writeVmdescription(w, '{"devices": []}');
      });
      return { name: 'no page_size', sink: 'analyzer' as const, ...s, message: /VMDESCRIPTION lacks "page_size" or "devices"/ };
    })(),
    (() => {
      // A device field without "size" used to escape as a TypeError from the layout check.
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeSectionHeader(w, { kind: 'full', sectionId: 0, idstr: 'timer', instanceId: 0, versionId: 2 });
        w.be64(0);
        writeSectionFooter(w, 0);
        writeEof(w);
        here();
        writeVmdescription(w, '{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": [{"name": "ticks", "type": "int64"}]}]}');
      });
      return { name: 'a field without a size', sink: 'analyzer' as const, ...s, message: /VMDESCRIPTION field "ticks" has no valid "size"/ };
    })(),
    { name: 'parseVmdescription of a subsection without vmsd_name', call: () => parseVmdescription('{"page_size": 4096, "devices": [{"name": "d", "instance_id": 0, "subsections": [{}]}]}', 77), at: 77, message: /subsection lacks "vmsd_name"/ },
  ],
  LM_ERR_FOREIGN_DEVICE_LAYOUT: [
    (() => {
      const description = {
        vmsd_name: 'dev',
        version: 1,
        fields: [{ name: 'a', type: 'uint32', size: 4 }],
        subsections: [{ vmsd_name: 'dev/x', version: 1, fields: [{ name: 'b', type: 'uint8', size: 1 }] }],
      };
      // No footers (machine types before 2.4): nothing else can tell where the section ends.
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeSectionHeader(w, { kind: 'full', sectionId: 3, idstr: 'dev', instanceId: 0, versionId: 1 });
        w.be32(7);
        here();
        w.u8(0x05).u8(5).bytes(Buffer.from('dev/y', 'latin1')).be32(1).u8(0);
        writeEof(w);
      });
      return {
        name: 'a QEMU device section (no footers) with a subsection its recorded description lacks',
        ...s,
        options: { deviceLayout: () => ({ framing: 'vmsd' as const, description }), expectFooters: false },
        message: /device section "dev" at data offset 4: subsection "dev\/y" is not in the recorded description \(known: dev\/x\)/,
        fields: { sectionId: 3, idstr: 'dev' },
      };
    })(),
  ],
  LM_ERR_DEVICE_STATE_MISMATCH: [
    {
      name: 'decodeDeviceState of 2 bytes for a 4-byte field',
      call: () => decodeDeviceState(Buffer.from('0102', 'hex'), { name: 'd', instance_id: 0, fields: [{ name: 'x', type: 'uint32', size: 4 }] }, { sectionId: 7, idstr: 'd', dataOffset: 500 }),
      at: 500,
      message: /device section "d" does not match its VMDESCRIPTION: field "x" needs 4 bytes at data offset 0, only 2 left/,
      fields: { sectionId: 7, idstr: 'd' },
    },
    {
      name: 'decodeDeviceState of a subsection that is not there',
      call: () =>
        decodeDeviceState(Buffer.from('01ff', 'hex'), { name: 'd', instance_id: 0, fields: [{ name: 'x', type: 'uint8', size: 1 }], subsections: [{ vmsd_name: 'd/sub', version: 1, fields: [] }] }, { sectionId: 7, idstr: 'd', dataOffset: 500 }),
      at: 502,
      message: /subsection "d\/sub" expected \(byte 0x05\), found 0xff/,
    },
    {
      name: 'decodeDeviceState with bytes left over',
      call: () => decodeDeviceState(Buffer.from('010203', 'hex'), { name: 'd', instance_id: 0, fields: [{ name: 'x', type: 'uint8', size: 1 }] }, { sectionId: 7, idstr: 'd', dataOffset: 500 }),
      at: 501,
      message: /2 bytes left after the described fields/,
    },
  ],
  LM_ERR_TRAILING_DATA: [
    (() => {
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeEof(w);
        here();
        w.u8(0x01);
      });
      return { name: 'a byte after the final EOF that is not a VMDESCRIPTION', ...s, message: /byte 0x01 after the final EOF \(only a VMDESCRIPTION may follow\)/ };
    })(),
    (() => {
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeEof(w);
        writeVmdescription(w, '{}');
        here();
        w.u8(0).u8(0);
      });
      return { name: 'bytes after the VMDESCRIPTION', ...s, message: /byte 0x00 after the end of the stream/ };
    })(),
  ],
  LM_ERR_UNKNOWN_RP_MESSAGE: [
    { name: 'type 0 (INVALID)', sink: 'rp', bytes: rp('0000 0000'), at: 0, message: /unknown return-path message type 0/ },
    { name: 'type 7 (SWITCHOVER_ACK) to a 7.2 source', sink: 'rp', bytes: Buffer.concat([rp('0002 0004 00000001'), rp('0007 0000')]), at: 8, message: /unknown return-path message type 7/ },
  ],
  LM_ERR_RP_LENGTH: [
    { name: 'SHUT of 5 bytes', sink: 'rp', bytes: rp('0001 0005 0000000000'), at: 0, message: /return-path SHUT has length 5/ },
    { name: 'PONG of 600 bytes', sink: 'rp', bytes: rp('0002 0258'), at: 0, message: /return-path PONG has length 600/ },
    { name: 'REQ_PAGES_ID whose length disagrees with its name', sink: 'rp', bytes: rp('0003 0010 0000000000000000 00001000 02 6d30 00'), at: 0, message: /REQ_PAGES_ID length 16 is not 13 \+ name length 2/ },
  ],
  LM_ERR_BAD_RP_PAYLOAD: [
    { name: 'a page-request batch with width 8', call: () => decodeRequestBatch(Buffer.from([0x01, 8, 1, 0x6d, 0, 0, 0, 0]), () => {}), message: /malformed page-request batch \(8 bytes, width byte 8\)/ },
    { name: 'REQ_PAGES with no block named before', sink: 'rp', bytes: bytes((w) => writeRpReqPages(w, 0, 4096)), at: 0, message: /REQ_PAGES with no earlier REQ_PAGES_ID naming a block/ },
    { name: 'RESUME_ACK 2', sink: 'rp', bytes: rp('0006 0004 00000002'), at: 0, message: /RESUME_ACK value 2 \(expected 1\)/ },
    { name: 'an unaligned page request', sink: 'rp', bytes: bytes((w) => writeRpReqPages(w, 100, 4096, 'm0')), at: 0, message: /page request start 100 \/ length 4096 is not page aligned/, fields: { block: 'm0' } },
    (() => {
      const b = bytes((w) => writeRpRecvBitmap(w, 'm0', Buffer.alloc(8, 0xff)));
      b[b.length - 1]! ^= 1;
      return { name: 'a RECV_BITMAP without its end mark', sink: 'rp' as const, bytes: b, at: b.length - 8, message: /RECV_BITMAP for "m0" lacks its end mark/, fields: { block: 'm0' } };
    })(),
    { name: 'a RECV_BITMAP of another size than the source computed', sink: 'rp', bytes: bytes((w) => writeRpRecvBitmap(w, 'm0', Buffer.alloc(16))), rpOptions: { bitmapBytes: () => 8 }, at: 7, message: /RECV_BITMAP for "m0" announces 16 bytes \(expected 8\)/ },
  ],
  LM_ERR_CONFIG_MISMATCH: [
    (() => {
      const s = withOffset((w, here) => {
        writeStreamHeader(w);
        writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
        here();
        writeMemSize(w, [BLOCK]);
        writeEos(w);
      });
      return {
        name: 'a RamTarget refusing the block list',
        ...s,
        options: {
          ram: {
            attachBlocks: (blocks, streamOffset) => {
              throw new ConfigError(ErrorCode.CONFIG_MISMATCH, `block "${blocks[0]!.idstr}" is ${blocks[0]!.length} bytes in the stream but 32768 here`, {
                streamOffset,
                block: blocks[0]!.idstr,
              });
            },
          },
        },
        message: /block "m0" is 65536 bytes in the stream but 32768 here/,
        fields: { block: 'm0' },
      };
    })(),
  ],
  LM_ERR_BAD_MULTIFD: [
    { name: 'init packet with magic 0x11223345', sink: 'multifd', bytes: Buffer.concat([Buffer.from('11223345', 'hex'), Buffer.alloc(60)]), at: 0, message: /multifd init packet with magic 0x11223345 \(0x11223344 expected\)/ },
    { name: 'init packet version 2', sink: 'multifd', bytes: Buffer.concat([Buffer.from('1122334400000002', 'hex'), Buffer.alloc(56)]), at: 4, message: /multifd init packet version 2 \(1 expected\)/ },
    { name: 'packet with magic 0', sink: 'multifd', bytes: multifdStream((h) => h.writeUInt32BE(0, 0)), at: 64, message: /multifd channel 0: packet with magic 0x00000000/ },
    { name: 'packet version 3', sink: 'multifd', bytes: multifdStream((h) => h.writeUInt32BE(3, 4)), at: 68, message: /packet version 3 \(1 expected\)/ },
    { name: 'zlib-compressed packet', sink: 'multifd', bytes: multifdStream((h) => h.writeUInt32BE(0x2, 8)), at: 72, message: /compressed packet \(flags 0x2\); only multifd-compression "none" is supported/ },
    { name: '129 pages allocated', sink: 'multifd', bytes: multifdStream((h) => h.writeUInt32BE(129, 12)), at: 76, message: /packet with 129 pages allocated \(at most 128\)/ },
    { name: 'more pages used than allocated', sink: 'multifd', bytes: multifdStream((h) => h.writeUInt32BE(64, 12)), at: 80, message: /packet with 100 pages but 64 allocated/ },
    { name: 'a block this guest lacks', sink: 'multifd', bytes: multifdStream((h) => h.write('pc.rom\0', 64, 'latin1')), at: 128, message: /packet for unknown block "pc.rom"/, fields: { block: 'pc.rom' } },
    { name: 'a page offset past the block', sink: 'multifd', bytes: multifdStream((h) => h.writeUInt32BE(65536, 320 + 8 * 99 + 4)), at: 64 + 320 + 8 * 99, message: /page offset 0x10000 is not a page inside the block \(65536 bytes\)/, fields: { block: 'pc.ram' } },
    { name: 'an unaligned page offset', sink: 'multifd', bytes: multifdStream((h) => h.writeUInt32BE(100, 320 + 4)), at: 64 + 320, message: /page offset 0x64 is not a page inside the block/ },
  ],
  LM_ERR_INVALID_ARGUMENT: [
    { name: 'an empty counted string', call: () => new BatchWriter().cstr(''), message: /counted string "" must be 1–255 bytes long/ },
    { name: 'be64 of -1', call: () => new BatchWriter().be64(-1), message: /be64 value -1 is not a non-negative safe integer/ },
    { name: 'a 70000-byte command payload', call: () => writeCommand(new BatchWriter(), MigCmd.PING, Buffer.alloc(70000)), message: /command payload of 70000 bytes exceeds 65535/ },
    { name: 'an unaligned page offset', call: () => new RamRecordWriter().zeroPage(new BatchWriter(), 'm0', 100), message: /page offset 100 is not page aligned/ },
    { name: 'a 7-byte received bitmap', call: () => writeRpRecvBitmap(new BatchWriter(), 'm0', Buffer.alloc(7)), message: /received bitmap size must be a multiple of 8/ },
    { name: 'a discard for a block with an empty name', call: () => writeRamDiscard(new BatchWriter(), '', [{ start: 0, length: 4096 }]), message: /counted string "" must be 1–255 bytes long/ },
    {
      name: 'a batch recycled twice',
      call: () => {
        const w = new BatchWriter();
        const batch = w.u8(1).flush();
        w.recycle(batch);
        w.recycle(batch);
      },
      message: /already recycled/,
    },
  ],
  // The destination machine's own refusals and verdicts (destination-machine.test.ts has them all).
  LM_ERR_WRONG_STATE: [
    { name: 'a stream command before any connection', call: () => destinationStep(setupState(), { type: 'runReceived', streamOffset: 0 }, 0), message: /runReceived is not allowed while the migration is setup/ },
    { name: 'migrate-pause in precopy', call: () => destinationStep(activeState(), { type: 'pauseRequested' }, 0), message: /migrate-pause needs a postcopy migration \(status is active\)/ },
  ],
  LM_ERR_CHANNEL_LOST: [
    { name: 'the source ends the stream before EOF', call: () => machineVerdict(activeState(), { type: 'sourceEnded', streamOffset: 77 }), message: /the source ended the stream at offset 77 before EOF/ },
    { name: 'a stream error carries its errno', call: () => { throw TransportError.lost('main', 'migration connection failed', Object.assign(new Error('read ECONNRESET'), { code: 'ECONNRESET' })); }, message: /migration connection failed/, fields: {} },
  ],
  LM_ERR_PEER_SILENT: [
    { name: 'a livemig source silent past the keepalive timeout in postcopy', call: () => machineVerdict(postcopyState(), { type: 'keepaliveTicked', lastByteAtMs: 0 }, KEEPALIVE_TIMEOUT_MS + 1), message: /no data from the source for 3001 ms: link presumed broken/ },
  ],
  LM_ERR_CANCELLED: [{ name: 'the default message', call: () => { throw new CancelledError(); }, message: /^migration cancelled$/ }],
  LM_ERR_DESTINATION_FAILED: [
    { name: 'a SHUT with status 1', call: () => { throw new DestinationFailedError('destination failed: SHUT(1)', { shutStatus: 1 }); }, message: /destination failed/ },
  ],
  LM_ERR_INTERNAL: [{ name: 'coded() of an exception without a code', call: () => { throw coded(new TypeError('x is not a function')); }, message: /^internal error: x is not a function$/ }],
};

const MACHINE_CONFIG = { postcopyRam: true, preempt: true, multifd: false };
function setupState(): DestinationState {
  return destinationStep(initialDestinationState(MACHINE_CONFIG), { type: 'listenStarted' }, 0).state;
}
function activeState(): DestinationState {
  return destinationStep(setupState(), { type: 'connectionAccepted' }, 0).state;
}
function postcopyState(): DestinationState {
  let s = activeState();
  s = destinationStep(s, { type: 'returnPathOpened', streamOffset: 0 }, 0).state;
  s = destinationStep(s, { type: 'pingReceived', streamOffset: 0, value: LIVEMIG_HELLO_PING, livemigHello: true }, 0).state;
  s = destinationStep(s, { type: 'postcopyAdviseReceived', streamOffset: 0, postcopyRam: true }, 0).state;
  return destinationStep(s, { type: 'listenReceived', streamOffset: 0 }, 0).state;
}
/** The error the machine fails or pauses with after `event` (thrown, so the table's run() sees it). */
function machineVerdict(state: DestinationState, event: DestinationEvent, now = 0): never {
  const { state: next, actions } = destinationStep(state, event, now);
  if (next.status === 'failed') throw next.error;
  for (const a of actions) if (a.type === 'dropLink') throw a.reason;
  assert.fail(`${event.type} neither failed nor paused the migration`);
}

/** A multifd channel: init, then a 100-page packet header for "pc.ram" that `edit` spoils. */
function multifdStream(edit: (header: Buffer) => void): Buffer {
  const init = Buffer.alloc(MULTIFD_INIT_LENGTH);
  writeMultifdInit(init, { uuid: new Uint8Array(16), channelId: 0 });
  const h = Buffer.alloc(MULTIFD_PACKET_HEADER_LENGTH);
  const offsets = Array.from({ length: 100 }, (_, i) => (i % 16) * 4096);
  writeMultifdPacketHeader(h, { flags: MULTIFD_FLAG_SYNC, packetNum: 1, block: 'pc.ram' }, offsets, 100);
  edit(h);
  return Buffer.concat([init, h]);
}

/** Header, then a RAM START section whose MEM_SIZE record `body` writes (error at the record). */
function memSizeStream(body: (w: BatchWriter) => void): { bytes: Buffer; at: number } {
  return withOffset((w, here) => {
    writeStreamHeader(w);
    writeSectionHeader(w, { kind: 'start', sectionId: 2, idstr: 'ram', instanceId: 0, versionId: 4 });
    here();
    body(w);
    w.bytes(Buffer.alloc(32));
  });
}

// ---- tests ------------------------------------------------------------------------------------

describe('every error code is produced by a test', () => {
  it('the table has a case for every code in ErrorCode and nothing else', () => {
    const codes = Object.values(ErrorCode);
    const missing = codes.filter((c) => (CASES[c]?.length ?? 0) === 0);
    assert.deepEqual(missing, [], `codes without a producing case: ${missing.join(', ')}`);
    assert.deepEqual(Object.keys(CASES).sort(), [...codes].sort());
  });

  for (const code of Object.values(ErrorCode)) {
    describe(code, () => {
      for (const c of CASES[code] ?? []) {
        it(c.name, () => {
          const err = run(c, false);
          assert.equal(err.code, code, `got ${err.code}: ${err.message}`);
          assert.match(err.message, c.message);
          if (c.at !== undefined) {
            assert.equal(err.streamOffset, c.at, `streamOffset of: ${err.message}`);
            assert.match(err.message, new RegExp(`at stream offset ${c.at}\\b`));
          }
          for (const [k, v] of Object.entries(c.fields ?? {})) assert.equal(err[k as keyof Coded], v, `err.${k}`);
          if (c.bytes !== undefined) {
            // The same failure, at the same place, when the bytes arrive one at a time.
            const slow = run(c, true);
            assert.deepEqual([slow.code, slow.streamOffset, slow.message], [err.code, err.streamOffset, err.message]);
          }
        });
      }
    });
  }
});

describe('migration error classes', () => {
  it('StateError names the state and the event', () => {
    const e = new StateError('postcopy-active', 'migrate-start-postcopy');
    assert.deepEqual([e.code, e.name, e.state, e.event], ['LM_ERR_WRONG_STATE', 'StateError', 'postcopy-active', 'migrate-start-postcopy']);
    assert.deepEqual(JSON.parse(JSON.stringify(e)), { name: 'StateError', code: 'LM_ERR_WRONG_STATE', message: e.message, state: 'postcopy-active', event: 'migrate-start-postcopy' });
  });

  it('TransportError.lost takes errno from the cause, and has none for a plain close', () => {
    const reset = TransportError.lost('preempt', 'lost', Object.assign(new Error('write EPIPE'), { code: 'EPIPE' }));
    assert.deepEqual([reset.code, reset.channel, reset.errno], ['LM_ERR_CHANNEL_LOST', 'preempt', 'EPIPE']);
    assert.equal((reset.cause as Error).message, 'write EPIPE');
    assert.deepEqual(JSON.parse(JSON.stringify(reset)), { name: 'TransportError', code: 'LM_ERR_CHANNEL_LOST', message: 'lost', channel: 'preempt', errno: 'EPIPE' });
    const closed = TransportError.lost('multifd', 'closed');
    assert.equal(closed.errno, undefined);
    assert.equal('errno' in JSON.parse(JSON.stringify(closed)), false);
  });

  it("DestinationFailedError carries the destination's own code and offset", () => {
    const e = new DestinationFailedError('destination failed', { remoteCode: 'LM_ERR_CONFIG_MISMATCH', remoteOffset: 4242 });
    assert.deepEqual([e.code, e.remoteCode, e.remoteOffset, e.shutStatus], ['LM_ERR_DESTINATION_FAILED', 'LM_ERR_CONFIG_MISMATCH', 4242, undefined]);
    assert.deepEqual(JSON.parse(JSON.stringify(e)), { name: 'DestinationFailedError', code: 'LM_ERR_DESTINATION_FAILED', message: 'destination failed', remoteCode: 'LM_ERR_CONFIG_MISMATCH', remoteOffset: 4242 });
  });

  it('coded() keeps an error of ours and wraps anything else as LM_ERR_INTERNAL', () => {
    const ours = new CancelledError();
    assert.equal(coded(ours), ours);
    const foreign = Object.assign(new Error('boom'), { code: 'ENOENT' });
    const wrapped = coded(foreign);
    assert.deepEqual([wrapped.code, wrapped.name, (wrapped as Error).cause], ['LM_ERR_INTERNAL', 'InternalError', foreign]);
    assert.equal(coded('a string').message, 'internal error: a string');
  });
});

describe('coded errors', () => {
  it('a decoder that failed keeps failing with the same error (next, push and end)', () => {
    const dec = new StreamDecoder();
    dec.push(Buffer.from('5145565800000003', 'hex'));
    let first: unknown;
    try {
      dec.next();
    } catch (err) {
      first = err;
    }
    assert.equal((first as Coded).code, 'LM_ERR_BAD_MAGIC');
    assert.throws(() => dec.next(), (e) => e === first);
    assert.throws(() => dec.push(Buffer.alloc(1)), (e) => e === first);
    assert.throws(() => dec.end(), (e) => e === first);
  });

  it('a return-path decoder that failed keeps failing with the same error', () => {
    const dec = new ReturnPathDecoder();
    dec.push(rp('0000 0000'));
    let first: unknown;
    try {
      dec.next();
    } catch (err) {
      first = err;
    }
    assert.equal((first as Coded).code, 'LM_ERR_UNKNOWN_RP_MESSAGE');
    assert.throws(() => dec.next(), (e) => e === first);
    assert.throws(() => dec.end(), (e) => e === first);
  });

  it('codes, offsets and place fields are own enumerable properties and survive JSON', () => {
    const err = run(CASES.LM_ERR_ILLEGAL_RAM_OFFSET[0]!, false) as Coded & { toJSON(): unknown };
    assert.ok(Object.keys(err).includes('code'));
    assert.ok(Object.keys(err).includes('streamOffset'));
    const json = JSON.parse(JSON.stringify(err));
    assert.equal(json.code, 'LM_ERR_ILLEGAL_RAM_OFFSET');
    assert.equal(json.offset, CASES.LM_ERR_ILLEGAL_RAM_OFFSET[0]!.at);
    assert.equal(json.block, 'm0');
    assert.equal(json.pageOffset, 0x10000);
    assert.equal(json.sectionId, 2);
    assert.equal(json.idstr, 'ram');
  });

  it('every code is LM_ERR_ + its key, and no two keys share a code', () => {
    for (const [key, code] of Object.entries(ErrorCode)) assert.equal(code, `LM_ERR_${key}`);
    assert.equal(new Set(Object.values(ErrorCode)).size, Object.values(ErrorCode).length);
  });

  it('SWITCHOVER_ACK, refused from a 7.2 peer (LM_ERR_UNKNOWN_RP_MESSAGE), is accepted with maxType 8', () => {
    const dec = new ReturnPathDecoder({ maxType: RpMsg.SWITCHOVER_ACK + 1 });
    dec.push(rp('0007 0000'));
    assert.equal((dec.next() as { name: string }).name, 'SWITCHOVER_ACK');
  });
});
