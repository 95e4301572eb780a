// QEMU's pc machine types as live migration partners (imported by both interop suites, which
// choose the QEMU): livemig emulates none of their devices, so it walks each QEMU device section
// by the description recorded for the machine type (protocol's foreign-machines.data.ts),
// carries the bytes and sends them on.
//
//   QEMU → livemig destination, live: RAM equals QEMU's, each carried section equals, byte for
//     byte, the one in a copy of the very stream QEMU sent (teed on its way).
//   QEMU → stream file → livemig source (--load-state) → QEMU, live: the last QEMU's RAM and
//     vCPU registers equal the first's, and its guest runs on after `cont`.
//
// QEMU runs -nodefaults -cpu qemu64 (the recorded command line) on a 16 MiB file-backed pc.ram
// (share=on, so the file is the RAM oracle; canonical block naming off so old machine types name
// it pc.ram too), after its firmware has run for a second: device state is not the reset one.

import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { readFile, rm, writeFile } from 'node:fs/promises';
import { test, type TestContext } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { findVmdescription, MigCmd, NEED_MORE, parseVmdescription, recordedMachine, StreamDecoder, VmdescLayouts } from '@livemig/protocol';
import { digest, MiB, queryStatus, setCapabilities, waitForStatus } from './migration.ts';
import { type Harness, listeningAddress, withHarness } from './processes.ts';
import { QEMU_LABEL, qemuSkip, ramImage, sha256File, startQemu, writeRamImage } from './qemu.ts';

const SIZE = 16 * MiB;
const IS_10 = QEMU_LABEL === 'QEMU 10.0';
/** Each QEMU's own newest types, and on 7.2 the oldest it offers (no configuration, no footers). */
const MACHINE_TYPES = IS_10 ? ['pc-q35-10.0', 'pc-i440fx-10.0'] : ['pc-i440fx-1.4', 'pc-q35-7.2'];
const opts = { skip: qemuSkip(), timeout: 120_000 };
/** A carried QEMU device as x-query-guest-digest reports it. */
interface Carried {
  idstr: string;
  instanceId: number;
  length: number;
  sha256: string;
  loaded: boolean;
}
const log = (t: TestContext, msg: string): void => t.diagnostic(msg);

function qemuArgs(machine: string, ramFile: string): string[] {
  return [
    '-object', `memory-backend-file,id=pc.ram,size=${SIZE / MiB}M,mem-path=${ramFile},share=on,x-use-canonical-path-for-ramblock-id=off`,
    '-machine', `${machine},memory-backend=pc.ram,accel=tcg`, '-cpu', 'qemu64', '-m', `${SIZE / MiB}M`,
  ];
}

/** A QEMU whose firmware ran for a second, then stopped: pc.ram holds the image plus what the firmware wrote. */
async function ranQemu(h: Harness, machine: string, name: string): Promise<{ qemu: Awaited<ReturnType<typeof startQemu>>; ramFile: string }> {
  const ramFile = h.path(`${name}.ram`);
  await writeRamImage(ramFile, ramImage(SIZE, { stride: 2, dataEnd: 8 * MiB }));
  const qemu = await startQemu(h, name, [...qemuArgs(machine, ramFile), '-S']);
  await qemu.execute('cont');
  await sleep(1_000);
  await qemu.execute('stop');
  return { qemu, ramFile };
}

type Qemu = Awaited<ReturnType<typeof startQemu>>;

/** A chain's last hop: a QEMU of `machine` held (-S) on a zeroed RAM file, waiting for a migration on tcp with `caps`; its address. */
async function incomingQemu(h: Harness, machine: string, ramFile: string, caps: string[]): Promise<{ last: Qemu; uri: string }> {
  await writeFile(ramFile, Buffer.alloc(SIZE));
  const last = await startQemu(h, 'qemu-last', [...qemuArgs(machine, ramFile), '-S', '-incoming', 'defer']);
  await setCapabilities(last, caps);
  await last.execute('migrate-incoming', { uri: 'tcp:127.0.0.1:0' });
  return { last, uri: await listeningAddress(last, 10_000) };
}

