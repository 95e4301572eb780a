#!/usr/bin/env node
// livemig-destination: wait for a migrating guest and run it.

import { saveStateFile } from './save-state.ts';
import { parseArgs } from 'node:util';
import { Guest } from '@livemig/guest';
import { guestRamAllocator } from '@livemig/native';
import { applyParameters, type Capabilities, convergencePolicySettings, defaultParameters, normalizeUuid } from '@livemig/protocol';
import {
  GUEST_HELP,
  guestFromFlags,
  settingsFromFlags,
  migrationEvent,
  MigrationSettings,
  GUEST_OPTIONS,
  addressForFlag,
  checkListenable,
  EXIT_USAGE,
  fatalLine,
  orExitWithUsage,
  orExitWithUsageAsync,
  shutdownEvent,
  UsageError,
  QmpCommandError,
  registerMachineCommands,
  objectsFromFlags,
  registerObjectCommands,
} from '@livemig/machine';
import { createLogger, type Logger, migrationUri, ObjectRegistry, parseAddress, QMP_MIGRATION_CHANNELS, QmpServer, type TlsServerOptions, toSocketAddress } from '@livemig/runtime';
import { IncomingMigration } from './incoming.ts';

const HELP = `usage: livemig-destination --incoming ADDR [-S] [guest flags] [--qmp ADDR]

Waits for a migration stream (from livemig-source or QEMU) and runs the guest it carries.
RAM is allocated and touched (prefaulted) before listening, so the transfer does not pay for
first-touch page faults. Exits with status 1 if the incoming migration fails.

  --incoming ADDR   tcp:HOST:PORT (port 0: any free port, see query-migrate) | unix:PATH |
                    file:PATH[,offset=N] (a stream file, mapped-ram ones included) |
                    exec:CMD (the stream on CMD's stdout) | defer (wait for QMP migrate-incoming)
  -S, --paused      keep the guest paused after the migration until QMP cont
  --capabilities L  capabilities to turn on first, comma-separated (e.g. events,postcopy-ram,
                    postcopy-preempt, or multifd: pages on extra connections, read into RAM)
  --parameters L    parameters to set first, NAME=VALUE comma-separated (e.g. multifd-channels=4);
                    the convergence policy's (x-livemig-no-progress-timeout,
                    -completion-timeout-per-gib, -downtime-limit-step, -downtime-limit-max,
                    -convergence-last-step) are taken and shown, as QEMU takes every parameter
                    on either side, but act on the outgoing side (livemig-source) only
  --handshake-timeout MS
                    a connection to the incoming port must send the stream header ("QEVM",
                    version 3) within MS ms, or it is dropped and the port stays open for the
                    source (parameter x-livemig-handshake-timeout; default 5000)
  --uuid UUID       the guest's UUID (QEMU's -uuid): a stream whose configuration/uuid differs
                    (a source with validate-uuid and another UUID) is refused
  --realtime-postcopy
                    in postcopy, run the fault path under SCHED_FIFO: vCPUs (priority 1) until
                    the last page is in, and the fault thread (priority 2); use it on the source
                    too. The slowest faults then wait less for a CPU while the background
                    stream keeps every core busy, but that stream gets less CPU, so postcopy
                    lasts longer (2-4x on 2 cores), and a vCPU that runs flat out may take 95 %
                    of a core; whether it pays depends on the machine (pnpm bench postcopy
                    measures both ways). Needs CAP_SYS_NICE (e.g. root); without it a warning
                    is logged and nothing changes

${GUEST_HELP}

exit status: 0 done (quit), 1 the incoming migration failed, 2 a flag or address that cannot be
used (checked before guest RAM is prepared), 70 an internal error, 130/143 a signal.

QMP commands: migrate-incoming (uri, or QEMU 8.2+'s channels), migrate-recover, migrate-pause,
query-migrate (status, socket-address, error-desc, postcopy blocktime and fault latency),
migrate-set-capabilities, query-migrate-capabilities, migrate-set-parameters,
query-migrate-parameters (settings set while listening count until a connection sends a byte),
stop, cont, query-status, x-query-guest-digest, x-livemig-save-state (filename: after a completed
migration, with the guest paused, write RAM and every device to a stream file that
livemig-source --load-state starts from), calc-dirty-rate, query-dirty-rate, object-add,
object-del (TLS credentials, authz), quit; introspection as QEMU's: query-commands, query-events,
query-name, query-version, query-qmp-schema.
Events: MIGRATION (with capability "events"), RESUME, STOP, SHUTDOWN (on quit, SIGINT, SIGTERM).
`;

