// TLS on migration connections, as QEMU does it: user-created objects (`--object` / QMP
// `object-add`) name the credentials and the authorization list; parameter tls-creds picks the
// credentials, tls-hostname the name the source checks in the server's certificate, tls-authz
// the list the destination checks the client's certificate against.
//
//   tls-creds-x509  dir=D endpoint=server|client verify-peer=on|off
//                   D/ca-cert.pem, D/server-cert.pem + server-key.pem (server),
//                   D/client-cert.pem + client-key.pem (client; optional when the server does not verify)
//   tls-creds-psk   dir=D endpoint=… username=U (client; default "qemu")   D/keys.psk: "user:hexkey" lines
//   authz-simple    identity=DN                 the one client distinguished name allowed
//   authz-list      policy=allow|deny rules=[{match, policy, format: exact|glob}]   (QMP / JSON --object)
//
// A TLS connection is authenticated (handshake, then the authorization check) before the caller
// sees a byte of it. Readers that take a socket's raw descriptor (worker threads, static-buffer
// reads) cannot see through TLS: with TLS on, bytes are pumped from the TLS socket instead
// (see pumpOnread).

import { X509Certificate } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { isIP } from 'node:net';
import type net from 'node:net';
import tls from 'node:tls';
import type { Duplex } from 'node:stream';
import { RuntimeError, RuntimeErrorCode } from './errors.ts';
import type { OnreadOptions } from './socket-handle.ts';

export type TlsEndpoint = 'server' | 'client';

export interface TlsCredsX509 {
  readonly kind: 'tls-creds-x509';
  readonly id: string;
  readonly dir: string;
  readonly endpoint: TlsEndpoint;
  readonly verifyPeer: boolean;
  readonly ca: Buffer;
  /** Our certificate and key: a client without them is anonymous (a verifying server refuses it). */
  readonly cert: Buffer | undefined;
  readonly key: Buffer | undefined;
}

export interface TlsCredsPsk {
  readonly kind: 'tls-creds-psk';
  readonly id: string;
  readonly dir: string;
  readonly endpoint: TlsEndpoint;
  /** The identity a client sends (QEMU's default "qemu"). */
  readonly username: string;
  /** keys.psk: identity → key. */
  readonly keys: ReadonlyMap<string, Buffer>;
}

export type TlsCreds = TlsCredsX509 | TlsCredsPsk;

export interface AuthzRule {
  match: string;
  policy: 'allow' | 'deny';
  format: 'exact' | 'glob';
}

export interface Authz {
  readonly kind: 'authz-simple' | 'authz-list';
  readonly id: string;
  /** Whether the client identified by this distinguished name may connect. */
  isAllowed(identity: string): boolean;
}

export type UserObject = TlsCreds | Authz;

/** QEMU's user-creatable object types livemig knows. */
export const OBJECT_TYPES = ['tls-creds-x509', 'tls-creds-psk', 'authz-simple', 'authz-list'] as const;

/** A TLS or object mistake of the user's (bad --object, unknown id, unreadable credentials). */
export class TlsError extends RuntimeError {}

const DEFAULT_PSK_USERNAME = 'qemu';
/**
 * GnuTLS offers these with QEMU's "+ECDHE-PSK:+DHE-PSK:+PSK"; OpenSSL leaves PSK suites out by
 * default. Forward-secret AEAD first (QEMU 7.2 and 10.0 pick ECDHE-PSK-CHACHA20-POLY1305 here).
 */
const PSK_CIPHERS = [
  'ECDHE-PSK-CHACHA20-POLY1305',
  'DHE-PSK-AES256-GCM-SHA384',
  'DHE-PSK-AES128-GCM-SHA256',
  'DHE-PSK-CHACHA20-POLY1305',
  'ECDHE-PSK-AES256-CBC-SHA384',
  'ECDHE-PSK-AES128-CBC-SHA256',
  'PSK-AES256-GCM-SHA384',
  'PSK-AES128-GCM-SHA256',
  'PSK-CHACHA20-POLY1305',
].join(':');

/** The objects of one process, by id (QEMU's /objects container). */
export class ObjectRegistry {
  readonly #objects = new Map<string, UserObject>();

