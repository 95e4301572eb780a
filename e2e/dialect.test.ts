// The stream a livemig source writes follows its machine type's dialect (protocol dialect.ts), as
// QEMU's own does: checked on the bytes, by analyzing what a source wrote to a file.

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { setTimeout as sleep } from 'node:timers/promises';
import { digest, waitForStatus } from './helpers/migration.ts';
import { analyzeFile, withHarness } from './helpers/processes.ts';

const T = { timeout: 60_000 };

for (const { machine, qemuVersion, switchoverStart } of [
  { machine: 'none', qemuVersion: undefined, switchoverStart: false },
  { machine: 'none', qemuVersion: '10.0', switchoverStart: true },
  { machine: 'pc-i440fx-9.2', qemuVersion: '10.0', switchoverStart: false },
  { machine: 'pc-q35-10.0', qemuVersion: undefined, switchoverStart: true },
] as const) {
  const as = `--machine ${machine}${qemuVersion === undefined ? '' : ` --qemu-version ${qemuVersion}`}`;
  test(`${as}: the stream ${switchoverStart ? 'has' : 'has no'} SWITCHOVER_START, names the machine type, and decodes to the source's RAM`, T, () =>
    withHarness(async (h) => {
      const guest = ['--block', 'm0:16M', '--qemu-devices-only', '--machine', machine, ...(qemuVersion === undefined ? [] : ['--qemu-version', qemuVersion])];
      const src = await h.source({ guest: [...guest, '-S', '--fill', 'mixed'] });
      const before = await digest(src);
      const file = h.path('stream.mig');
      await src.execute('migrate', { uri: `file:${file}` });
      await waitForStatus(src, 'completed');
      let r = await analyzeFile(file);
      // The file is complete once the source has closed it; completed comes right before that.
      for (let i = 0; i < 50 && r.code !== 0; i++) {
        await sleep(100);
        r = await analyzeFile(file);
      }
      assert.equal(r.code, 0, `analyze: ${r.stderr}`);
      const commands = (r.report!['commands'] as { name: string }[]).map((c) => c.name);
      assert.equal(commands.includes('SWITCHOVER_START'), switchoverStart, `commands: ${commands.join(' ')}`);
      assert.equal(r.report!['machine'], machine);
      assert.equal(r.report!.ramBlocks[0]!.sha256, before.blocks[0]!.sha256, 'the stream holds the source RAM');
    }));
}

test('mapped-ram between livemig processes: a dirtying guest saved to a file (pages rewritten in place over several passes) loads into a destination with the stopped source RAM', T, () =>
  withHarness(async (h) => {
    const guest = ['-m', '32M', '--workload', 'incrementer:4', '--machine', 'pc-q35-10.0'];
    const src = await h.source({ guest, args: ['--capabilities', 'mapped-ram', '--parameters', `max-bandwidth=${16 * 2 ** 20}`] });
    const file = h.path('mapped.mig');
    await src.execute('migrate', { uri: `file:${file}` });
    const info = await waitForStatus(src, 'completed');
    assert.ok((info.ram?.['dirty-sync-count'] ?? 0) >= 3, `dirty-sync-count ${info.ram?.['dirty-sync-count']}: pages were written again`);
    const stopped = await digest(src);
    await sleep(300);
    const dst = await h.destination({ incoming: `file:${file}`, paused: true, guest });
    await waitForStatus(dst, 'completed', { timeoutMs: 20_000 });
    const loaded = await digest(dst);
    assert.deepEqual(loaded.blocks.map((b) => b.sha256), stopped.blocks.map((b) => b.sha256), 'every block = the stopped source');
    assert.equal(loaded.pattern.consistent, true, `pattern ${JSON.stringify(loaded.pattern)}`);
  }));

test('mapped-ram refusals, in QEMU\'s words where QEMU has them', T, () =>
  withHarness(async (h) => {
    const src = await h.source({ guest: ['-m', '32M'], args: ['--capabilities', 'mapped-ram'] });
    await assert.rejects(src.execute('migrate', { uri: 'tcp:127.0.0.1:1' }), /Mapped-ram migration requires a file: URI/);
    await assert.rejects(src.execute('migrate', { uri: `file:${h.path('x.mig')},offset=4096` }), /livemig writes mapped-ram files from offset 0 only/);
    await src.execute('migrate-set-capabilities', { capabilities: [{ capability: 'xbzrle', state: true }] });
    await assert.rejects(src.execute('migrate', { uri: `file:${h.path('x.mig')}` }), /Mapped-ram migration is incompatible with xbzrle/);
  }));
