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
  MIG_MODES,
  CONVERGENCE_LAST_STEPS,
  type MigrationParameters,
} from '@livemig/protocol';
import {
  DIRTY_RATE_DEFAULT_SAMPLE_PAGES,
  DIRTY_RATE_MAX_SAMPLE_PAGES,
  DIRTY_RATE_MIN_SAMPLE_PAGES,
  DirtyRateSample,
  type Guest,
} from '@livemig/guest';
import { capabilityList, parameterList, UsageError } from './flags.ts';
import { OBJECT_TYPES, ObjectRegistry, parseObjectOption, QmpError, qmpEnum, type QmpMembers, type QmpType, RuntimeErrorCode, type QmpServer } from '@livemig/runtime';

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

/** QAPI DirtyRateMeasureMode and DirtyRateStatus (QEMU 7.2). */
const DIRTY_RATE_MODES = ['page-sampling', 'dirty-ring', 'dirty-bitmap'] as const;
const DIRTY_RATE_STATUSES = ['unstarted', 'measuring', 'measured'] as const;
/** calc-time's range in seconds (QEMU 7.2). */
const DIRTY_RATE_MIN_SECONDS = 1;
const DIRTY_RATE_MAX_SECONDS = 60;

/** What query-dirty-rate reports: the last measurement, or the one under way (QEMU 7.2's DirtyRateInfo). */
interface DirtyRateState {
  status: (typeof DIRTY_RATE_STATUSES)[number];
  samplePages: number;
  /** MiB/s; only once measured. */
  dirtyRate: number | undefined;
  /** Seconds on the monotonic clock (QEMU's QEMU_CLOCK_REALTIME / 1000). */
  startTime: number;
  calcTime: number;
}

function monotonicSeconds(): number {
  return Number(process.hrtime.bigint() / 1_000_000_000n);
}

/** migrate-set-parameters' arguments: every parameter, optional, typed from its default. */
function parameterMembers(): QmpMembers {
  const members: Record<string, QmpType> = {};
  for (const [name, value] of Object.entries(defaultParameters())) {
    members[`*${name}`] = Array.isArray(value) ? ['str'] : typeof value === 'number' ? 'int' : typeof value === 'boolean' ? 'bool' : 'str';
  }
  members['*mode'] = qmpEnum(MIG_MODES);
  members['*x-livemig-convergence-last-step'] = qmpEnum(CONVERGENCE_LAST_STEPS);
  return members;
}

/** Capabilities and parameters of one process, as migrate-set-* left them. */
export class MigrationSettings {
  capabilities: Capabilities = defaultCapabilities();
  parameters: MigrationParameters = defaultParameters();
  /**
   * Capabilities on by this process's own default (not QEMU's) that nobody has set since: a
   * migration may leave one out where it cannot work (return-path on exec: and file:).
   */
  byDefault = new Set<string>();
}

/**
 * The settings `--capabilities` and `--parameters` ask for, checked as migrate-set-capabilities
 * and -parameters check them, over this process's `defaults` (capabilities QEMU has off).
 */
export function settingsFromFlags(
  values: { capabilities?: string | undefined; parameters?: string | undefined },
  defaults: Partial<Capabilities> = {},
): MigrationSettings {
  const settings = new MigrationSettings();
  for (const [name, on] of Object.entries(defaults)) {
    if (on !== true) continue;
    settings.capabilities = applyCapabilities(settings.capabilities, [{ capability: name, state: true }]);
    settings.byDefault.add(name);
  }
  if (values.capabilities !== undefined) {
    const list = capabilityList(values.capabilities);
    settings.capabilities = applyCapabilities(settings.capabilities, list);
    for (const c of list) settings.byDefault.delete(c.capability);
  }
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
  /** New capabilities, checked and about to be kept; may refuse them by throwing. */
  capabilitiesChanged?(c: Capabilities): void;
  /** Parameters changed (e.g. max-bandwidth mid-migration). */
  parametersChanged?(p: MigrationParameters): void;
  /**
   * migrate-continue {state}: the outgoing migration's status must be `state` (the source's
   * pause-before-switchover). Without it (a destination) the outgoing status is always `none`.
   */
  continueMigration?(state: string): void;
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

  registerDirtyRateCommands(server, guest);

  const capabilityStatus = { capability: qmpEnum(CAPABILITIES), state: 'bool' } as const;
  server.register('query-migrate-capabilities', () =>
    CAPABILITIES.map((capability) => ({ capability, state: settings.capabilities[capability] })),
  { args: {}, returns: [capabilityStatus] });

  server.register('migrate-set-capabilities', (args) => {
    if (hooks.migrationRunning()) throw new QmpCommandError("There's a migration process in progress");
    const next = applyCapabilities(settings.capabilities, args['capabilities']);
    hooks.capabilitiesChanged?.(next);
    settings.capabilities = next;
    for (const c of args['capabilities'] as { capability: string }[]) settings.byDefault.delete(c.capability);
    return {};
  }, { args: { capabilities: [capabilityStatus] }, returns: {} });

  server.register('migrate-continue', (args) => {
    const state = String(args['state']);
    if (hooks.continueMigration !== undefined) hooks.continueMigration(state);
    else if (state !== 'none') throw new QmpCommandError('Migration not in expected state: none');
    return {};
  }, { args: { state: qmpEnum(MIGRATION_STATUSES) }, returns: {} });

  const parameters = parameterMembers();
  server.register('query-migrate-parameters', () => ({ ...settings.parameters }), { args: {}, returns: parameters });

  server.register('migrate-set-parameters', (args) => {
    settings.parameters = applyParameters(settings.parameters, args);
    hooks.parametersChanged?.(settings.parameters);
    return {};
  }, { args: parameters, returns: {} });
}