/** The sending side says completed, then the receiving side. */
async function bothCompleted(sender: Parameters<typeof waitForStatus>[0], receiver: Parameters<typeof waitForStatus>[0]): Promise<void> {
  await waitForStatus(sender, 'completed', { timeoutMs: 60_000 });
  await waitForStatus(receiver, 'completed', { timeoutMs: 30_000 });
}

/** `cont` on the last QEMU, and its guest runs. */
async function assertRunsOn(last: Qemu): Promise<void> {
  await last.execute('cont');
  await sleep(500);
  assert.equal(await queryStatus(last), 'running', 'the guest runs on the last QEMU');
}

/** Copies stdin to a file and to HOST:PORT (QEMU's exec: migration, teed). */
const TEE_PY = `import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])))
with open(sys.argv[3], 'wb') as f:
    while True:
        b = sys.stdin.buffer.read1(1 << 16)
        if not b:
            break
        f.write(b)
        s.sendall(b)
s.shutdown(socket.SHUT_WR)
s.settimeout(30)
s.recv(1)
`;

/** sha256 of each device section's data in a QEMU stream file, by "idstr#instance", measured by its own VMDESCRIPTION. */
async function sectionHashes(file: string): Promise<Map<string, { length: number; sha256: string }>> {
  const stream = await readFile(file);
  const found = findVmdescription(stream, 0);
  assert.ok(found !== undefined, `${file} ends in a VMDESCRIPTION`);
  const layouts = new VmdescLayouts(parseVmdescription(found.json, found.offset));
  const decoder = new StreamDecoder({
    ram: { attachBlocks: (blocks) => blocks.map((b) => new Uint8Array(b.length)) },
    deviceLayout: (s, kind) => layouts.take(s.idstr, s.instanceId, kind),
    maxCommand: MigCmd.SWITCHOVER_START + 1,
    expectFooters: 'auto',
  });
  const out = new Map<string, { length: number; sha256: string }>();
  decoder.push(stream);
  for (let ev = decoder.next(); ev !== NEED_MORE; ev = decoder.next()) {
    if (ev.kind === 'sectionEnd' && ev.data !== undefined) out.set(`${ev.idstr}#${ev.instanceId}`, { length: ev.data.length, sha256: createHash('sha256').update(ev.data).digest('hex') });
  }
  decoder.end();
  return out;
}

/** `info registers` without the lines that hold no state (none expected to differ). */
async function registers(qemu: Awaited<ReturnType<typeof startQemu>>): Promise<string> {
  return String(await qemu.execute('human-monitor-command', { 'command-line': 'info registers' }));
}