const EXTRA = {
  incoming: { type: 'string' },
  paused: { type: 'boolean', short: 'S' },
  capabilities: { type: 'string' },
  parameters: { type: 'string' },
  'realtime-postcopy': { type: 'boolean' },
  'handshake-timeout': { type: 'string' },
  uuid: { type: 'string' },
} as const;

class DestinationProcess {
  readonly guest: Guest;
  readonly settings = new MigrationSettings();
  readonly log: Logger;
  incoming: IncomingMigration | undefined;
  qmp: QmpServer | undefined;
  private readonly autostart: boolean;
  private readonly machineType: string;
  /** --realtime-postcopy */
  realtimePostcopy = false;
  /** --uuid (normalized): a stream with another configuration/uuid is refused. */
  uuid: string | undefined;
  /** --object and object-add: TLS credentials and authz objects. */
  objects = new ObjectRegistry();
  /** The convergence policy's parameters as last logged (one line per change, not per command). */
  private policyNoted = JSON.stringify(convergencePolicySettings(defaultParameters()));
  private prefaulted: Promise<void>;

  constructor(guest: Guest, machineType: string, autostart: boolean, log: Logger) {
    this.guest = guest;
    this.machineType = machineType;
    this.autostart = autostart;
    this.log = log;
    const t0 = performance.now();
    this.prefaulted = guest.prefault('write').then(() => {
      log.info({ ms: Math.round(performance.now() - t0), bytes: guest.ram.totalBytes }, 'guest RAM prefaulted');
    });
  }

  async listen(uri: string): Promise<string> {
    if (this.incoming !== undefined) throw new QmpCommandError('The incoming migration has already been started');
    const address = parseAddress(uri);
    if (address.transport !== 'tcp' && address.transport !== 'unix' && address.transport !== 'file' && address.transport !== 'exec') {
      throw new QmpCommandError(`incoming migration over ${address.transport}: is not supported (use tcp:, unix:, file: or exec:)`);
    }
    const tls = this.tlsOptions();
    if (tls !== undefined && (address.transport === 'file' || address.transport === 'exec')) {
      throw new QmpCommandError(`TLS (tls-creds) needs a tcp: or unix: incoming address, not ${address.transport}:`);
    }
    // Until the stream arrives, keep the prefaulted RAM from going cold.
    let stopWarm: (() => void) | undefined;
    const incoming = new IncomingMigration({
      guest: this.guest,
      capabilities: { ...this.settings.capabilities },
      multifdChannels: this.settings.parameters['multifd-channels'],
      stallTimeoutMs: this.settings.parameters['x-livemig-stall-timeout'],
      handshakeTimeoutMs: this.settings.parameters['x-livemig-handshake-timeout'],
      ...(this.uuid === undefined ? {} : { uuid: this.uuid }),
      ...(tls === undefined ? {} : { tls }),
      realtimePostcopy: this.realtimePostcopy,
      autostart: this.autostart,
      machineType: this.machineType,
      log: this.log.child({ component: 'incoming' }),
      events: {
        status: (s) => {
          if (this.qmp !== undefined) migrationEvent(this.qmp, this.settings, s);
          // The connection came (active), or the migration ended without one.
          if (s !== 'setup') stopWarm?.();
          // QEMU's destination exits when the incoming migration fails; give the RP and QMP a moment.
          if (s === 'failed') setTimeout(() => void this.shutdown(1), 200).unref();
        },
        resume: () => this.qmp?.emitEvent('RESUME'),
      },
    });
    this.incoming = incoming;
    await this.prefaulted;
    stopWarm = this.guest.keepWarm();
    if (address.transport === 'file' || address.transport === 'exec') return incoming.readFrom(address);
    return incoming.listen(uri);
  }

  /** Parameters tls-creds and tls-authz resolved (QEMU's error text when they name nothing usable). */
  tlsOptions(): TlsServerOptions | undefined {
    const p = this.settings.parameters;
    try {
      const creds = this.objects.creds(p['tls-creds'], 'server');
      if (creds === undefined) return undefined;
      return { creds, authz: this.objects.authz(p['tls-authz']) };
    } catch (err) {
      throw new QmpCommandError((err as Error).message);
    }
  }