  /** Create an object from QEMU's properties (`qom-type`, `id`, the rest); throws TlsError. */
  add(props: Record<string, unknown>): UserObject {
    const type = props['qom-type'];
    const id = props['id'];
    if (typeof type !== 'string') throw objectError("Parameter 'qom-type' is missing");
    if (typeof id !== 'string' || id === '') throw objectError("Parameter 'id' is missing");
    if (!/^[A-Za-z][A-Za-z0-9_.-]*$/.test(id)) throw objectError(`Parameter 'id' expects an identifier`);
    if (this.#objects.has(id)) throw objectError(`attempt to add duplicate property '${id}' to object (type 'container')`);
    const object = createObject(type, id, props);
    this.#objects.set(id, object);
    return object;
  }

  /** object-del. */
  delete(id: string): void {
    if (!this.#objects.delete(id)) throw objectError(`object '${id}' not found`);
  }

  get(id: string): UserObject | undefined {
    return this.#objects.get(id);
  }

  /**
   * The credentials tls-creds names, checked as QEMU checks them when a migration starts
   * (`endpoint` is the side this process plays). Undefined when tls-creds is empty (no TLS).
   */
  creds(id: string, endpoint: TlsEndpoint): TlsCreds | undefined {
    if (id === '') return undefined;
    const o = this.#objects.get(id);
    if (o === undefined) throw new TlsError(RuntimeErrorCode.TLS_CREDS, `No TLS credentials with id '${id}'`);
    if (o.kind !== 'tls-creds-x509' && o.kind !== 'tls-creds-psk') throw new TlsError(RuntimeErrorCode.TLS_CREDS, `Object with id '${id}' is not TLS credentials`);
    if (o.endpoint !== endpoint) throw new TlsError(RuntimeErrorCode.TLS_CREDS, `Expected TLS credentials for a ${endpoint} endpoint`);
    return o;
  }

  /** The authorization object tls-authz names; undefined when tls-authz is empty. */
  authz(id: string): Authz | undefined {
    if (id === '') return undefined;
    const o = this.#objects.get(id);
    if (o === undefined || (o.kind !== 'authz-simple' && o.kind !== 'authz-list')) {
      throw new TlsError(RuntimeErrorCode.TLS_CREDS, `No authorization object with id '${id}'`);
    }
    return o as Authz;
  }
}

function objectError(message: string): TlsError {
  return new TlsError(RuntimeErrorCode.BAD_OBJECT, message);
}

/**
 * Parse one `--object` value as QEMU does: `TYPE,id=ID,key=value,…` (a comma inside a value is
 * doubled: `,,`) or a JSON object `{"qom-type": …, "id": …, …}`.
 */
export function parseObjectOption(text: string): Record<string, unknown> {
  if (text.trimStart().startsWith('{')) {
    let parsed: unknown;
    try {
      parsed = JSON.parse(text);
    } catch (err) {
      throw objectError(`--object ${text}: not valid JSON (${(err as Error).message})`);
    }
    if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) throw objectError(`--object ${text}: expected a JSON object`);
    return parsed as Record<string, unknown>;
  }
  const parts: string[] = [];
  let current = '';
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (ch === ',') {
      if (text[i + 1] === ',') {
        current += ',';
        i++;
        continue;
      }
      parts.push(current);
      current = '';
    } else current += ch;
  }
  parts.push(current);
  const [type, ...rest] = parts;
  if (type === undefined || type === '' || type.includes('=')) throw objectError(`--object ${text}: expected TYPE,id=ID,… (e.g. tls-creds-x509,id=tls0,dir=/etc/pki/qemu,endpoint=server)`);
  const props: Record<string, unknown> = { 'qom-type': type };
  for (const part of rest) {
    const eq = part.indexOf('=');
    if (eq <= 0) throw objectError(`--object ${text}: "${part}" is not KEY=VALUE`);
    props[part.slice(0, eq)] = part.slice(eq + 1);
  }
  return props;
}