/**
 * calc-dirty-rate / query-dirty-rate as QEMU 7.2 has them, mode page-sampling (guest's
 * dirty-rate.ts): it hashes sampled pages and never reads or clears the dirty log, so it runs
 * beside a migration without taking a dirty bit from it. dirty-ring and dirty-bitmap are refused.
 */
function registerDirtyRateCommands(server: QmpServer, guest: Guest): void {
  const state: DirtyRateState = { status: 'unstarted', samplePages: 0, dirtyRate: undefined, startTime: 0, calcTime: 0 };
  server.register(
    'calc-dirty-rate',
    (args) => {
      if (state.status === 'measuring') throw new QmpCommandError('the dirty rate is already being measured.');
      const calcTime = args['calc-time'] as number;
      if (calcTime < DIRTY_RATE_MIN_SECONDS || calcTime > DIRTY_RATE_MAX_SECONDS) {
        throw new QmpCommandError(`calc-time is out of range[${DIRTY_RATE_MIN_SECONDS}, ${DIRTY_RATE_MAX_SECONDS}].`);
      }
      const mode = (args['mode'] as string | undefined) ?? 'page-sampling';
      if (!(DIRTY_RATE_MODES as readonly string[]).includes(mode)) throw new QmpCommandError(`Parameter 'mode' does not accept value '${String(mode)}'`);
      if (mode === 'dirty-ring') throw new QmpCommandError('mode dirty-ring is not enabled, use other method instead.');
      if (mode === 'dirty-bitmap') {
        throw new QmpCommandError('mode dirty-bitmap is not supported by livemig (it would clear dirty-log bits a migration needs): use page-sampling');
      }
      const samplePages = (args['sample-pages'] as number | undefined) ?? DIRTY_RATE_DEFAULT_SAMPLE_PAGES;
      if (samplePages < DIRTY_RATE_MIN_SAMPLE_PAGES || samplePages > DIRTY_RATE_MAX_SAMPLE_PAGES) {
        throw new QmpCommandError(`sample-pages is out of range[${DIRTY_RATE_MIN_SAMPLE_PAGES}, ${DIRTY_RATE_MAX_SAMPLE_PAGES}].`);
      }
      const sample = DirtyRateSample.start(guest.ram, samplePages);
      Object.assign(state, { status: 'measuring', samplePages, dirtyRate: undefined, startTime: monotonicSeconds(), calcTime });
      // The result stays until the next calc-dirty-rate; the timer must not keep the process alive.
      setTimeout(() => {
        state.dirtyRate = sample.finish();
        state.status = 'measured';
      }, calcTime * 1000).unref();
      return {};
    },
    { args: { 'calc-time': 'int', '*sample-pages': 'int', '*mode': qmpEnum(DIRTY_RATE_MODES) }, returns: {} },
  );
  server.register(
    'query-dirty-rate',
    () => ({
      status: state.status,
      'sample-pages': state.samplePages,
      ...(state.dirtyRate === undefined ? {} : { 'dirty-rate': state.dirtyRate }),
      mode: 'page-sampling',
      'start-time': state.startTime,
      'calc-time': state.calcTime,
    }),
    {
      args: {},
      returns: {
        status: qmpEnum(DIRTY_RATE_STATUSES),
        'sample-pages': 'int',
        '*dirty-rate': 'int',
        mode: qmpEnum(DIRTY_RATE_MODES),
        'start-time': 'int',
        'calc-time': 'int',
      },
    },
  );
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
