#!/usr/bin/env node
// livemig-source: run a guest and migrate it out when told to (QMP `migrate`, or --migrate).

import { accessSync, constants as fsConstants } from 'node:fs';
import { rename, unlink, writeFile } from 'node:fs/promises';
import { dirname, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { Guest } from '@livemig/guest';
import {
  guestFromFlags,
  settingsFromFlags,
  migrationEvent,
  MigrationSettings,
  GUEST_OPTIONS,
  addressForFlag,
  checkListenable,
  EXIT_MIGRATION_FAILED,
  fatalLine,
  orExitWithUsage,
  orExitWithUsageAsync,
  shutdownEvent,
  type Progress,
  ProgressModel,
  progressLine,
  QmpCommandError,
  objectsFromFlags,
  TtyProgress,
  UsageError,
} from '@livemig/machine';
import { DEFAULT_QEMU_VERSION, normalizeUuid, type QemuVersion, type StreamDialect, streamDialect } from '@livemig/protocol';
import {
  ChannelError,
  connectChannel,
  type ConnectChannelOptions,
  createLogger,
  ObjectRegistry,
  setStatusLine,
  type Logger,
  parseAddress,
  QmpServer,
  RuntimeErrorCode,
} from '@livemig/runtime';
import { guestRamAllocator, native } from '@livemig/native';
import { loadStateFile } from './load-state.ts';
import { loadCprState, SharedRam } from './cpr-exec.ts';
import { OutgoingMigration } from './migration.ts';
import { TimelineRecorder } from './timeline-recorder.ts';
import { warmUpSender } from './warm-up.ts';
import { multifdInitPacket } from './multifd-sender.ts';
import { HELP } from './help.ts';
import { serveSourceQmp } from './qmp-commands.ts';
import { capabilitiesFor, connectFailure, OUTGOING_TRANSPORTS, refuseMigrate, SOURCE_CAPABILITY_DEFAULTS } from './migrate-checks.ts';


const EXTRA = {
  migrate: { type: 'string' },
  capabilities: { type: 'string' },
  parameters: { type: 'string' },
  'exit-after-migrate': { type: 'boolean' },
  paused: { type: 'boolean', short: 'S' },
  'realtime-postcopy': { type: 'boolean' },
  uuid: { type: 'string' },
  'shared-ram': { type: 'boolean' },
  'incoming-cpr': { type: 'string' },
  'load-state': { type: 'string' },
  timeline: { type: 'string' },
} as const;

/** A `migrate` whose channels are still connecting (or failed to, or were cancelled meanwhile). */
interface ConnectAttempt {
  status: 'setup' | 'cancelling' | 'cancelled' | 'failed';
  errorDesc: string | undefined;
  cancel(): void;
}

export class SourceProcess {
  readonly guest: Guest;
  readonly settings = new MigrationSettings();
  readonly log: Logger;
  readonly machineType: string;
  /** The stream dialect of that machine type (dialect.ts). */
  readonly dialect: StreamDialect;
  migration: OutgoingMigration | undefined;
  /** migrate-start-postcopy came (possibly while still connecting). */
  postcopyWanted = false;
  /** --realtime-postcopy */
  realtimePostcopy = false;
  /** --uuid (normalized), sent as configuration/uuid with validate-uuid. */
  uuid: string | undefined;
  /** A migrate whose channel is still connecting, or failed to. */
  connecting: ConnectAttempt | undefined;
  /** Guest RAM in memfds (--shared-ram, or a cpr-exec's new image): what cpr-exec needs. */
  sharedRam: SharedRam | undefined;
  qmp: QmpServer | undefined;
  /** --timeline: where each migration's timeline is written when it ends. */
  timelinePath: string | undefined;
  /** The current (or last) migration's timeline. */
  timeline: TimelineRecorder | undefined;
  /** Settles once the last migration's timeline is written (or there is none to write). */
  timelineWritten: Promise<void> = Promise.resolve();
  /** --object and object-add: TLS credentials and authz objects. */
  objects = new ObjectRegistry();
  private readonly progress = new TtyProgress();
  private progressTimer: NodeJS.Timeout | undefined;
  /** The current migration's progress (query-migrate's x-progress and the terminal bar). */
  private progressModel = new ProgressModel();

  constructor(guest: Guest, machineType: string, log: Logger, qemuVersion: QemuVersion = DEFAULT_QEMU_VERSION) {
    this.guest = guest;
    this.machineType = machineType;
    this.dialect = streamDialect(machineType, qemuVersion);
    this.log = log;
  }

  running(): boolean {
    if (this.connecting?.status === 'setup' || this.connecting?.status === 'cancelling') return true;
    const s = this.migration?.status;
    return s === 'setup' || s === 'active' || s === 'pre-switchover' || s === 'device' || s === 'postcopy-active' || s === 'postcopy-paused' || s === 'postcopy-recover' || s === 'cancelling';
  }

  event(name: string, data?: Record<string, unknown>): void {
    this.qmp?.emitEvent(name, data);
  }

  /**
   * Start a migration. Like QEMU's, it returns at once: connecting happens in the background and
   * a destination that is not there shows as status "failed" with its error-desc. A failure to
   * connect is logged once, at `failureLevel` (info when a QMP client asked: it reads error-desc).
   */
  migrate(uri: string, failureLevel: 'info' | 'error' = 'info'): Promise<OutgoingMigration | undefined> {
    if (typeof uri !== 'string') throw new QmpCommandError("Parameter 'uri' is missing");
    if (this.running()) throw new QmpCommandError('There is a migration process in progress');
    // total-time counts from the command, connecting included, as QEMU's does.
    const requestedAt = performance.now();
    const address = parseAddress(uri);
    const settings = this.settings;
    // Refusals come before anything starts: the next migrate or set-capabilities must not be blocked.
    refuseMigrate(address, settings, this.sharedRam !== undefined);
    const capabilities = capabilitiesFor(address, settings);
    const sharedRam = this.sharedRam;
    const cprCommand = settings.parameters.mode === 'cpr-exec' ? [...settings.parameters['cpr-exec-command']] : undefined;
    const channelOptions = this.channelOptions();
    const preempt = settings.capabilities['postcopy-preempt'];
    // QEMU 7.2 opens the preempt channel with the main one; 8.0 and later at the switch to postcopy.
    const preemptAtStart = preempt && this.dialect.preemptSetup === '7.2';
    const multifd = settings.capabilities.multifd;
    const log = this.log.child({ component: 'migration' });
    const emitStatus = (status: string): void => {
      if (this.qmp !== undefined) migrationEvent(this.qmp, settings, status);
    };
    emitStatus('setup');
    this.migration = undefined;
    this.timeline = undefined;
    this.postcopyWanted = false;
    const attempt: ConnectAttempt = {
      status: 'setup',
      errorDesc: undefined,
      // migrate_cancel before the channels are connected: they are closed as soon as they are.
      cancel: () => {
        if (attempt.status !== 'setup') return;
        attempt.status = 'cancelling';
        emitStatus('cancelling');
      },
    };
    this.connecting = attempt;
    type Channel = Awaited<ReturnType<typeof connectChannel>>;
    // Extra connections follow the main one, which must be accepted first (a QEMU 7.2
    // destination takes the first connection as the main channel): the preempt channel
    // (in QEMU 7.2's setup), or the multifd channels in channel-id order.
    const connect = async (): Promise<[Channel, Channel | undefined, Channel[]]> => {
      const main = await connectChannel(address, { ...channelOptions, positioned: settings.capabilities['mapped-ram'] });
      const extra: Channel[] = [];
      // Until the migration takes them, a reset of a connected channel must not go unheard (an
      // 'error' without a listener ends the process); the migration sees it as a destroyed channel.
      const hold = (c: Channel): Channel => c.on('error', () => {});
      hold(main);
      try {
        // With postcopy-preempt no multifd channel is opened in either setup (a livemig
        // destination takes the connection after the main one as the preempt channel).
        const count = preemptAtStart ? 1 : multifd && !preempt ? settings.parameters['multifd-channels'] : 0;
        for (let i = 0; i < count; i++) {
          extra.push(
            await connectChannel(address, channelOptions).then((c) => {
              // A multifd channel's init packet goes out as soon as it is connected, as QEMU does:
              // a QEMU destination reads it right after the channel's TLS handshake, in a blocking
              // read that keeps its main loop (and the next channel's handshake) waiting.
              if (multifd) c.write(multifdInitPacket(i));
              return hold(c);
            }, (err: Error) => {
              throw new ChannelError(
                RuntimeErrorCode.CHANNEL_OPEN,
                preemptAtStart
                  ? `postcopy-preempt channel: ${err.message}`
                  : `multifd channel ${i} of ${count}: ${err.message} (is the destination set for multifd with multifd-channels=${count}?)`,
                { cause: err },
              );
            }),
          );
        }
      } catch (err) {
        main.destroy();
        for (const c of extra) c.destroy();
        throw err;
      }
      return preemptAtStart ? [main, extra[0], []] : [main, undefined, extra];
    };
    return connect().then(
      ([channel, preemptChannel, multifdChannels]) => {
        if (attempt.status === 'cancelling') {
          for (const c of [channel, preemptChannel, ...multifdChannels]) c?.destroy();
          attempt.status = 'cancelled';
          emitStatus('cancelled');
          log.info({}, 'migration cancelled before its channels were connected');
          return undefined;
        }
        this.connecting = undefined;
        // A limit the policy stepped up serves this migration only: the operator's comes back at its end.
        const operatorDowntimeLimit = settings.parameters['downtime-limit'];
        let steppedDowntimeLimit: number | undefined;
        const m = new OutgoingMigration({
          guest: this.guest,
          capabilities,
          parameters: { ...settings.parameters },
          channel,
          ...(preemptChannel === undefined ? {} : { preempt: preemptChannel }),
          ...(preempt && !preemptAtStart ? { connectPreempt: () => connectChannel(address, channelOptions) } : {}),
          ...(multifdChannels.length === 0 ? {} : { multifd: multifdChannels, multifdInitSent: true }),
          machineType: this.machineType,
          dialect: this.dialect,
          realtimePostcopy: this.realtimePostcopy,
          ...(this.uuid === undefined ? {} : { uuid: this.uuid }),
          postcopyRequested: this.postcopyWanted,
          ...(cprCommand === undefined || sharedRam === undefined ? {} : { cprExec: { exec: () => sharedRam.exec(cprCommand) } }),
          log,
          requestedAt,
          events: {
            status: (s) => {
              this.timeline?.statusChanged(s);
              if (s !== 'setup') emitStatus(s);
              if ((s === 'completed' || s === 'failed' || s === 'cancelled') && steppedDowntimeLimit !== undefined && settings.parameters['downtime-limit'] === steppedDowntimeLimit) {
                settings.parameters = { ...settings.parameters, 'downtime-limit': operatorDowntimeLimit };
                log.info({ downtimeLimitMs: operatorDowntimeLimit }, `downtime-limit back to ${operatorDowntimeLimit} ms (the convergence policy's steps applied to that migration only)`);
              }
            },
            pass: (pass) => {
              this.timeline?.passStarted(pass);
              if (settings.capabilities.events) this.event('MIGRATION_PASS', { pass });
            },
            stop: () => this.event('STOP'),
            resume: () => this.event('RESUME'),
            throttled: (percent) => this.timeline?.throttled(percent),
            convergence: (d) => {
              // query-migrate-parameters shows a stepped limit, as if migrate-set-parameters had set it.
              if (d.step === 'downtime-limit') {
                settings.parameters = { ...settings.parameters, 'downtime-limit': d.downtimeLimitMs };
                steppedDowntimeLimit = d.downtimeLimitMs;
              }
              this.timeline?.convergenceDecided(d);
              // As QEMU's MIGRATION and MIGRATION_PASS: an event only with capability events (the log line, timeline and query-migrate have it regardless).
              if (!settings.capabilities.events) return;
              this.event('LIVEMIG_CONVERGENCE', {
                step: d.step,
                reason: d.reason,
                phase: d.phase,
                'downtime-limit': d.downtimeLimitMs,
                remaining: d.remainingBytes,
                pass: d.pass,
                'elapsed-ms': d.elapsedMs,
                ...(d.postcopyUnavailable ? { 'postcopy-unavailable': true } : {}),
              });
            },
          },
        });
        this.migration = m;
        this.progressModel = new ProgressModel();
        const on = Object.entries(capabilities).filter(([, v]) => v).map(([k]) => k);
        this.recordTimeline(m, uri, on);
        log.info({ uri, capabilities: on, maxBandwidth: settings.parameters['max-bandwidth'] }, 'migration started');
        this.showProgress(m);
        return m;
      },
      (err: Error) => {
        if (attempt.status === 'cancelling') {
          attempt.status = 'cancelled';
          emitStatus('cancelled');
          return undefined;
        }
        attempt.status = 'failed';
        attempt.errorDesc = `Failed to connect to '${uri}': ${connectFailure(err)}`;
        emitStatus('failed');
        log[failureLevel]({ code: (err as { code?: unknown }).code }, attempt.errorDesc);
        return undefined;
      },
    );
  }

  /** Record the migration's timeline; with --timeline, write it when the migration ends. */
  private recordTimeline(m: OutgoingMigration, uri: string, capabilities: string[]): void {
    const timeline = new TimelineRecorder(m, { uri, capabilities, parameters: { ...m.o.parameters } });
    this.timeline = timeline;
    const path = this.timelinePath;
    if (path === undefined) return;
    // Written beside it and renamed into place: whoever watches for FILE never reads half of it.
    const partial = `${path}.${process.pid}.partial`;
    this.timelineWritten = timeline.finished.then(
      (doc) =>
        writeFile(partial, `${JSON.stringify(doc)}\n`)
          .then(() => rename(partial, path))
          .then(
            () => this.log.info({ path, samples: doc.samples.length, events: doc.events.length }, 'timeline written'),
            (err: Error) => {
              this.log.warn({ path }, `timeline not written: ${err.message}`);
              return unlink(partial).catch(() => {});
            },
          ),
    );
  }

  /**
   * How every channel of a migration connects: with tls-creds, each one (main, multifd, preempt,
   * a recovery) runs its own TLS handshake. Throws QEMU's text for unusable credentials.
   */
  channelOptions(): ConnectChannelOptions {
    const p = this.settings.parameters;
    let creds;
    try {
      creds = this.objects.creds(p['tls-creds'], 'client');
    } catch (err) {
      throw new QmpCommandError((err as Error).message);
    }
    return creds === undefined ? {} : { tls: { creds, hostname: p['tls-hostname'] } };
  }

  /** The progress model fed with the migration's figures now (README "Progress"). */
  progressOf(m: OutgoingMigration): Progress {
    const r = m.ramInfo();
    return this.progressModel.update({
      status: m.status,
      transferredBytes: r.transferred,
      remainingBytes: r.remaining,
      totalBytes: r.total,
      bytesPerSecond: (r.mbps * 1e6) / 8,
      dirtyBytesPerSecond: r['dirty-pages-rate'] * r['page-size'],
    });
  }

  private showProgress(m: OutgoingMigration): void {
    if (!this.progress.enabled) return;
    clearInterval(this.progressTimer);
    setStatusLine(this.progress);
    this.progressTimer = setInterval(() => {
      const r = m.ramInfo();
      this.progress.update(
        progressLine({
          status: m.status,
          progress: this.progressOf(m),
          transferredBytes: r.transferred,
          remainingBytes: r.remaining,
          bytesPerSecond: (r.mbps * 1e6) / 8,
          passes: r['dirty-sync-count'],
        }),
      );
    }, 200);
    void m.done.finally(() => {
      clearInterval(this.progressTimer);
      this.progress.done();
      setStatusLine(undefined);
    });
  }

  async shutdown(status: number): Promise<never> {
    this.migration?.cancel();
    await this.qmp?.close().catch(() => {});
    await this.guest.destroy().catch(() => {});
    process.exit(status);
  }
}

/** --timeline FILE: an absolute path whose directory exists and may be written (checked at start, not when the migration ends). */
function timelineFile(file: string): string {
  const path = resolve(file);
  try {
    accessSync(dirname(path), fsConstants.W_OK);
  } catch (err) {
    throw new UsageError(`--timeline ${file}: cannot write in ${dirname(path)} (${(err as NodeJS.ErrnoException).code ?? (err as Error).message})`, { cause: err });
  }
  return path;
}

async function main(argv: string[]): Promise<void> {
  const program = 'livemig-source';
  const values = orExitWithUsage(program, () => parseArgs({ args: argv, options: { ...GUEST_OPTIONS, ...EXTRA }, strict: true }).values);
  if (values.help === true) {
    process.stdout.write(HELP);
    return;
  }
  // Every flag and address is checked before the guest's RAM is filled and prefaulted (seconds
  // for a big guest): a mistake is one line at once, exit status 2.
  const settings = new MigrationSettings();
  const parsed = orExitWithUsage(program, () => {
    const f = guestFromFlags(values);
    Object.assign(settings, settingsFromFlags(values, SOURCE_CAPABILITY_DEFAULTS));
    if (values.migrate !== undefined) {
      try {
        const ramShared = values['shared-ram'] === true || values['incoming-cpr'] !== undefined;
        refuseMigrate(addressForFlag('--migrate', values.migrate, OUTGOING_TRANSPORTS), settings, ramShared);
      } catch (err) {
        if ((err as { code?: unknown }).code === 'LM_ERR_USAGE') throw err;
        throw new Error(`--migrate ${values.migrate}: ${(err as Error).message}`, { cause: err });
      }
    }
    const uuid = values.uuid === undefined ? undefined : normalizeUuid(values.uuid);
    const timeline = values.timeline === undefined ? undefined : timelineFile(values.timeline);
    const objects = objectsFromFlags(values);
    if (values.migrate !== undefined && settings.parameters['tls-creds'] !== '') {
      try {
        objects.creds(settings.parameters['tls-creds'], 'client');
      } catch (err) {
        throw new Error(`--migrate ${values.migrate}: ${(err as Error).message}`, { cause: err });
      }
    }
    return { f, uuid, timeline, objects };
  });
  const flags = parsed.f;
  if (flags.qmp !== undefined) {
    const qmpAddress = orExitWithUsage(program, () => addressForFlag('--qmp', flags.qmp!, ['tcp', 'unix']));
    await orExitWithUsageAsync(program, () => checkListenable('--qmp', qmpAddress));
  }
  const log = createLogger(program, flags.logLevel === undefined ? {} : { level: flags.logLevel as 'info' });
  const incomingCpr = values['incoming-cpr'];
  if (values['shared-ram'] === true && !native.available) {
    orExitWithUsage(program, () => {
      throw new UsageError(`--shared-ram needs the native addon (@livemig/native), which is not built: ${native.unavailableReason}`);
    });
  }
  // A cpr-exec's new image maps the RAM the old one handed over; --shared-ram makes new memfds.
  let sharedRam: SharedRam | undefined;
  try {
    sharedRam = incomingCpr !== undefined ? SharedRam.inherited(flags.guest.blocks) : values['shared-ram'] === true ? SharedRam.create() : undefined;
  } catch (err) {
    process.stderr.write(`${program}: ${(err as Error).message}\n`);
    process.exit(1);
  }
  const guest = new Guest(flags.guest, sharedRam?.allocate ?? guestRamAllocator());
  let savedRunState: string | undefined;
  if (incomingCpr !== undefined) {
    // RAM is the old image's, untouched: only devices and vCPUs come from the state file.
    const loadingSince = performance.now();
    guest.setRunState('inmigrate');
    try {
      savedRunState = await loadCprState(guest, incomingCpr, flags.machineType);
    } catch (err) {
      process.stderr.write(`${program}: ${(err as Error).message}\n`);
      process.exit(1);
    }
    guest.setRunState('paused');
    log.info({ ms: Math.round(performance.now() - loadingSince), state: incomingCpr, runState: savedRunState }, 'cpr-exec: guest state loaded, RAM kept in place');
  } else if (values['load-state'] !== undefined) {
    const loadingSince = performance.now();
    try {
      await loadStateFile(guest, values['load-state'], flags.machineType);
    } catch (err) {
      process.stderr.write(`${program}: ${(err as Error).message}\n`);
      process.exit(1);
    }
    await guest.prefault('read');
    log.info({ ms: Math.round(performance.now() - loadingSince), state: values['load-state'] }, 'guest state loaded from a stream file');
  } else {
    // Seconds for a big guest: say what is going on (the demo shows it as its preparation phase).
    const preparingSince = performance.now();
    log.info({ bytes: guest.ram.totalBytes }, `preparing guest RAM (${(guest.ram.totalBytes / 2 ** 30).toFixed(2)} GiB): filling and prefaulting`);
    guest.fillInitial();
    await guest.prefault('read');
    log.info({ ms: Math.round(performance.now() - preparingSince) }, 'guest RAM prepared');
  }
  // Before the guest runs and QMP is served: a migration's first megabytes find optimised code.
  // Only a speed-up: a failure (no /dev/null in a bare container) is said and the source goes on.
  const warmingSince = performance.now();
  try {
    const warmedPages = warmUpSender(guest);
    log.debug({ ms: Math.round(performance.now() - warmingSince), pages: warmedPages }, 'sending path warmed up');
  } catch (err) {
    log.warn({ err: (err as Error).message }, 'sending path not warmed up (the first migration compiles it as it goes)');
  }
  const proc = new SourceProcess(guest, flags.machineType, log, flags.qemuVersion);
  proc.sharedRam = sharedRam;
  proc.realtimePostcopy = values['realtime-postcopy'] === true;
  proc.objects = parsed.objects;
  proc.settings.capabilities = settings.capabilities;
  proc.settings.byDefault = settings.byDefault;
  proc.settings.parameters = settings.parameters;
  if (parsed.uuid !== undefined) proc.uuid = parsed.uuid;
  proc.timelinePath = parsed.timeline;
  // As QEMU: a signal is a SHUTDOWN (reason host-signal) for the QMP clients, then the exit.
  const onSignal = (status: number): void => {
    if (proc.qmp !== undefined) shutdownEvent(proc.qmp, 'host-signal');
    void proc.shutdown(status);
  };
  process.on('SIGINT', () => onSignal(130));
  process.on('SIGTERM', () => onSignal(143));
  // As QEMU: without -S the guest is running before QMP is served (query-status never says
  // prelaunch to a client of a source started without -S).
  // A cpr-exec's new image runs the guest on when the old one was running it.
  if (values.paused !== true && (incomingCpr === undefined || savedRunState === 'running')) await guest.start();
  if (flags.qmp !== undefined) await serveSourceQmp(proc, flags.qmp, flags.name);
  log.info(
    { blocks: guest.ram.blocks.map((b) => `${b.idstr}:${b.length}`), vcpus: flags.guest.vcpus, workload: values.workload ?? 'idle', running: guest.running },
    'guest ready',
  );
  if (values.migrate !== undefined) {
    // Checked above, so only a failure to connect is left: logged once, as an error.
    const m = await proc.migrate(values.migrate, 'error');
    if (m === undefined) {
      if (values['exit-after-migrate'] === true) await proc.shutdown(EXIT_MIGRATION_FAILED);
      return;
    }
    await m.done;
    await proc.timelineWritten;
    if (values['exit-after-migrate'] === true) await proc.shutdown(m.status === 'completed' ? 0 : EXIT_MIGRATION_FAILED);
  }
}

main(process.argv.slice(2)).catch((err: unknown) => {
  // A coded error (an address in use, a refused connection) is one line; anything else a bug.
  const { line, status } = fatalLine('livemig-source', err);
  process.stderr.write(line);
  process.exit(status);
});