  /**
   * The convergence policy's parameters are taken here, as QEMU takes every parameter on either
   * side (libvirt sets them on both), and shown by query-migrate-parameters; they act on the
   * outgoing side only. Said once each time they change, so the operator is not misled.
   */
  notePolicyParameters(): void {
    const now = JSON.stringify(convergencePolicySettings(this.settings.parameters));
    if (now === this.policyNoted) return;
    this.policyNoted = now;
    this.log.info(
      { convergencePolicy: JSON.parse(now) as unknown },
      'convergence policy parameters (x-livemig-no-progress-timeout …) kept: they act on the outgoing side (livemig-source) only, not on an incoming migration',
    );
  }

  queryMigrate(): Record<string, unknown> {
    const m = this.incoming;
    if (m === undefined) return {};
    const out: Record<string, unknown> = { status: m.status };
    if (m.listeningAddress !== undefined && (m.status === 'setup' || m.status === 'none')) {
      out['socket-address'] = toSocketAddress(parseAddress(m.listeningAddress));
    }
    if (m.status === 'failed' && m.errorDesc !== undefined) out['error-desc'] = m.errorDesc;
    const pc = m.postcopyInfo();
    if (pc !== undefined) Object.assign(out, pc);
    return out;
  }

  async serveQmp(address: string, name?: string): Promise<void> {
    const qmp = await QmpServer.listen(address, { logger: this.log.child({ component: 'qmp' }), ...(name === undefined ? {} : { name }) });
    this.qmp = qmp;
    // A destination that listens takes new settings until a connection brings its first byte.
    const reconfigure = (capabilities: Capabilities): void => {
      const p = this.settings.parameters;
      this.incoming?.reconfigure(capabilities, {
        multifdChannels: p['multifd-channels'],
        stallTimeoutMs: p['x-livemig-stall-timeout'],
        handshakeTimeoutMs: p['x-livemig-handshake-timeout'],
      });
    };
    const configurable = (): boolean => this.incoming !== undefined && this.incoming.configurable;
    registerMachineCommands(qmp, this.guest, this.settings, {
      migrationRunning: () => this.incoming !== undefined && !this.incoming.configurable && this.incoming.status !== 'completed' && this.incoming.status !== 'failed',
      capabilitiesChanged: (c) => {
        if (configurable()) reconfigure(c);
      },
      parametersChanged: () => {
        this.notePolicyParameters();
        if (configurable()) reconfigure(this.settings.capabilities);
      },
      quit: () => void this.shutdown(0),
    });
    registerObjectCommands(qmp, this.objects);
    qmp.register('x-livemig-save-state', async (args) => {
      const status = (this.queryMigrate() as { status?: string }).status;
      if (status !== 'completed') throw new QmpCommandError(`x-livemig-save-state needs a completed incoming migration (status: ${status ?? 'none'})`);
      if (this.guest.running) throw new QmpCommandError('x-livemig-save-state needs the guest paused (start the destination with -S, or stop it)');
      try {
        return { bytes: await saveStateFile(this.guest, this.machineType, String(args['filename'])) };
      } catch (err) {
        throw new QmpCommandError(`x-livemig-save-state: ${(err as Error).message}`);
      }
    }, { args: { filename: 'str' }, returns: 'any' });
    qmp.register('migrate-incoming', async (args) => {
      await this.listen(migrationUri(args, 'migrate-incoming'));
      return {};
    }, { args: { '*uri': 'str', '*channels': QMP_MIGRATION_CHANNELS }, returns: {} });
    qmp.register('query-migrate', () => this.queryMigrate(), { args: {}, returns: 'any' });
    qmp.register(
      'migrate-recover',
      async (args) => {
        const uri = args['uri'];
        if (typeof uri !== 'string') throw new QmpCommandError("Parameter 'uri' is missing");
        if (this.incoming === undefined) throw new QmpCommandError('migrate-recover needs a paused postcopy migration, and there is none');
        try {
          await this.incoming.recover(uri);
        } catch (err) {
          throw new QmpCommandError((err as Error).message);
        }
        return {};
      },
      { allowOob: true, args: { uri: 'str' }, returns: {} },
    );
    qmp.register(
      'migrate-pause',
      () => {
        if (this.incoming === undefined) throw new QmpCommandError('migrate-pause needs a postcopy migration, and there is none');
        try {
          this.incoming.pause();
        } catch (err) {
          throw new QmpCommandError((err as Error).message);
        }
        return {};
      },
      { allowOob: true, args: {}, returns: {} },
    );
    this.log.info({ qmp: qmp.addressText }, 'QMP listening');
  }

