// QMP commands both livemig processes answer: run state, guest digest, capabilities and
// parameters (QEMU's names, order, defaults and validation), quit. Each is registered with its
// arguments (QAPI-style), which the server checks and query-qmp-schema shows; the events both
// processes send are declared here too.

import {
  applyCapabilities,
  applyParameters,
  type Capabilities,
  CAPABILITIES,
  defaultCapabilities,
  defaultParameters,
  type MigrationParameters,
} from '@livemig/protocol';
import type { Guest } from '@livemig/guest';
import { capabilitiesOn, parameterList, UsageError } from './flags.ts';
import { OBJECT_TYPES, ObjectRegistry, parseObjectOption, QmpError, qmpEnum, type QmpMembers, RuntimeErrorCode, type QmpServer } from '@livemig/runtime';

/** QAPI MigrationStatus, as the MIGRATION event's data names it. */
const MIGRATION_STATUSES = [
  'none',
  'setup',
  'cancelling',
  'cancelled',
  'active',
  'postcopy-active',
  'postcopy-paused',
  'postcopy-recover',
  'completed',
  'failed',
  'colo',
  'pre-switchover',
  'device',
  'wait-unplug',
] as const;

/** QAPI ShutdownCause (QEMU 7.2), for SHUTDOWN's `reason`. */
const SHUTDOWN_CAUSES = [
  'none',
  'host-error',
  'host-qmp-quit',
  'host-qmp-system-reset',
  'host-signal',
  'host-ui',
  'guest-shutdown',
  'guest-reset',
  'guest-panic',
  'subsystem-reset',
] as const;

/** migrate-set-parameters' arguments: every parameter, optional, typed from its default. */
function parameterMembers(): QmpMembers {
  const members: Record<string, 'int' | 'bool' | 'str'> = {};
  for (const [name, value] of Object.entries(defaultParameters())) {
    members[`*${name}`] = typeof value === 'number' ? 'int' : typeof value === 'boolean' ? 'bool' : 'str';
  }
  return members;
}

/** Capabilities and parameters of one process, as migrate-set-* left them. */
export class MigrationSettings {
  capabilities: Capabilities = defaultCapabilities();
  parameters: MigrationParameters = defaultParameters();
}

/** The settings `--capabilities` and `--parameters` ask for, checked as migrate-set-capabilities and -parameters check them. */
export function settingsFromFlags(values: { capabilities?: string | undefined; parameters?: string | undefined }): MigrationSettings {
  const settings = new MigrationSettings();
  if (values.capabilities !== undefined) settings.capabilities = applyCapabilities(settings.capabilities, capabilitiesOn(values.capabilities));
  if (values.parameters !== undefined) {
    try {
      settings.parameters = applyParameters(settings.parameters, parameterList(values.parameters));
    } catch (err) {
      throw new UsageError(`--parameters: ${(err as Error).message}`, { cause: err });
    }
  }
  return settings;
}

export interface MachineHooks {
  /** True while a migration runs (capabilities may not change then). */
  migrationRunning(): boolean;
  /** Parameters changed (e.g. max-bandwidth mid-migration). */
  parametersChanged?(p: MigrationParameters): void;
  quit(): void;
}

/**
 * A command handler's refusal, sent back as a QMP error reply with QEMU's class and the message
 * as `desc` (LM_ERR_QMP_ERROR_REPLY, as the client side sees it).
 */
export class QmpCommandError extends QmpError {
  constructor(message: string, qmpClass = 'GenericError') {
    super(RuntimeErrorCode.QMP_ERROR_REPLY, message, { qmpClass, desc: message });
  }
}

