// QMP commands both livemig processes answer: run state, guest digest, capabilities and
// parameters (QEMU's names, order, defaults and validation), quit.

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
import { QmpError, RuntimeErrorCode, type QmpServer } from '@livemig/runtime';

/** Capabilities and parameters of one process, as migrate-set-* left them. */
export class MigrationSettings {
  capabilities: Capabilities = defaultCapabilities();
  parameters: MigrationParameters = defaultParameters();
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
  server.register('query-status', () => ({ status: guest.runState, running: guest.running, singlestep: false }));

  server.register('stop', async () => {
    if (!guest.running) return {};
    await guest.stop('paused');
    server.emitEvent('STOP');
    return {};
  });

  server.register('cont', async () => {
    if (guest.runState === 'inmigrate') throw new QmpCommandError('Migration is not finalized yet: the guest starts when it completes');
    if (guest.runState === 'finish-migrate') throw new QmpCommandError('The guest is being migrated: it cannot be continued now');
    if (guest.running) return {};
    await guest.start();
    server.emitEvent('RESUME');
    return {};
  });

  server.register('quit', () => {
    setImmediate(() => hooks.quit());
    return {};
  });

  server.register('x-query-guest-digest', () => guest.digest());

  server.register('query-migrate-capabilities', () =>
    CAPABILITIES.map((capability) => ({ capability, state: settings.capabilities[capability] })),
  );

  server.register('migrate-set-capabilities', (args) => {
    if (hooks.migrationRunning()) throw new QmpCommandError("There's a migration process in progress");
    settings.capabilities = applyCapabilities(settings.capabilities, args['capabilities']);
    return {};
  });

  server.register('query-migrate-parameters', () => ({ ...settings.parameters }));

  server.register('migrate-set-parameters', (args) => {
    settings.parameters = applyParameters(settings.parameters, args);
    hooks.parametersChanged?.(settings.parameters);
    return {};
  });
}

/** Emit MIGRATION {status} when capability "events" is on, as QEMU does. */
export function migrationEvent(server: QmpServer, settings: MigrationSettings, status: string): void {
  if (settings.capabilities.events) server.emitEvent('MIGRATION', { status });
}
