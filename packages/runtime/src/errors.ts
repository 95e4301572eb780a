// Error codes of the process glue. Same rules as @livemig/protocol's errors.ts: callers match on
// `err.code`, never on `instanceof` (a class may be loaded twice, from src via tsx and from dist);
// codes are never renamed or reused. Wire-level values (the QMP error class) live in their own
// field, `qmpClass`, never in `code`.

export const RuntimeErrorCode = {
  /** A migration or QMP address that does not parse (unknown transport, bad port, empty path …). */
  BAD_ADDRESS: 'LM_ERR_BAD_ADDRESS',
  /** A transport that cannot be used in that direction (listen on `exec:`, connect to `defer` …). */
  UNSUPPORTED_TRANSPORT: 'LM_ERR_UNSUPPORTED_TRANSPORT',
  /** Opening a channel failed: connect refused, bad fd, file not writable, listen failed. */
  CHANNEL_OPEN: 'LM_ERR_CHANNEL_OPEN',
  /** Connecting or accepting took longer than its time limit. */
  CHANNEL_TIMEOUT: 'LM_ERR_CHANNEL_TIMEOUT',
  /** A listener was closed before it accepted a connection. */
  CHANNEL_CLOSED: 'LM_ERR_CHANNEL_CLOSED',
  /** An `exec:` command could not be spawned, exited non-zero or was killed by a signal. */
  EXEC_FAILED: 'LM_ERR_EXEC_FAILED',
  /** A QMP command answered with an error reply (`qmpClass` and `desc` carry it). */
  QMP_ERROR_REPLY: 'LM_ERR_QMP_ERROR_REPLY',
  /** A QMP wait (greeting, reply, event) took longer than its time limit. */
  QMP_TIMEOUT: 'LM_ERR_QMP_TIMEOUT',
  /** The QMP connection closed while something was still waiting on it. */
  QMP_CLOSED: 'LM_ERR_QMP_CLOSED',
  /** The QMP peer broke the protocol (no greeting, unparsable output, oversized message). */
  QMP_PROTOCOL: 'LM_ERR_QMP_PROTOCOL',
  /** An `--object` / `object-add` that cannot be created: unknown type, missing or unknown property, duplicate id. */
  BAD_OBJECT: 'LM_ERR_BAD_OBJECT',
  /** TLS credentials that cannot be used: no object with the tls-creds id, wrong endpoint, unreadable files, no hostname to check. */
  TLS_CREDS: 'LM_ERR_TLS_CREDS',
  /** The TLS handshake failed: certificate not trusted or not for this host, PSK mismatch, peer closed. */
  TLS_HANDSHAKE: 'LM_ERR_TLS_HANDSHAKE',
  /** tls-creds is set here but the peer sent plaintext (a migration stream, not a TLS ClientHello). */
  TLS_PLAINTEXT_PEER: 'LM_ERR_TLS_PLAINTEXT_PEER',
  /** tls-creds is not set here but the peer started a TLS handshake. */
  TLS_UNEXPECTED: 'LM_ERR_TLS_UNEXPECTED',
  /** The client's certificate passed the handshake, but tls-authz does not allow its distinguished name. */
  TLS_AUTHZ_DENIED: 'LM_ERR_TLS_AUTHZ_DENIED',
  /** An invalid argument given to an API (a caller bug, not bad input). */
  INVALID_ARGUMENT: 'LM_ERR_INVALID_ARGUMENT',
} as const;

export type RuntimeErrorCodeValue = (typeof RuntimeErrorCode)[keyof typeof RuntimeErrorCode];

/** Base of every error this package throws on purpose. */
export class RuntimeError extends Error {
  readonly code: RuntimeErrorCodeValue;
  constructor(code: RuntimeErrorCodeValue, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.code = code;
    this.name = new.target.name;
  }

  toJSON(): Record<string, unknown> {
    return { name: this.name, code: this.code, message: this.message };
  }
}

/** A migration/QMP address that does not parse. `address` is the text as given. */
export class AddressError extends RuntimeError {
  override readonly code: 'LM_ERR_BAD_ADDRESS' = RuntimeErrorCode.BAD_ADDRESS;
  readonly address: string;
  constructor(address: string, message: string) {
    super(RuntimeErrorCode.BAD_ADDRESS, `bad address ${JSON.stringify(address)}: ${message}`);
    this.address = address;
  }

  override toJSON(): Record<string, unknown> {
    return { ...super.toJSON(), address: this.address };
  }
}

/** Opening, connecting or running a migration channel failed. */
export class ChannelError extends RuntimeError {}

/**
 * A QMP failure. For an error reply, `qmpClass` is QEMU's error class (`GenericError`,
 * `CommandNotFound`, …) and `desc` its text. A command handler may throw one (see
 * {@link QmpError.reply}) to answer with a class other than `GenericError`.
 */
export class QmpError extends RuntimeError {
  readonly qmpClass: string | undefined;
  readonly desc: string | undefined;
  constructor(
    code: RuntimeErrorCodeValue,
    message: string,
    options?: { qmpClass?: string; desc?: string; cause?: unknown },
  ) {
    super(code, message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.qmpClass = options?.qmpClass;
    this.desc = options?.desc;
  }

  /** An error that a QMP server sends back as `{"error": {"class": qmpClass, "desc": desc}}`. */
  static reply(qmpClass: string, desc: string): QmpError {
    return new QmpError(RuntimeErrorCode.QMP_ERROR_REPLY, `${qmpClass}: ${desc}`, { qmpClass, desc });
  }

  override toJSON(): Record<string, unknown> {
    const out = super.toJSON();
    if (this.qmpClass !== undefined) out['qmpClass'] = this.qmpClass;
    if (this.desc !== undefined) out['desc'] = this.desc;
    return out;
  }
}
