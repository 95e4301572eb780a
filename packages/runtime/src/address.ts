// Migration and QMP addresses in QEMU's URI syntax (wire-format.md §1.1, §11.2):
//
//   tcp:HOST:PORT        HOST may be a name, IPv4, [IPv6] or empty (= every local address)
//   unix:PATH            stream socket at PATH
//   fd:N                 an inherited, already-open descriptor (QEMU also takes getfd names; we do not)
//   exec:COMMAND         /bin/sh -c COMMAND; we write its stdin, read its stdout
//   file:PATH[,offset=N] QEMU 9.0+; N as qemu_strtosz reads it: decimal or 0x hex, optional K/M/G/T/P/E
//   defer                destination only: wait for `migrate-incoming`

import { AddressError } from './errors.ts';

export type MigrationAddress =
  | { readonly transport: 'tcp'; readonly host: string; readonly port: number }
  | { readonly transport: 'unix'; readonly path: string }
  | { readonly transport: 'fd'; readonly fd: number }
  | { readonly transport: 'exec'; readonly command: string }
  | { readonly transport: 'file'; readonly path: string; readonly offset: number }
  | { readonly transport: 'defer' };

export type Transport = MigrationAddress['transport'];

/** One entry of `query-migrate`'s `socket-address` list (QAPI `SocketAddress`; port is a string). */
export type SocketAddressInfo =
  | { type: 'inet'; host: string; port: string }
  | { type: 'unix'; path: string }
  | { type: 'fd'; str: string };

// sockaddr_un.sun_path is 108 bytes on Linux, one of them the terminating NUL.
const UNIX_PATH_MAX_BYTES = 107;

const SIZE_SUFFIX: Readonly<Record<string, number>> = {
  b: 1,
  k: 2 ** 10,
  m: 2 ** 20,
  g: 2 ** 30,
  t: 2 ** 40,
  p: 2 ** 50,
  e: 2 ** 60,
};

/** Parse `tcp:`, `unix:`, `fd:`, `exec:`, `file:` or `defer`; throws AddressError (LM_ERR_BAD_ADDRESS). */
export function parseAddress(text: string): MigrationAddress {
  if (typeof text !== 'string') throw new AddressError(String(text), 'an address must be a string');
  if (text === 'defer') return { transport: 'defer' };
  const colon = text.indexOf(':');
  if (colon < 0) {
    throw new AddressError(text, 'missing transport prefix (expected tcp:, unix:, fd:, exec:, file: or defer)');
  }
  const scheme = text.slice(0, colon);
  const rest = text.slice(colon + 1);
  switch (scheme) {
    case 'tcp':
      return parseTcp(text, rest);
    case 'unix':
      if (rest === '') throw new AddressError(text, 'unix socket path is empty');
      if (rest.includes('\0')) throw new AddressError(text, 'unix socket path contains a NUL byte');
      if (Buffer.byteLength(rest) > UNIX_PATH_MAX_BYTES) {
        throw new AddressError(
          text,
          `unix socket path is ${Buffer.byteLength(rest)} bytes, longer than the ${UNIX_PATH_MAX_BYTES} a sockaddr_un holds`,
        );
      }
      return { transport: 'unix', path: rest };
    case 'fd': {
      if (!/^[0-9]+$/.test(rest)) {
        throw new AddressError(text, `fd ${JSON.stringify(rest)} is not a descriptor number (named fds are not supported)`);
      }
      const fd = Number(rest);
      if (!Number.isSafeInteger(fd) || fd > 0x7fffffff) throw new AddressError(text, `fd ${rest} is out of range`);
      return { transport: 'fd', fd };
    }
    case 'exec':
      if (rest.trim() === '') throw new AddressError(text, 'exec command is empty');
      return { transport: 'exec', command: rest };
    case 'file':
      return parseFile(text, rest);
    case 'rdma':
      throw new AddressError(text, 'rdma: is not supported');
    default:
      throw new AddressError(
        text,
        `unknown transport ${JSON.stringify(scheme)} (expected tcp:, unix:, fd:, exec:, file: or defer)`,
      );
  }
}