export function registerMachineCommands(server: QmpServer, guest: Guest, settings: MigrationSettings, hooks: MachineHooks): void {
  server.declareEvent('STOP');
  server.declareEvent('RESUME');
  server.declareEvent('SHUTDOWN', { guest: 'bool', reason: qmpEnum(SHUTDOWN_CAUSES) });
  server.declareEvent('MIGRATION', { status: qmpEnum(MIGRATION_STATUSES) });
  const none = { args: {}, returns: {} };

  server.register('query-status', () => ({ status: guest.runState, running: guest.running, singlestep: false }), {
    args: {},
    returns: { status: 'str', running: 'bool', singlestep: 'bool' },
  });

  server.register('stop', async () => {
    if (!guest.running) return {};
    await guest.stop('paused');
    server.emitEvent('STOP');
    return {};
  }, none);

  server.register('cont', async () => {
    if (guest.runState === 'inmigrate') throw new QmpCommandError('Migration is not finalized yet: the guest starts when it completes');
    if (guest.runState === 'finish-migrate') throw new QmpCommandError('The guest is being migrated: it cannot be continued now');
    if (guest.running) return {};
    await guest.start();
    server.emitEvent('RESUME');
    return {};
  }, none);

  server.register('quit', () => {
    // As QEMU 7.2 does: SHUTDOWN goes out before the reply; the process ends after the reply.
    shutdownEvent(server, 'host-qmp-quit');
    setImmediate(() => hooks.quit());
    return {};
  }, none);

  server.register('x-query-guest-digest', () => guest.digest(), { args: {}, returns: 'any' });

  const capabilityStatus = { capability: qmpEnum(CAPABILITIES), state: 'bool' } as const;
  server.register('query-migrate-capabilities', () =>
    CAPABILITIES.map((capability) => ({ capability, state: settings.capabilities[capability] })),
  { args: {}, returns: [capabilityStatus] });

  server.register('migrate-set-capabilities', (args) => {
    if (hooks.migrationRunning()) throw new QmpCommandError("There's a migration process in progress");
    settings.capabilities = applyCapabilities(settings.capabilities, args['capabilities']);
    return {};
  }, { args: { capabilities: [capabilityStatus] }, returns: {} });

  const parameters = parameterMembers();
  server.register('query-migrate-parameters', () => ({ ...settings.parameters }), { args: {}, returns: parameters });

  server.register('migrate-set-parameters', (args) => {
    settings.parameters = applyParameters(settings.parameters, args);
    hooks.parametersChanged?.(settings.parameters);
    return {};
  }, { args: parameters, returns: {} });
}

/** SHUTDOWN as QEMU 7.2 sends it when the host ends it (quit: host-qmp-quit; SIGINT/SIGTERM: host-signal). */
export function shutdownEvent(server: QmpServer, reason: 'host-qmp-quit' | 'host-signal'): void {
  server.emitEvent('SHUTDOWN', { guest: false, reason });
}

/** Emit MIGRATION {status} when capability "events" is on, as QEMU does. */
export function migrationEvent(server: QmpServer, settings: MigrationSettings, status: string): void {
  if (settings.capabilities.events) server.emitEvent('MIGRATION', { status });
}

/** The objects `--object` creates (each checked as object-add checks it); a mistake is a UsageError. */
export function objectsFromFlags(values: { object?: string[] | undefined }): ObjectRegistry {
  const objects = new ObjectRegistry();
  for (const text of values.object ?? []) {
    try {
      objects.add(parseObjectOption(text));
    } catch (err) {
      const message = (err as Error).message;
      throw new UsageError(message.startsWith('--object') ? message : `--object ${text}: ${message}`, { cause: err });
    }
  }
  return objects;
}

/** QMP object-add and object-del on the process's objects (TLS credentials, authz lists). */
export function registerObjectCommands(server: QmpServer, objects: ObjectRegistry): void {
  // QEMU's union: qom-type and id, then the type's own properties (checked by the registry).
  server.register('object-add', (args) => {
    try {
      objects.add(args);
    } catch (err) {
      throw new QmpCommandError((err as Error).message);
    }
    return {};
  }, { args: { 'qom-type': qmpEnum(OBJECT_TYPES), id: 'str' }, variantMembers: true, returns: {} });
  server.register('object-del', (args) => {
    if (typeof args['id'] !== 'string') throw new QmpCommandError("Parameter 'id' is missing");
    try {
      objects.delete(args['id']);
    } catch (err) {
      throw new QmpCommandError((err as Error).message);
    }
    return {};
  }, { args: { id: 'str' }, returns: {} });
}