function createObject(type: string, id: string, props: Record<string, unknown>): UserObject {
  const known = new Set(['qom-type', 'id']);
  const take = (name: string): unknown => {
    known.add(name);
    return props[name];
  };
  const str = (name: string, fallback?: string): string => {
    const v = take(name);
    if (v === undefined) {
      if (fallback !== undefined) return fallback;
      throw objectError(`${type} '${id}': Parameter '${name}' is missing`);
    }
    if (typeof v !== 'string') throw objectError(`${type} '${id}': Invalid parameter type for '${name}', expected: string`);
    return v;
  };
  const bool = (name: string, fallback: boolean): boolean => {
    const v = take(name);
    if (v === undefined) return fallback;
    if (typeof v === 'boolean') return v;
    if (v === 'on' || v === 'yes' || v === 'true') return true;
    if (v === 'off' || v === 'no' || v === 'false') return false;
    throw objectError(`${type} '${id}': Parameter '${name}' expects 'on' or 'off'`);
  };
  const endpoint = (): TlsEndpoint => {
    const v = str('endpoint', 'client');
    if (v !== 'server' && v !== 'client') throw objectError(`${type} '${id}': Parameter 'endpoint' does not accept value '${v}'`);
    return v;
  };
  let object: UserObject;
  switch (type) {
    case 'tls-creds-x509': {
      const dir = str('dir');
      const ep = endpoint();
      const verifyPeer = bool('verify-peer', true);
      take('sanity-check');
      take('priority');
      const ca = readCredential(type, id, dir, 'ca-cert.pem', true) as Buffer;
      const cert = readCredential(type, id, dir, `${ep}-cert.pem`, ep === 'server');
      const key = readCredential(type, id, dir, `${ep}-key.pem`, ep === 'server');
      if ((cert === undefined) !== (key === undefined)) {
        throw new TlsError(RuntimeErrorCode.TLS_CREDS, `${type} '${id}': ${dir}/${ep}-cert.pem and ${ep}-key.pem go together (one of them is missing)`);
      }
      object = { kind: type, id, dir, endpoint: ep, verifyPeer, ca, cert, key };
      break;
    }
    case 'tls-creds-psk': {
      const dir = str('dir');
      const ep = endpoint();
      const username = str('username', DEFAULT_PSK_USERNAME);
      take('priority');
      take('verify-peer');
      const path = `${dir}/keys.psk`;
      const text = (readCredential(type, id, dir, 'keys.psk', true) as Buffer).toString('utf8');
      const keys = new Map<string, Buffer>();
      for (const [n, raw] of text.split('\n').entries()) {
        const line = raw.trim();
        if (line === '') continue;
        const colon = line.indexOf(':');
        const hex = line.slice(colon + 1);
        if (colon <= 0 || !/^([0-9a-fA-F]{2})+$/.test(hex)) throw new TlsError(RuntimeErrorCode.TLS_CREDS, `${type} '${id}': ${path} line ${n + 1} is not USERNAME:HEXKEY`);
        keys.set(line.slice(0, colon), Buffer.from(hex, 'hex'));
      }
      if (ep === 'client' && !keys.has(username)) throw new TlsError(RuntimeErrorCode.TLS_CREDS, `Username ${username} not found in PSK file ${path}`);
      object = { kind: type, id, dir, endpoint: ep, username, keys };
      break;
    }
    case 'authz-simple': {
      const identity = str('identity');
      object = { kind: type, id, isAllowed: (dn) => dn === identity };
      break;
    }
    case 'authz-list': {
      const policy = policyOf(type, id, take('policy') ?? 'deny');
      const rulesValue = take('rules') ?? [];
      if (!Array.isArray(rulesValue)) throw objectError(`${type} '${id}': Parameter 'rules' expects a list`);
      const rules: AuthzRule[] = rulesValue.map((r: unknown, i) => {
        const rule = (r ?? {}) as Record<string, unknown>;
        if (typeof rule['match'] !== 'string') throw objectError(`${type} '${id}': rules[${i}] has no 'match'`);
        const format = rule['format'] ?? 'exact';
        if (format !== 'exact' && format !== 'glob') throw objectError(`${type} '${id}': rules[${i}]: 'format' is exact or glob`);
        return { match: rule['match'], policy: policyOf(type, id, rule['policy'] ?? 'deny'), format };
      });
      object = {
        kind: type,
        id,
        isAllowed: (dn) => {
          for (const rule of rules) {
            if (rule.format === 'exact' ? dn === rule.match : globMatches(rule.match, dn)) return rule.policy === 'allow';
          }
          return policy === 'allow';
        },
      };
      break;
    }
    default:
      throw objectError(`Invalid parameter type for 'qom-type', expected one of ${OBJECT_TYPES.join(', ')} (got '${type}')`);
  }
  for (const name of Object.keys(props)) {
    if (!known.has(name)) throw objectError(`${type} '${id}': Property '${type}.${name}' not found`);
  }
  return object;
}