function parseTcp(text: string, rest: string): MigrationAddress {
  let host: string;
  let portText: string;
  if (rest.startsWith('[')) {
    const close = rest.indexOf(']');
    if (close < 0) throw new AddressError(text, 'IPv6 host has no closing "]"');
    host = rest.slice(1, close);
    if (host === '' || !host.includes(':')) throw new AddressError(text, `"[${host}]" is not an IPv6 address`);
    if (rest[close + 1] !== ':') throw new AddressError(text, 'expected ":PORT" after the "]" of the IPv6 host');
    portText = rest.slice(close + 2);
  } else {
    const lastColon = rest.lastIndexOf(':');
    if (lastColon < 0) throw new AddressError(text, 'missing ":PORT" (expected tcp:HOST:PORT)');
    host = rest.slice(0, lastColon);
    portText = rest.slice(lastColon + 1);
    if (host.includes(':')) throw new AddressError(text, 'an IPv6 host must be written in brackets: tcp:[::1]:PORT');
  }
  if (/[\s,/[\]]/.test(host)) throw new AddressError(text, `host ${JSON.stringify(host)} is not a host name or address`);
  const comma = portText.indexOf(',');
  if (comma >= 0) {
    throw new AddressError(text, `socket options (${JSON.stringify(portText.slice(comma))}) are not supported`);
  }
  if (!/^[0-9]{1,5}$/.test(portText)) {
    throw new AddressError(text, `port ${JSON.stringify(portText)} is not a number 0-65535`);
  }
  const port = Number(portText);
  if (port > 65535) throw new AddressError(text, `port ${port} is above 65535`);
  return { transport: 'tcp', host, port };
}

function parseFile(text: string, rest: string): MigrationAddress {
  // QEMU finds the first ",offset=" (strstr), so a path may hold other commas.
  const at = rest.indexOf(',offset=');
  const path = at < 0 ? rest : rest.slice(0, at);
  if (path === '') throw new AddressError(text, 'file path is empty');
  if (path.includes('\0')) throw new AddressError(text, 'file path contains a NUL byte');
  if (at < 0) return { transport: 'file', path, offset: 0 };
  const offsetText = rest.slice(at + ',offset='.length);
  const offset = parseSize(offsetText);
  if (offset === undefined) {
    throw new AddressError(
      text,
      `offset ${JSON.stringify(offsetText)} is not a byte count (decimal or 0x hex, optional K/M/G/T/P/E suffix, below 2^53)`,
    );
  }
  return { transport: 'file', path, offset };
}

// qemu_strtosz without fractions: "4096", "0x1000", "4k", "1M". Undefined when invalid.
function parseSize(text: string): number | undefined {
  const m = /^(0[xX][0-9a-fA-F]+|[0-9]+)([bBkKmMgGtTpPeE]?)$/.exec(text);
  if (m === null) return undefined;
  const base = Number(m[1]);
  const unit = SIZE_SUFFIX[(m[2] ?? '').toLowerCase()] ?? 1;
  const value = base * unit;
  return Number.isSafeInteger(value) ? value : undefined;
}

/** Format back to QEMU's syntax, e.g. `tcp:127.0.0.1:40123`, `tcp:[::1]:4444`, `file:/x,offset=4096`. */
export function formatAddress(address: MigrationAddress): string {
  switch (address.transport) {
    case 'tcp':
      return `tcp:${address.host.includes(':') ? `[${address.host}]` : address.host}:${address.port}`;
    case 'unix':
      return `unix:${address.path}`;
    case 'fd':
      return `fd:${address.fd}`;
    case 'exec':
      return `exec:${address.command}`;
    case 'file':
      return address.offset === 0 ? `file:${address.path}` : `file:${address.path},offset=${address.offset}`;
    case 'defer':
      return 'defer';
  }
}

/**
 * The `socket-address` list of `query-migrate` for a bound address: `[{"type":"inet","host":
 * "127.0.0.1","port":"40123"}]`, `[{"type":"unix","path":…}]`, `[{"type":"fd","str":"N"}]`; empty
 * for transports that are not sockets.
 */
export function toSocketAddress(address: MigrationAddress): SocketAddressInfo[] {
  switch (address.transport) {
    case 'tcp':
      return [{ type: 'inet', host: address.host, port: String(address.port) }];
    case 'unix':
      return [{ type: 'unix', path: address.path }];
    case 'fd':
      return [{ type: 'fd', str: String(address.fd) }];
    default:
      return [];
  }
}

/** Accept either form; strings go through {@link parseAddress}. */
export function toAddress(address: string | MigrationAddress): MigrationAddress {
  return typeof address === 'string' ? parseAddress(address) : address;
}
