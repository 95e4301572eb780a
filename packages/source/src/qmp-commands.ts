// The source's QMP: the server, the events it declares and the commands it serves beyond the
// machine's common ones (migrate, migrate_cancel, query-migrate, migrate-pause,
// migrate-start-postcopy, x-query-migration-timeline), each acting on the SourceProcess.

import { QmpCommandError, registerMachineCommands, registerObjectCommands } from '@livemig/machine';
import { CONVERGENCE_PHASES, CONVERGENCE_REASONS, CONVERGENCE_STEPS, TARGET_PAGE_SIZE } from '@livemig/protocol';
import { connectChannel, migrationUri, parseAddress, QMP_MIGRATION_CHANNELS, qmpEnum, QmpServer } from '@livemig/runtime';
import type { SourceProcess } from './main.ts';
import { slabFigures } from './migration.ts';

/** Serve QMP on `address` for this process (sets proc.qmp). */
export async function serveSourceQmp(proc: SourceProcess, address: string, name?: string): Promise<void> {
  const qmp = await QmpServer.listen(address, { logger: proc.log.child({ component: 'qmp' }), ...(name === undefined ? {} : { name }) });
  proc.qmp = qmp;
  qmp.declareEvent('MIGRATION_PASS', { pass: 'int' });
  qmp.declareEvent('LIVEMIG_CONVERGENCE', {
    step: qmpEnum(CONVERGENCE_STEPS),
    reason: qmpEnum(CONVERGENCE_REASONS),
    phase: qmpEnum(CONVERGENCE_PHASES),
    'downtime-limit': 'int',
    remaining: 'int',
    pass: 'int',
    'elapsed-ms': 'int',
    '*postcopy-unavailable': 'bool',
  });
  registerMachineCommands(qmp, proc.guest, proc.settings, {
    migrationRunning: () => proc.running(),
    parametersChanged: (p) => {
      // While still connecting there is no migration yet: it copies the settings when it starts.
      if (proc.connecting === undefined && proc.running()) proc.migration?.setParameters(p);
    },
    quit: () => void proc.shutdown(0),
    continueMigration: (state) => {
      // QEMU compares with the outgoing status: none before any migrate, setup while connecting.
      const m = proc.migration;
      const c = proc.connecting;
      const now = c !== undefined ? c.status : (m?.status ?? 'none');
      if (m === undefined || c !== undefined) {
        if (state !== now) throw new QmpCommandError(`Migration not in expected state: ${now}`);
        return;
      }
      try {
        m.continueFrom(state);
      } catch (err) {
        throw new QmpCommandError((err as Error).message);
      }
    },
  });
  registerObjectCommands(qmp, proc.objects);
  qmp.register('migrate', async (args) => {
    if (args['resume'] === true) {
      const m = proc.migration;
      if (m === undefined || !m.paused) throw new QmpCommandError('migrate with resume=true needs a paused postcopy migration, and there is none');
      const uri = migrationUri(args, 'migrate');
      // Connect in the background, as migrate does; a failure leaves the migration paused.
      // With postcopy-preempt a new preempt channel follows the main one: at once in QEMU
      // 7.2's setup, after the received bitmaps in the 8.0 setup (the migration opens it).
      const address = parseAddress(uri);
      const preempt = proc.settings.capabilities['postcopy-preempt'] && (address.transport === 'tcp' || address.transport === 'unix');
      const preemptAtStart = preempt && proc.dialect.preemptSetup === '7.2';
      const channelOptions = proc.channelOptions();
      void connectChannel(address, channelOptions).then(
        async (channel) => {
          let preemptChannel: Awaited<ReturnType<typeof connectChannel>> | undefined;
          if (preemptAtStart) {
            preemptChannel = await connectChannel(address, channelOptions).catch((err: Error) => {
              proc.log.warn({ uri }, `resume: no new preempt channel (${err.message}); requested pages use the main channel`);
              return undefined;
            });
          }
          try {
            m.resume(channel, preemptChannel, preempt && !preemptAtStart ? () => connectChannel(address, channelOptions) : undefined);
          } catch (err) {
            proc.log.warn({}, (err as Error).message);
          }
        },
        (err: Error) => proc.log.warn({ uri }, `resume: cannot connect to ${uri}: ${err.message}`),
      );
      return {};
    }
    if (args['blk'] === true || args['inc'] === true) throw new QmpCommandError('block migration is not supported');
    // Checked before anything starts: a bad `channels` is the reply, not a failed migration.
    void proc.migrate(migrationUri(args, 'migrate'));
    return {};
  }, { args: { '*uri': 'str', '*channels': QMP_MIGRATION_CHANNELS, '*blk': 'bool', '*inc': 'bool', '*detach': 'bool', '*resume': 'bool' }, returns: {} });
  qmp.register('migrate_cancel', () => {
    if (proc.connecting !== undefined) proc.connecting.cancel();
    else proc.migration?.cancel();
    return {};
  }, { args: {}, returns: {} });
  qmp.register('query-migrate', () => queryMigrate(proc), { args: {}, returns: 'any' });
  // livemig's own, named as QEMU names its unstable queries: the current or last migration's timeline.
  qmp.register('x-query-migration-timeline', () => {
    if (proc.timeline === undefined) {
      const c = proc.connecting;
      if (c === undefined) throw new QmpCommandError('No migration has been started: there is no timeline');
      // Its timeline starts with the migration, once the channels are connected.
      throw new QmpCommandError(c.status === 'failed' ? 'The migration failed before it was connected: there is no timeline' : 'The migration is still connecting: its timeline starts once it is connected');
    }
    return proc.timeline.document();
  }, { args: {}, returns: 'any' });
  qmp.register(
    'migrate-pause',
    () => {
      const m = proc.migration;
      if (m === undefined) throw new QmpCommandError('migrate-pause needs a postcopy migration, and there is none');
      try {
        m.pause();
      } catch (err) {
        throw new QmpCommandError((err as Error).message);
      }
      return {};
    },
    { allowOob: true, args: {}, returns: {} },
  );
  qmp.register('migrate-start-postcopy', () => {
    if (!proc.settings.capabilities['postcopy-ram']) {
      throw new QmpCommandError('Enable postcopy with migrate_set_capability before the start of migration');
    }
    if (proc.migration === undefined && proc.connecting === undefined) {
      throw new QmpCommandError('Postcopy must be started after migration has been started');
    }
    proc.postcopyWanted = true;
    proc.migration?.requestPostcopy();
    return {};
  }, { args: {}, returns: {} });
  proc.log.info({ qmp: qmp.addressText }, 'QMP listening');
}

