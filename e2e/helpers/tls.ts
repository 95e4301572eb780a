// Test credentials made with openssl, laid out as QEMU's tls-creds-x509 / tls-creds-psk read them.

import { execFileSync } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { copyFileSync, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';

export interface X509Identity {
  /** openssl -subj form, e.g. "/C=GB/O=livemig/CN=client" */
  subject: string;
  /** The same as GnuTLS prints it (what authz objects match): "CN=client,O=livemig,C=GB". */
  dn: string;
}

function openssl(cwd: string, args: string[]): void {
  execFileSync('openssl', args, { cwd, stdio: ['ignore', 'ignore', 'pipe'] });
}

function dnOf(subject: string): string {
  return subject.split('/').filter((p) => p !== '').reverse().join(',');
}

/** A CA (its key and cert) in `dir`; EC P-256 keys are quick to make. */
export function makeCa(dir: string, name: string): { key: string; cert: string } {
  mkdirSync(dir, { recursive: true });
  const key = join(dir, `${name}-key.pem`);
  const cert = join(dir, `${name}-cert.pem`);
  openssl(dir, ['req', '-x509', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', cert, '-days', '2', '-subj', `/O=livemig tests/CN=${name}`,
    '-addext', 'basicConstraints=critical,CA:TRUE', '-addext', 'keyUsage=critical,keyCertSign,cRLSign']);
  return { key, cert };
}

/** A certificate and key signed by `ca`, for a server (with SANs) or a client. */
export function makeCert(dir: string, ca: { key: string; cert: string }, name: string, role: 'server' | 'client', subject: string, altNames: string[] = []): { key: string; cert: string } {
  const key = join(dir, `${name}-key.pem`);
  const cert = join(dir, `${name}-cert.pem`);
  const csr = join(dir, `${name}.csr`);
  const ext = join(dir, `${name}.ext`);
  openssl(dir, ['req', '-newkey', 'ec', '-pkeyopt', 'ec_paramgen_curve:prime256v1', '-nodes', '-keyout', key, '-out', csr, '-subj', subject]);
  const lines = ['basicConstraints=critical,CA:FALSE', 'keyUsage=critical,digitalSignature,keyEncipherment', `extendedKeyUsage=${role === 'server' ? 'serverAuth' : 'clientAuth'}`];
  if (altNames.length > 0) lines.push(`subjectAltName=${altNames.join(',')}`);
  writeFileSync(ext, `${lines.join('\n')}\n`);
  openssl(dir, ['x509', '-req', '-in', csr, '-CA', ca.cert, '-CAkey', ca.key, '-set_serial', `0x${randomBytes(8).toString('hex')}`, '-out', cert, '-days', '2', '-extfile', ext]);
  return { key, cert };
}

export interface X509Dirs {
  /** endpoint=server: ca-cert.pem, server-cert.pem, server-key.pem (SANs localhost, 127.0.0.1). */
  server: string;
  /** endpoint=client with a certificate of the test CA (`friendly.dn`). */
  client: string;
  /** endpoint=client with no certificate at all (anonymous). */
  anonymous: string;
  /** endpoint=client whose certificate another CA signed (it trusts the test CA for the server). */
  hostile: string;
  friendly: X509Identity;
}

/** QEMU-style credential directories for the usual cases, under `root`. */
export function makeX509Dirs(root: string, serverAltNames = ['DNS:localhost', 'IP:127.0.0.1']): X509Dirs {
  const work = join(root, 'pki-work');
  const ca = makeCa(work, 'ca');
  const rogue = makeCa(work, 'rogue-ca');
  const friendly = { subject: '/C=GB/O=livemig tests/CN=friendly-client', dn: '' };
  friendly.dn = dnOf(friendly.subject);
  const server = makeCert(work, ca, 'server', 'server', '/C=GB/O=livemig tests/CN=localhost', serverAltNames);
  const client = makeCert(work, ca, 'client', 'client', friendly.subject);
  const hostileCert = makeCert(work, rogue, 'hostile', 'client', '/C=GB/O=livemig tests/CN=hostile-client');
  const dirs = { server: join(root, 'pki-server'), client: join(root, 'pki-client'), anonymous: join(root, 'pki-anon'), hostile: join(root, 'pki-hostile') };
  for (const d of Object.values(dirs)) {
    mkdirSync(d, { recursive: true });
    copyFileSync(ca.cert, join(d, 'ca-cert.pem'));
  }
  copyFileSync(server.cert, join(dirs.server, 'server-cert.pem'));
  copyFileSync(server.key, join(dirs.server, 'server-key.pem'));
  copyFileSync(client.cert, join(dirs.client, 'client-cert.pem'));
  copyFileSync(client.key, join(dirs.client, 'client-key.pem'));
  copyFileSync(hostileCert.cert, join(dirs.hostile, 'client-cert.pem'));
  copyFileSync(hostileCert.key, join(dirs.hostile, 'client-key.pem'));
  return { ...dirs, friendly };
}

/** A tls-creds-psk directory: keys.psk with `username:hexkey` lines. */
export function makePskDir(dir: string, entries: Record<string, string>): string {
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, 'keys.psk'), Object.entries(entries).map(([u, k]) => `${u}:${k}\n`).join(''), { mode: 0o600 });
  return dir;
}

/** A random PSK key as hex (32 bytes, as `psktool` makes). */
export function randomPskKey(): string {
  return randomBytes(32).toString('hex');
}
