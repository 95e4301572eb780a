// What one `migrate` runs with and what it refuses before anything starts (QMP migrate and
// --migrate, which checks before the guest is prepared), and how a failed connection is told.

import { type MigrationSettings, QmpCommandError } from '@livemig/machine';
import type { MigrationAddress } from '@livemig/runtime';
import { native } from '@livemig/native';

/** Where a migration can go (`defer` is the destination's). */
export const OUTGOING_TRANSPORTS = ['tcp', 'unix', 'fd', 'exec', 'file'] as const;

/**
 * livemig-source's capabilities that QEMU has off by default. return-path: `completed` then means
 * the destination loaded the stream (its SHUT came back), not only that the stream was written.
 * A QEMU destination needs nothing for it (it opens the return path when the stream asks), and
 * `--capabilities return-path=off` or migrate-set-capabilities turns it off.
 */
export const SOURCE_CAPABILITY_DEFAULTS = { 'return-path': true } as const;

/** exec: and file: carry no bytes back: no return path there. */
export function isOneWay(address: MigrationAddress): boolean {
  return address.transport === 'exec' || address.transport === 'file';
}

/** The capabilities one migration to `address` runs with: return-path left out of a one-way transport when only the default asked for it. */
export function capabilitiesFor(address: MigrationAddress, settings: MigrationSettings): MigrationSettings['capabilities'] {
  const capabilities = { ...settings.capabilities };
  if (isOneWay(address) && settings.byDefault.has('return-path')) capabilities['return-path'] = false;
  return capabilities;
}

/**
 * What `migrate` refuses before anything starts, for these settings (QMP migrate and --migrate,
 * which checks it before the guest is prepared).
 */
export function refuseMigrate(address: MigrationAddress, settings: MigrationSettings, ramShared: boolean): void {
  if (address.transport === 'defer') throw new QmpCommandError("'defer' is only for the destination (migrate-incoming)");
  if (settings.parameters.mode === 'cpr-exec') {
    const c = settings.capabilities;
    if (settings.parameters['cpr-exec-command'].length === 0) {
      throw new QmpCommandError("mode cpr-exec needs the new image's command: set parameter cpr-exec-command (a list of strings, its argv)");
    }
    if (address.transport !== 'file') throw new QmpCommandError(`mode cpr-exec saves the state to a file: use a file: URI, not ${address.transport}:`);
    // return-path on only by default is dropped for a file: (one-way) address, as for any migrate.
    if (c['postcopy-ram'] || c.multifd || (c['return-path'] && !settings.byDefault.has('return-path'))) {
      throw new QmpCommandError('mode cpr-exec cannot be used with capability postcopy-ram, multifd or return-path (nothing runs on the other side)');
    }
    if (!ramShared) {
      throw new QmpCommandError(
        native.available
          ? 'mode cpr-exec needs guest RAM in shared memory: start livemig-source with --shared-ram'
          : `mode cpr-exec needs guest RAM in shared memory, and ${native.unavailableReason === '' ? 'the native addon is missing' : `the native addon (@livemig/native) is not built: ${native.unavailableReason}`}`,
      );
    }
  }
  if (isOneWay(address) && settings.capabilities['return-path'] && !settings.byDefault.has('return-path')) {
    throw new QmpCommandError(`return-path needs a connection both ways (tcp:, unix: or fd:): ${address.transport}: carries nothing back (turn return-path off)`);
  }
  if (settings.parameters['tls-creds'] !== '' && address.transport !== 'tcp' && address.transport !== 'unix') {
    throw new QmpCommandError(`TLS (tls-creds) needs a tcp: or unix: migration address, not ${address.transport}:`);
  }
  if (settings.capabilities['postcopy-preempt'] && address.transport !== 'tcp' && address.transport !== 'unix') {
    throw new QmpCommandError('postcopy-preempt needs a tcp: or unix: migration address');
  }
  if (settings.capabilities['mapped-ram']) {
    // QEMU's own refusals, in its words, and livemig's narrower ones.
    if (address.transport !== 'file') throw new QmpCommandError('Mapped-ram migration requires a file: URI');
    if (address.offset !== 0) throw new QmpCommandError('livemig writes mapped-ram files from offset 0 only');
    if (settings.capabilities.xbzrle) throw new QmpCommandError('Mapped-ram migration is incompatible with xbzrle');
    if (settings.capabilities['postcopy-ram']) throw new QmpCommandError('Mapped-ram migration is incompatible with postcopy');
    if (settings.capabilities.multifd) throw new QmpCommandError('livemig writes mapped-ram files on one channel: turn multifd off');
  }
  if (settings.capabilities.multifd) {
    if (address.transport !== 'tcp' && address.transport !== 'unix') throw new QmpCommandError('multifd is not supported by current protocol');
    if (settings.capabilities['postcopy-ram']) throw new QmpCommandError('livemig does not support multifd together with postcopy-ram');
    if (settings.parameters['multifd-compression'] !== 'none') {
      throw new QmpCommandError(`multifd-compression '${settings.parameters['multifd-compression']}' is not supported by livemig (use 'none')`);
    }
  }
}

/** Why a connection failed, in a few words and what to check (the errno stays for searching). */
export function connectFailure(err: Error): string {
  const errno = ((err.cause as NodeJS.ErrnoException | undefined)?.code ?? '') as string;
  const hints: Record<string, string> = {
    ECONNREFUSED: 'connection refused (ECONNREFUSED): is a destination listening there?',
    ENOENT: 'no such socket (ENOENT): is a destination listening there?',
    EHOSTUNREACH: 'host unreachable (EHOSTUNREACH)',
    ENOTFOUND: 'the host name does not resolve (ENOTFOUND)',
    ETIMEDOUT: 'timed out (ETIMEDOUT)',
  };
  return hints[errno] ?? err.message;
}