for (const machine of MACHINE_TYPES) {
  const recorded = recordedMachine(machine);

  test(`${QEMU_LABEL} -machine ${machine} → livemig destination (--machine ${machine}), live: RAM equals QEMU's, every QEMU device section carried byte for byte`, opts, (t) =>
    withHarness(async (h) => {
      assert.ok(recorded !== undefined, `${machine} is recorded`);
      const { qemu, ramFile } = await ranQemu(h, machine, 'qemu-src');
      const dst = await h.destination({ incoming: 'tcp', paused: true, guest: ['--machine', machine, '-m', `${SIZE / MiB}M`, '--qemu-devices-only'], capabilities: ['events'] });
      const [host, port] = dst.incomingUri.replace(/^tcp:/, '').split(':') as [string, string];
      const tee = h.path('tee.py');
      const copy = h.path('stream.mig');
      await writeFile(tee, TEE_PY);
      await qemu.execute('migrate', { uri: `exec:python3 ${tee} ${host} ${port} ${copy}` });
      await bothCompleted(qemu, dst);

      const d = await digest(dst);
      assert.deepEqual(
        d.blocks.map((b) => [b.idstr, b.length]),
        [['pc.ram', SIZE], ...recorded.ramBlocks.filter((b) => b.main !== true).map((b) => [b.idstr, b.length])],
        "the destination has QEMU's RAM blocks",
      );
      assert.equal(d.blocks[0]!.sha256, await sha256File(ramFile), "destination pc.ram = QEMU's RAM");
      const sent = await sectionHashes(copy);
      const carried = d.devices['carried'] as Carried[];
      assert.equal(carried.length, [...sent.keys()].filter((k) => k !== 'timer#0' && k !== 'globalstate#0').length, 'every section but timer and globalstate is carried');
      for (const c of carried) {
        assert.ok(c.loaded, `${c.idstr} #${c.instanceId} came with the stream`);
        assert.deepEqual({ length: c.length, sha256: c.sha256 }, sent.get(`${c.idstr}#${c.instanceId}`), `${c.idstr} #${c.instanceId} = the bytes QEMU sent`);
      }
      assert.equal(await queryStatus(dst), 'paused');
      log(t, `${machine}: ${carried.length} QEMU device sections carried (${carried.reduce((n, c) => n + c.length, 0)} B), blocks ${d.blocks.map((b) => b.idstr).join(', ')}`);
    }),
  );

  test(`${QEMU_LABEL} -machine ${machine}, running → livemig destination (--machine ${machine}), postcopy: QEMU's device state arrives in the PACKAGED blob with no VMDESCRIPTION, is walked by the recording, and RAM equals QEMU's`, opts, (t) =>
    withHarness(async (h) => {
      const ramFile = h.path('qemu-src.ram');
      await writeRamImage(ramFile, ramImage(SIZE, { stride: 2, dataEnd: 8 * MiB }));
      // Running: the firmware works on while RAM moves, and postcopy needs a running source.
      const qemu = await startQemu(h, 'qemu-src', qemuArgs(machine, ramFile));
      const caps = ['events', 'postcopy-ram'];
      const dst = await h.destination({ incoming: 'tcp', guest: ['--machine', machine, '-m', `${SIZE / MiB}M`, '--qemu-devices-only'], capabilities: caps });
      await setCapabilities(qemu, caps);
      await qemu.execute('migrate-set-parameters', { 'max-bandwidth': 4 * MiB });
      await qemu.execute('migrate', { uri: dst.incomingUri });
      await waitForStatus(qemu, 'active', { timeoutMs: 10_000 });
      await qemu.execute('migrate-start-postcopy');
      await bothCompleted(qemu, dst);
      assert.ok(qemu.migrationEvents().includes('postcopy-active'), `QEMU MIGRATION events ${qemu.migrationEvents()}`);
      const d = await digest(dst);
      assert.equal(d.blocks[0]!.sha256, await sha256File(ramFile), "destination pc.ram = QEMU's RAM when it stopped");
      const carried = d.devices['carried'] as Carried[];
      assert.ok(carried.length > 0 && carried.every((c) => c.loaded), 'every QEMU device section came in the package');
      assert.equal(await queryStatus(dst), 'running', 'the destination runs the guest after POSTCOPY_RUN');
      log(t, `${machine} postcopy: ${carried.length} QEMU device sections carried; QEMU events ${JSON.stringify(qemu.migrationEvents())}`);
    }),
  );

  test(`${QEMU_LABEL} -machine ${machine} → livemig destination → x-livemig-save-state → livemig source → ${QEMU_LABEL}, both hops live: the last QEMU's RAM and vCPU registers equal the first's, and its guest runs on`, opts, (t) =>
    withHarness(async (h) => {
      const { qemu: first, ramFile: firstRam } = await ranQemu(h, machine, 'qemu-first');
      const regs = await registers(first);
      const guest = ['--machine', machine, '-m', `${SIZE / MiB}M`, '--qemu-devices-only'];
      const dst = await h.destination({ incoming: 'tcp', paused: true, guest, capabilities: ['events', 'return-path'] });
      await setCapabilities(first, ['events', 'return-path']);
      await first.execute('migrate', { uri: dst.incomingUri });
      await bothCompleted(first, dst);
      const held = h.path('held.mig');
      const saved = await dst.execute<{ bytes: number }>('x-livemig-save-state', { filename: held }, 30_000);

      const src = await h.source({ guest, args: ['-S', '--load-state', held, '--capabilities', 'events,return-path'] });
      assert.deepEqual((await digest(src)).devices['carried'], (await digest(dst)).devices['carried'], "the source carries what the destination received");
      const lastRam = h.path('qemu-last.ram');
      const { last, uri } = await incomingQemu(h, machine, lastRam, ['events', 'return-path']);
      await src.execute('migrate', { uri });
      await bothCompleted(src, last);
      assert.equal(await sha256File(lastRam), await sha256File(firstRam), "the last QEMU's pc.ram = the first QEMU's");
      assert.equal(await registers(last), regs, "the last QEMU's vCPU registers = the first's");
      await assertRunsOn(last);
      log(t, `${machine}: held state file ${saved.bytes} B; QEMU → livemig → QEMU with registers equal`);
    }),
  );

  for (const postcopy of [false, true]) {
    test(`${QEMU_LABEL} -machine ${machine} → livemig source (--load-state) → ${QEMU_LABEL}, live${postcopy ? ', postcopy' : ''}: the last QEMU's RAM and vCPU registers equal the first's, and its guest runs on`, opts, (t) =>
      withHarness(async (h) => {
        const caps = postcopy ? ['events', 'return-path', 'postcopy-ram'] : ['events', 'return-path'];
        const { qemu: first, ramFile: firstRam } = await ranQemu(h, machine, 'qemu-first');
        const regs = await registers(first);
        const file = h.path('saved.mig');
        await first.execute('migrate', { uri: `exec:cat > ${file}` });
        await waitForStatus(first, 'completed', { timeoutMs: 60_000 });

        const src = await h.source({ guest: ['--machine', machine, '-m', `${SIZE / MiB}M`, '--qemu-devices-only'], args: ['-S', '--load-state', file, '--capabilities', caps.join(',')] });
        const srcDigest = await digest(src);
        assert.equal(srcDigest.blocks[0]!.sha256, await sha256File(firstRam), "the source's pc.ram = the first QEMU's");
        assert.ok((srcDigest.devices['carried'] as Carried[]).every((c) => c.loaded), 'every carried device came from the file');

        // A postcopy destination's RAM must be on tmpfs or hugetlbfs (QEMU refuses postcopy-ram otherwise).
        const lastRam = postcopy ? `/dev/shm/livemig-e2e-${process.pid}-${machine}.ram` : h.path('qemu-last.ram');
        try {
          const { last, uri } = await incomingQemu(h, machine, lastRam, caps);
          if (postcopy) await src.execute('migrate-set-parameters', { 'max-bandwidth': 4 * MiB });
          await src.execute('migrate', { uri });
          if (postcopy) {
            await waitForStatus(src, 'active', { timeoutMs: 10_000 });
            await src.execute('migrate-start-postcopy');
          }
          await waitForStatus(src, 'completed', { timeoutMs: 60_000 });
          if (postcopy) assert.ok(src.migrationEvents().includes('postcopy-active'), `source MIGRATION events ${src.migrationEvents()}`);
          await waitForStatus(last, 'completed', { timeoutMs: 30_000 });

          assert.equal(await sha256File(lastRam), await sha256File(firstRam), "the last QEMU's pc.ram = the first QEMU's");
          assert.equal(await registers(last), regs, "the last QEMU's vCPU registers = the first's (carried CPU state)");
          await assertRunsOn(last);
        } finally {
          if (postcopy) await rm(lastRam, { force: true });
        }
        log(t, `${machine}${postcopy ? ' postcopy' : ''}: ${(srcDigest.devices['carried'] as Carried[]).length} QEMU device sections sent on; the guest runs on ${QEMU_LABEL}`);
      }),
    );
  }
}

test(`livemig source (--machine ${MACHINE_TYPES[0]}, fresh: no state loaded) → ${QEMU_LABEL}: QEMU accepts the device state recorded from a QEMU that never ran, RAM equals the source's`, opts, (t) =>
  withHarness(async (h) => {
    const machine = MACHINE_TYPES[0]!;
    const src = await h.source({ guest: ['--machine', machine, '-m', `${SIZE / MiB}M`, '--qemu-devices-only', '--fill', 'mixed'], args: ['-S', '--capabilities', 'events,return-path'] });
    const before = await digest(src);
    assert.ok((before.devices['carried'] as Carried[]).every((c) => !c.loaded), 'nothing loaded: the recorded state goes out');
    const lastRam = h.path('qemu-last.ram');
    const { last, uri } = await incomingQemu(h, machine, lastRam, ['events', 'return-path']);
    await src.execute('migrate', { uri });
    await bothCompleted(src, last);
    assert.equal(await sha256File(lastRam), before.blocks[0]!.sha256, "QEMU's pc.ram = the source's");
    log(t, `${machine}: ${(before.devices['carried'] as Carried[]).length} recorded device sections accepted by ${QEMU_LABEL}`);
  }),
);