  async shutdown(status: number): Promise<never> {
    await this.qmp?.close().catch(() => {});
    await this.guest.destroy().catch(() => {});
    process.exit(status);
  }
}

async function main(argv: string[]): Promise<void> {
  const program = 'livemig-destination';
  const values = orExitWithUsage(program, () => parseArgs({ args: argv, options: { ...GUEST_OPTIONS, ...EXTRA }, strict: true }).values);
  if (values.help === true) {
    process.stdout.write(HELP);
    return;
  }
  // Every flag and address is checked before the guest's RAM is allocated and prefaulted
  // (seconds for a big guest): a mistake is one line at once, exit status 2.
  const settings = new MigrationSettings();
  const { flags, incoming, uuid, objects } = orExitWithUsage(program, () => {
    if (values.incoming === undefined) throw new UsageError('--incoming is required (tcp:HOST:PORT, unix:PATH, file:PATH, exec:CMD or defer)');
    const address = addressForFlag('--incoming', values.incoming, ['tcp', 'unix', 'file', 'exec', 'defer']);
    const f = guestFromFlags(values);
    Object.assign(settings, settingsFromFlags(values));
    const handshake = values['handshake-timeout'];
    if (handshake !== undefined) {
      try {
        settings.parameters = applyParameters(settings.parameters, { 'x-livemig-handshake-timeout': /^\d+$/.test(handshake) ? Number(handshake) : handshake });
      } catch (err) {
        throw new UsageError(`--handshake-timeout: ${(err as Error).message}`, { cause: err });
      }
    }
    const uuid = values.uuid === undefined ? undefined : normalizeUuid(values.uuid);
    const objects = objectsFromFlags(values);
    if (address.transport !== 'defer') {
      try {
        objects.creds(settings.parameters['tls-creds'], 'server');
        objects.authz(settings.parameters['tls-authz']);
      } catch (err) {
        throw new UsageError(`--incoming ${values.incoming}: ${(err as Error).message}`, { cause: err });
      }
    }
    return { flags: f, incoming: { text: values.incoming, address }, uuid, objects };
  });
  if (incoming.address.transport !== 'defer') await orExitWithUsageAsync(program, () => checkListenable('--incoming', incoming.address));
  if (flags.qmp !== undefined) {
    const qmpAddress = orExitWithUsage(program, () => addressForFlag('--qmp', flags.qmp!, ['tcp', 'unix']));
    await orExitWithUsageAsync(program, () => checkListenable('--qmp', qmpAddress));
  }
  const log = createLogger(program, flags.logLevel === undefined ? {} : { level: flags.logLevel as 'info' });
  const guest = new Guest(flags.guest, guestRamAllocator());
  const proc = new DestinationProcess(guest, flags.machineType, values.paused !== true, log);
  proc.realtimePostcopy = values['realtime-postcopy'] === true;
  proc.objects = objects;
  proc.settings.capabilities = settings.capabilities;
  proc.settings.parameters = settings.parameters;
  proc.notePolicyParameters();
  if (uuid !== undefined) proc.uuid = uuid;
  // As QEMU: a signal is a SHUTDOWN (reason host-signal) for the QMP clients, then the exit.
  const onSignal = (status: number): void => {
    if (proc.qmp !== undefined) shutdownEvent(proc.qmp, 'host-signal');
    void proc.shutdown(status);
  };
  process.on('SIGINT', () => onSignal(130));
  process.on('SIGTERM', () => onSignal(143));
  if (flags.qmp !== undefined) await proc.serveQmp(flags.qmp, flags.name);
  if (incoming.address.transport !== 'defer') {
    try {
      const bound = await proc.listen(incoming.text);
      log.info({ incoming: bound }, incoming.address.transport === 'file' || incoming.address.transport === 'exec' ? 'reading the migration stream' : 'listening for the migration');
    } catch (err) {
      // Checked above; something took the address since. One line, as for the check.
      process.stderr.write(`${program}: --incoming ${incoming.text}: ${(err as Error).message}\n`);
      await proc.shutdown(EXIT_USAGE);
    }
  }
}

main(process.argv.slice(2)).catch((err: unknown) => {
  // A coded error (an address in use) is one line; anything else is a bug, with its stack.
  const { line, status } = fatalLine('livemig-destination', err);
  process.stderr.write(line);
  process.exit(status);
});