function policyOf(type: string, id: string, v: unknown): 'allow' | 'deny' {
  if (v !== 'allow' && v !== 'deny') throw objectError(`${type} '${id}': a policy is 'allow' or 'deny', not ${JSON.stringify(v)}`);
  return v;
}

/** fnmatch(3) without flags: `*`, `?` and `[…]`. */
function globMatches(pattern: string, text: string): boolean {
  let re = '';
  for (let i = 0; i < pattern.length; i++) {
    const ch = pattern[i] as string;
    if (ch === '*') re += '.*';
    else if (ch === '?') re += '.';
    else if (ch === '[') {
      const close = pattern.indexOf(']', i + 2);
      if (close < 0) re += '\\[';
      else {
        const body = pattern.slice(i + 1, close).replace(/^!/, '^').replace(/\\/g, '\\\\');
        re += `[${body}]`;
        i = close;
      }
    } else re += ch.replace(/[.+^${}()|\\/]/g, '\\$&');
  }
  return new RegExp(`^${re}$`, 's').test(text);
}

function readCredential(type: string, id: string, dir: string, name: string, required: boolean): Buffer | undefined {
  const path = `${dir}/${name}`;
  try {
    return readFileSync(path);
  } catch (err) {
    if (!required && (err as NodeJS.ErrnoException).code === 'ENOENT') return undefined;
    throw new TlsError(RuntimeErrorCode.TLS_CREDS, `${type} '${id}': Unable to access credentials ${path}: ${(err as NodeJS.ErrnoException).code === 'ENOENT' ? 'No such file or directory' : (err as Error).message}`, { cause: err });
  }
}

/** What the client side of a TLS connection needs: the credentials and the name to check. */
export interface TlsClientOptions {
  creds: TlsCreds;
  /** tls-hostname, or the host of the migration URI. Required for x509 unless verify-peer is off. */
  hostname: string | undefined;
}

export interface TlsServerOptions {
  creds: TlsCreds;
  authz: Authz | undefined;
}

/**
 * Run the client side of the handshake over a connected socket; resolves with the TLS socket
 * once the server is authenticated (x509: its certificate chains to ca-cert.pem and names the
 * host; PSK: it knew our key). Rejects with LM_ERR_TLS_HANDSHAKE, or LM_ERR_CHANNEL_TIMEOUT.
 */
export function secureClientSide(socket: net.Socket, options: TlsClientOptions, where: string, timeoutMs: number): Promise<tls.TLSSocket> {
  const { creds, hostname } = options;
  let connectOptions: tls.ConnectionOptions;
  if (creds.kind === 'tls-creds-x509') {
    if (creds.verifyPeer && (hostname === undefined || hostname === '')) {
      socket.destroy();
      return Promise.reject(new TlsError(RuntimeErrorCode.TLS_CREDS, `${where}: No hostname available for TLS (set parameter tls-hostname: the name in the destination's certificate)`));
    }
    connectOptions = {
      socket,
      ca: creds.ca,
      ...(creds.cert === undefined ? {} : { cert: creds.cert, key: creds.key }),
      rejectUnauthorized: creds.verifyPeer,
      ...(hostname !== undefined && hostname !== '' && isIP(hostname) === 0 ? { servername: hostname } : {}),
      checkServerIdentity: (_host, cert) => (creds.verifyPeer ? tls.checkServerIdentity(hostname ?? '', cert) : undefined),
    };
  } else {
    const key = creds.keys.get(creds.username) as Buffer;
    connectOptions = {
      socket,
      ciphers: PSK_CIPHERS,
      // Node's pskCallback speaks TLS 1.2 PSK only.
      maxVersion: 'TLSv1.2',
      pskCallback: () => ({ psk: key, identity: creds.username }),
      checkServerIdentity: () => undefined,
    };
  }
  return new Promise((resolve, reject) => {
    const secured = tls.connect(connectOptions);
    const timer = setTimeout(() => fail(new TlsError(RuntimeErrorCode.CHANNEL_TIMEOUT, `${where}: TLS handshake timed out after ${timeoutMs} ms`)), timeoutMs);
    const fail = (err: Error): void => {
      clearTimeout(timer);
      secured.off('secureConnect', onSecure);
      secured.destroy();
      reject(err);
    };
    const onSecure = (): void => {
      clearTimeout(timer);
      secured.off('error', onError).off('close', onClose);
      resolve(secured);
    };
    const onError = (err: Error): void => fail(handshakeError(where, err, 'client'));
    const onClose = (): void => fail(new TlsError(RuntimeErrorCode.TLS_HANDSHAKE, `${where}: the peer closed the connection during the TLS handshake (is it set with the same tls-creds kind, and does it accept this client?)`));
    secured.once('secureConnect', onSecure).once('error', onError).once('close', onClose);
  });
}