/** query-migrate's reply: QEMU's MigrationInfo for the current or last migration, plus livemig's x- fields. */
export function queryMigrate(proc: SourceProcess): Record<string, unknown> {
  const c = proc.connecting;
  if (c !== undefined) {
    if (c.status === 'failed') return { status: 'failed', 'error-desc': c.errorDesc ?? 'unknown error' };
    // Still connecting: nothing done yet, nothing measured.
    return c.status === 'setup' ? { status: c.status, 'x-progress': { fraction: 0, 'eta-ms': null, basis: 'measuring' } } : { status: c.status };
  }
  const m = proc.migration;
  if (m === undefined) return {};
  const out: Record<string, unknown> = { status: m.status };
  // livemig's field: the one progress model (README "Progress"), a fraction that never goes back.
  const p = proc.progressOf(m);
  const progress = { fraction: p.fraction, 'eta-ms': p.etaMs, basis: p.basis };
  // livemig's too: the convergence policy's state, in every status once it is on (a cancel may be its doing).
  const convergence = m.policy.info();
  const withConvergence = (o: Record<string, unknown>): Record<string, unknown> => (convergence === undefined ? o : { ...o, 'x-livemig-convergence': convergence });
  if (m.status === 'setup' || m.status === 'cancelled') return withConvergence({ ...out, 'x-progress': progress });
  if (m.status === 'failed') {
    out['error-desc'] = m.errorDesc ?? 'unknown error';
    return withConvergence(out);
  }
  const now = performance.now();
  out['total-time'] = Math.round(m.status === 'completed' ? m.totalTime : now - m.startTime);
  out['setup-time'] = Math.round(m.setupTime);
  if (m.status === 'completed') {
    out['downtime'] = Math.round(m.downtime);
    // livemig's: the limit the switchover was planned for, and by how much the downtime exceeded it.
    out['x-downtime-limit'] = m.downtimeLimitMs;
    if (m.downtimeOvershootMs > 0) out['x-downtime-overshoot'] = m.downtimeOvershootMs;
    const plan = m.switchoverPlan;
    const p = m.precopy.switchoverPhases;
    if (plan !== undefined && p.allSentMs > 0) {
      // The plan, and where the downtime went: each step as ms since the guest was stopped (README "Downtime").
      out['x-switchover'] = {
        'expected-downtime': Math.round(plan.expectedMs),
        'pending-bytes': plan.pendingBytes,
        'bytes-per-second': Math.round(plan.bytesPerMs * 1000),
        'planned-stop': Math.round(plan.cost.stopMs),
        'planned-sync': Math.round(plan.cost.syncMs),
        'planned-device-save': Math.round(plan.cost.deviceSaveMs),
        'device-state-bytes': plan.cost.deviceStateBytes,
        'planned-round-trip': Math.round(plan.cost.roundTripMs),
        stopped: Math.round(p.stopMs),
        synced: Math.round(p.syncedMs),
        'ram-sent': Math.round(p.ramSentMs),
        'devices-saved': Math.round(p.devicesSavedMs),
        'all-sent': Math.round(p.allSentMs),
      };
    }
  } else out['expected-downtime'] = Math.round(m.expectedDowntime);
  out['ram'] = m.ramInfo();
  if (m.ram.xbzrle !== undefined) {
    const c = m.ram.xbzrle;
    const s = m.ram.stats;
    out['xbzrle-cache'] = {
      'cache-size': c.sizeBytes,
      bytes: s.xbzrleBytes,
      pages: s.xbzrlePages,
      'cache-miss': c.cacheMiss,
      'cache-miss-rate': c.lookups > 0 ? c.cacheMiss / c.lookups : 0,
      'encoding-rate': s.xbzrleBytes > 0 ? (s.xbzrlePages * TARGET_PAGE_SIZE) / s.xbzrleBytes : 0,
      overflow: s.xbzrleOverflow,
    };
  }
  if (m.throttlePercent > 0) out['cpu-throttle-percentage'] = m.throttlePercent;
  out['x-progress'] = progress;
  // livemig's: the send slabs this process has allocated and holds free (README "One RAM page").
  out['x-slabs'] = slabFigures();
  if (convergence !== undefined) out['x-livemig-convergence'] = convergence;
  const vfio = m.guest.vfio;
  if (vfio !== undefined) {
    // QEMU 7.2's VfioStats, and livemig's view of the device's phases.
    out['vfio'] = { transferred: vfio.stats.transferredBytes };
    out['x-vfio'] = {
      'precopy-iterations': vfio.stats.precopyIterations,
      'precopy-bytes': vfio.stats.precopyBytes,
      'stop-copy-bytes': vfio.stats.stopCopyBytes,
      'config-bytes': vfio.stats.configBytes,
      pending: vfio.pendingEstimate(),
      'device-state': vfio.region.deviceState,
    };
  }
  return out;
}
