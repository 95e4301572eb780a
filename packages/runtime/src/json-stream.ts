// Splitting a QMP byte stream into JSON values (wire-format.md §11.1). QMP frames nothing: a
// peer may send several objects on one line, one object across many reads, or none at all
// between newlines, so we scan for where each top-level value ends and only then parse it.
//
//   bytes  ...  {"execute":"a"}{"execute":"b","arguments":{"x":"}"}}\r\n{"exe | cute":"c"}
//               └─ value 1 ───┘└─ value 2 (braces inside strings ignored) ┘  └─ value 3, split ┘
//
// The scan is byte-wise: every structural character is ASCII, so multi-byte UTF-8 never matters
// until the finished value is decoded. Like QEMU's parser we also accept single-quoted strings.

import type { Duplex } from 'node:stream';

/** The longest message accepted by default: QEMU's own parser limit is in the same range. */
export const DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024;
// QEMU's json-parser gives up beyond this nesting (MAX_NESTING in json-streamer.c).
const MAX_DEPTH = 1024;

const LBRACE = 0x7b;
const RBRACE = 0x7d;
const LBRACKET = 0x5b;
const RBRACKET = 0x5d;
const DQUOTE = 0x22;
const SQUOTE = 0x27;
const BACKSLASH = 0x5c;

export interface JsonStreamHandlers {
  /** A complete, parsed top-level value (not necessarily an object). */
  value(value: unknown): void;
  /** A complete top-level value that did not parse: `desc` is QEMU-style "JSON parse error, …". */
  parseError(desc: string): void;
  /** A value too large or too deep: the stream cannot be resynchronised, stop reading it. */
  fatal(desc: string): void;
}

const Scan = {
  IDLE: 0,
  CONTAINER: 1,
  STRING: 2,
  BARE: 3,
  DEAD: 4,
} as const;
type ScanState = (typeof Scan)[keyof typeof Scan];

function isSpace(b: number): boolean {
  return b === 0x20 || b === 0x0a || b === 0x0d || b === 0x09;
}

// Characters that end a bare top-level token such as `42`, `true` or junk.
function endsBareToken(b: number): boolean {
  return isSpace(b) || b === LBRACE || b === LBRACKET || b === DQUOTE || b === SQUOTE;
}

/** Incremental splitter: push() chunks as they arrive; complete values go to the handlers. */
export class JsonStreamSplitter {
  readonly #handlers: JsonStreamHandlers;
  readonly #maxBytes: number;
  #state: ScanState = Scan.IDLE;
  #depth = 0;
  #quote = 0;
  #escaped = false;
  #sawSingleQuote = false;
  /** Bytes of the value in progress from earlier chunks. */
  #parts: Buffer[] = [];
  #partBytes = 0;

  constructor(handlers: JsonStreamHandlers, maxMessageBytes: number = DEFAULT_MAX_MESSAGE_BYTES) {
    this.#handlers = handlers;
    this.#maxBytes = maxMessageBytes;
  }

  /** True after fatal(): further input is ignored. */
  get dead(): boolean {
    return this.#state === Scan.DEAD;
  }