/**
 * Run the server side of the handshake over an accepted socket and check the client against
 * `authz`. Resolves with the TLS socket only once both passed; rejects with
 * LM_ERR_TLS_HANDSHAKE, LM_ERR_TLS_PLAINTEXT_PEER or LM_ERR_TLS_AUTHZ_DENIED. The caller bounds
 * the wait (destroy the socket to give up).
 */
export function secureServerSide(socket: net.Socket, options: TlsServerOptions, where: string): { secured: tls.TLSSocket; ready: Promise<tls.TLSSocket> } {
  const { creds, authz } = options;
  let serverOptions: tls.TLSSocketOptions;
  if (creds.kind === 'tls-creds-x509') {
    serverOptions = {
      isServer: true,
      secureContext: tls.createSecureContext({ ca: creds.ca, cert: creds.cert as Buffer, key: creds.key as Buffer }),
      requestCert: creds.verifyPeer,
      rejectUnauthorized: creds.verifyPeer,
    };
  } else {
    serverOptions = {
      isServer: true,
      secureContext: tls.createSecureContext({ ciphers: PSK_CIPHERS, maxVersion: 'TLSv1.2' }),
      pskCallback: (_socket: tls.TLSSocket, identity: string) => creds.keys.get(identity) ?? null,
    } as tls.TLSSocketOptions;
  }
  const secured = new tls.TLSSocket(socket, serverOptions);
  const ready = new Promise<tls.TLSSocket>((resolve, reject) => {
    const fail = (err: Error): void => {
      secured.off('secure', onSecure);
      secured.destroy();
      reject(err);
    };
    const onSecure = (): void => {
      secured.off('error', onError).off('close', onClose);
      if (creds.kind === 'tls-creds-x509' && creds.verifyPeer) {
        // A bare server TLSSocket (no tls.Server) leaves the verdict on the client's chain to us.
        const ssl = (secured as unknown as { ssl: { verifyError(): Error | null } | null }).ssl;
        const verifyError = ssl === null ? new Error('the connection closed') : ssl.verifyError();
        if (verifyError !== null) {
          const noCert = Object.keys(secured.getPeerCertificate()).length === 0;
          fail(
            new TlsError(
              RuntimeErrorCode.TLS_HANDSHAKE,
              noCert
                ? `${where}: the client sent no certificate, and verify-peer is on here`
                : `${where}: the client's certificate is not trusted: ${(verifyError as { code?: string }).code ?? verifyError.message} (${verifyError.message})`,
            ),
          );
          return;
        }
      }
      if (authz !== undefined) {
        const dn = creds.kind === 'tls-creds-x509' ? peerDistinguishedName(secured) : undefined;
        if (dn === undefined) {
          fail(new TlsError(RuntimeErrorCode.TLS_AUTHZ_DENIED, `${where}: tls-authz '${authz.id}' needs a client certificate to check, and the client sent none`));
          return;
        }
        if (!authz.isAllowed(dn)) {
          fail(new TlsError(RuntimeErrorCode.TLS_AUTHZ_DENIED, `${where}: TLS x509 authz check for ${dn} is denied (tls-authz '${authz.id}')`));
          return;
        }
      }
      resolve(secured);
    };
    const onError = (err: Error): void => fail(handshakeError(where, err, 'server'));
    const onClose = (): void => fail(new TlsError(RuntimeErrorCode.TLS_HANDSHAKE, `${where}: the peer closed the connection during the TLS handshake`));
    secured.once('secure', onSecure).once('error', onError).once('close', onClose);
  });
  return { secured, ready };
}

