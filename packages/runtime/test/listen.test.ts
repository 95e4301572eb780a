// Unix sockets are created owner-only whatever the umask (issue 14 finding 6): under umask 000
// a QMP or migration socket used to come out 0777, so any local user could `migrate` or `quit`.
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { statSync } from 'node:fs';
import net from 'node:net';
import { join } from 'node:path';
import { listenChannel, listenServer, QmpServer } from '../src/index.ts';
import { within, withTempDir } from './helpers.ts';

/** Run `fn` with the process umask at 000, then put the old one back. */
async function underUmask0<T>(fn: () => Promise<T>): Promise<T> {
  const previous = process.umask(0);
  try {
    return await fn();
  } finally {
    process.umask(previous);
  }
}

const mode = (path: string): number => statSync(path).mode & 0o777;

test('QMP, migration and plain unix listeners are created 0600 under umask 000, and the umask is left as it was', () =>
  withTempDir((dir) =>
    underUmask0(async () => {
      const qmpPath = join(dir, 'q.sock');
      const qmp = await QmpServer.listen(`unix:${qmpPath}`);
      const migPath = join(dir, 'm.sock');
      const mig = await listenChannel(`unix:${migPath}`);
      const rawPath = join(dir, 'r.sock');
      const raw = net.createServer();
      await listenServer(raw, `unix:${rawPath}`);
      try {
        assert.equal(process.umask(), 0, 'the umask is restored after each listen');
        assert.equal(mode(qmpPath).toString(8), '600', 'QMP socket');
        assert.equal(mode(migPath).toString(8), '600', 'migration socket');
        assert.equal(mode(rawPath).toString(8), '600', 'listenServer socket');
        // The owner still connects.
        const c = net.connect(migPath);
        const accepted = await within(mig.accepted, 'the migration connection');
        accepted.destroy();
        c.destroy();
      } finally {
        await qmp.close();
        await mig.close();
        await new Promise<void>((resolve) => raw.close(() => resolve()));
      }
    }),
  ));