  push(chunk: Buffer): void {
    if (this.#state === Scan.DEAD) return;
    let start = this.#state === Scan.IDLE ? -1 : 0;
    for (let i = 0; i < chunk.length; i++) {
      const b = chunk[i] as number;
      switch (this.#state) {
        case Scan.IDLE:
          if (isSpace(b)) break;
          start = i;
          this.#sawSingleQuote = false;
          if (b === LBRACE || b === LBRACKET) {
            this.#state = Scan.CONTAINER;
            this.#depth = 1;
          } else if (b === DQUOTE || b === SQUOTE) {
            this.#state = Scan.STRING;
            this.#quote = b;
            this.#escaped = false;
            if (b === SQUOTE) this.#sawSingleQuote = true;
          } else {
            this.#state = Scan.BARE;
          }
          break;
        case Scan.BARE:
          if (endsBareToken(b)) {
            if (!this.#emit(chunk, start, i)) return;
            start = -1;
            i--; // this byte starts the next value (or is whitespace)
          }
          break;
        case Scan.STRING:
        case Scan.CONTAINER:
          if (this.#quote !== 0) {
            if (this.#escaped) this.#escaped = false;
            else if (b === BACKSLASH) this.#escaped = true;
            else if (b === this.#quote) {
              this.#quote = 0;
              if (this.#state === Scan.STRING) {
                if (!this.#emit(chunk, start, i + 1)) return;
                start = -1;
              }
            }
          } else if (b === DQUOTE || b === SQUOTE) {
            this.#quote = b;
            this.#escaped = false;
            if (b === SQUOTE) this.#sawSingleQuote = true;
          } else if (b === LBRACE || b === LBRACKET) {
            if (++this.#depth > MAX_DEPTH) {
              this.#die(`JSON parse error, nesting deeper than ${MAX_DEPTH}`);
              return;
            }
          } else if (b === RBRACE || b === RBRACKET) {
            if (--this.#depth === 0) {
              if (!this.#emit(chunk, start, i + 1)) return;
              start = -1;
            }
          }
          break;
      }
    }
    if (start >= 0 && this.#state !== Scan.IDLE) {
      const tail = chunk.subarray(start);
      this.#partBytes += tail.length;
      if (this.#partBytes > this.#maxBytes) {
        this.#die(`message exceeds ${this.#maxBytes} bytes`);
        return;
      }
      // Copy: the caller may reuse its chunk (static-buffer reads).
      this.#parts.push(Buffer.from(tail));
    }
  }

  /** Bytes of an unfinished value held right now. */
  get pendingBytes(): number {
    return this.#partBytes;
  }

  // Finish the value that ends at chunk[end). False when the stream died.
  #emit(chunk: Buffer, start: number, end: number): boolean {
    const size = this.#partBytes + (end - start);
    this.#state = Scan.IDLE;
    if (size > this.#maxBytes) {
      this.#die(`message exceeds ${this.#maxBytes} bytes`);
      return false;
    }
    let bytes: Buffer;
    if (this.#parts.length === 0) bytes = chunk.subarray(start, end);
    else {
      this.#parts.push(chunk.subarray(start, end));
      bytes = Buffer.concat(this.#parts, size);
    }
    this.#parts = [];
    this.#partBytes = 0;
    let text = bytes.toString('utf8');
    if (this.#sawSingleQuote) text = singleToDoubleQuotes(text);
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (err) {
      this.#handlers.parseError(`JSON parse error, ${(err as Error).message}`);
      return !this.dead; // a handler may have called stop()
    }
    this.#handlers.value(value);
    return !this.dead; // a handler may have called stop()
  }

  #die(desc: string): void {
    this.#state = Scan.DEAD;
    this.#parts = [];
    this.#partBytes = 0;
    this.#handlers.fatal(desc);
  }

  /** Stop accepting input (e.g. the connection is closing). */
  stop(): void {
    this.#state = Scan.DEAD;
    this.#parts = [];
    this.#partBytes = 0;
  }
}

// QEMU accepts 'single-quoted' strings; JSON.parse does not. Rewrite them as "double-quoted",
// escaping any " inside and unescaping \' (which QEMU allows in both kinds of string).
function singleToDoubleQuotes(text: string): string {
  let out = '';
  let quote = '';
  for (let i = 0; i < text.length; i++) {
    const c = text[i] as string;
    if (quote === '') {
      if (c === "'") {
        out += '"';
        quote = "'";
      } else {
        if (c === '"') quote = '"';
        out += c;
      }
      continue;
    }
    if (c === '\\') {
      const next = text[i + 1] ?? '';
      i++;
      out += next === "'" ? "'" : c + next;
    } else if (c === quote) {
      out += '"';
      quote = '';
    } else if (c === '"') {
      out += '\\"';
    } else {
      out += c;
    }
  }
  return out;
}

/**
 * One QMP output line: JSON, ASCII only (QEMU's output is ASCII; anything else as \uXXXX),
 * CRLF-terminated.
 */
export function encodeQmpLine(value: unknown): string {
  const json = JSON.stringify(value);
  return `${json.replace(/[\u007f-\uffff]/g, (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, '0')}`)}\r\n`;
}

/** How long a closing QMP peer may take to read what is left before its socket is destroyed. */
export const CLOSE_GRACE_MS = 1000;

/**
 * End a QMP connection: our side ends now, the socket is destroyed if the peer has not closed
 * within `graceMs`; resolves once it is closed.
 */
export function endGracefully(stream: Duplex, graceMs = CLOSE_GRACE_MS): Promise<void> {
  return new Promise<void>((resolve) => {
    if (stream.destroyed) {
      resolve();
      return;
    }
    const timer = setTimeout(() => stream.destroy(), graceMs);
    stream.once('close', () => {
      clearTimeout(timer);
      resolve();
    });
    stream.end();
  });
}