/**
 * The client certificate's subject as GnuTLS prints it (RFC 4514: most specific first,
 * `CN=…,O=…,C=…`), which is what QEMU's authz objects are written against.
 */
export function peerDistinguishedName(socket: tls.TLSSocket): string | undefined {
  const peer = socket.getPeerCertificate(false);
  if (peer === null || peer.raw === undefined || Object.keys(peer).length === 0) return undefined;
  const subject = new X509Certificate(peer.raw).subject;
  return subject
    .split('\n')
    .filter((l) => l !== '')
    .reverse()
    .map((rdn) => {
      const eq = rdn.indexOf('=');
      return `${rdn.slice(0, eq)}=${rdn.slice(eq + 1).replace(/([,+"\\<>;])/g, '\\$1')}`;
    })
    .join(',');
}

/** OpenSSL's reasons when the first bytes are not a TLS record: the peer is not speaking TLS. */
const NOT_TLS_REASONS = ['wrong version number', 'http request', 'packet length too long', 'unknown protocol', 'record layer failure', 'unexpected message'];

function handshakeError(where: string, err: Error, side: TlsEndpoint): TlsError {
  const reason = (err as { reason?: string }).reason ?? err.message;
  if (side === 'server' && NOT_TLS_REASONS.some((r) => reason.toLowerCase().includes(r))) {
    return new TlsError(RuntimeErrorCode.TLS_PLAINTEXT_PEER, `${where}: the peer is not speaking TLS (${reason}), but tls-creds is set here: set the same tls-creds on the source`, { cause: err });
  }
  const reset = (err as NodeJS.ErrnoException).code === 'ECONNRESET';
  const hint = reset ? ' (the peer reset the connection: is it set with tls-creds, and does it accept this side?)' : '';
  return new TlsError(RuntimeErrorCode.TLS_HANDSHAKE, `${where}: TLS handshake failed: ${reason}${hint}`, { cause: err });
}

/** A TLS ClientHello starts with a handshake record (0x16) of version 3.x. */
export function looksLikeTlsHello(head: Uint8Array): boolean {
  return head.length >= 2 && head[0] === 0x16 && head[1] === 0x03;
}

/**
 * Static-buffer reads over a stream that cannot do them (a TLS socket): each chunk is copied
 * into `onread.buffer()` and handed to `onread.callback` (one copy per chunk, never per page).
 * When the callback returns false the stream is paused and the rest of the chunk kept; a
 * resume() delivers it before anything newer.
 */
export function pumpOnread(stream: Duplex, onread: OnreadOptions, prefix?: Buffer): void {
  let held: Buffer | undefined;
  const deliver = (chunk: Buffer): void => {
    let at = 0;
    while (at < chunk.length) {
      const into = typeof onread.buffer === 'function' ? onread.buffer() : onread.buffer;
      const n = Math.min(into.length, chunk.length - at);
      chunk.copy(into, 0, at, at + n);
      at += n;
      if (!onread.callback(n, into)) {
        if (at < chunk.length) held = chunk.subarray(at);
        stream.pause();
        return;
      }
    }
  };
  // 'resume' comes before the stream flows again, so the kept tail goes first.
  stream.on('resume', () => {
    if (stream.isPaused()) return;
    const chunk = held;
    held = undefined;
    if (chunk !== undefined) deliver(chunk);
  });
  stream.on('data', (chunk: Buffer) => {
    // A chunk already on its way when the callback said stop waits for resume(); one arriving
    // once resumed (it can beat the 'resume' event) goes after the kept tail. Both are rare.
    if (stream.isPaused()) {
      held = held === undefined ? chunk : Buffer.concat([held, chunk]);
      return;
    }
    if (held !== undefined) {
      chunk = Buffer.concat([held, chunk]);
      held = undefined;
    }
    deliver(chunk);
  });
  if (prefix !== undefined && prefix.length > 0) deliver(prefix);
}
