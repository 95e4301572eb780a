import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { describe, it } from 'node:test';
import { fileURLToPath } from 'node:url';
import { within } from './helpers.ts';

const T = { timeout: 30_000 };
const logModule = fileURLToPath(new URL('../src/log.ts', import.meta.url));

/** Run a snippet that has `createLogger` in scope; stderr is not a TTY here. */
async function run(body: string, env: Record<string, string | undefined> = {}): Promise<{ stdout: string; stderr: string }> {
  const script = `import { createLogger } from ${JSON.stringify(logModule)};\n${body}`;
  const childEnv: NodeJS.ProcessEnv = { ...process.env };
  delete childEnv['LIVEMIG_LOG_LEVEL'];
  for (const [k, v] of Object.entries(env)) {
    if (v === undefined) delete childEnv[k];
    else childEnv[k] = v;
  }
  const child = spawn(process.execPath, ['--import', 'tsx', '--input-type=module', '-e', script], {
    env: childEnv,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let stdout = '';
  let stderr = '';
  child.stdout.setEncoding('utf8').on('data', (s: string) => (stdout += s));
  child.stderr.setEncoding('utf8').on('data', (s: string) => (stderr += s));
  try {
    const status = await within(new Promise((resolve) => child.once('close', resolve)), 'logger child', 20_000);
    assert.equal(status, 0, stderr);
  } finally {
    if (child.exitCode === null) child.kill();
  }
  return { stdout, stderr };
}

function jsonLines(text: string): Array<Record<string, unknown>> {
  return text
    .split('\n')
    .filter((l) => l !== '')
    .map((l) => JSON.parse(l) as Record<string, unknown>);
}

describe('createLogger', () => {
  it('writes JSON lines to stderr (not a TTY), stdout untouched; level info by default, per-logger override', T, async () => {
    const { stdout, stderr } = await run(`
      const a = createLogger('source');
      a.info({ pages: 3 }, 'hello');
      a.debug('hidden');
      const b = createLogger('qmp', { level: 'debug' });
      b.debug('shown');
      process.stdout.write('OUT');
    `);
    assert.equal(stdout, 'OUT');
    const lines = jsonLines(stderr);
    assert.deepEqual(
      lines.map((l) => [l['level'], l['name'], l['msg']]),
      [
        [30, 'source', 'hello'],
        [20, 'qmp', 'shown'],
      ],
    );
    assert.equal(lines[0]?.['pages'], 3);
    assert.equal(typeof lines[0]?.['pid'], 'number');
    assert.equal(typeof lines[0]?.['time'], 'number');
  });

  it('takes the level from LIVEMIG_LOG_LEVEL', T, async () => {
    const { stderr } = await run(`const l = createLogger('x'); l.info('info'); l.warn('warn'); l.error('error');`, {
      LIVEMIG_LOG_LEVEL: 'warn',
    });
    assert.deepEqual(
      jsonLines(stderr).map((l) => l['msg']),
      ['warn', 'error'],
    );
  });

  it('warns about an unknown LIVEMIG_LOG_LEVEL and falls back to info', T, async () => {
    const { stderr } = await run(`const l = createLogger('x'); l.debug('debug'); l.info('info');`, {
      LIVEMIG_LOG_LEVEL: 'loud',
    });
    const lines = jsonLines(stderr);
    assert.equal(lines.length, 2);
    assert.match(String(lines[0]?.['msg']), /LIVEMIG_LOG_LEVEL="loud" is not a level/);
    assert.equal(lines[1]?.['msg'], 'info');
  });

  it('pretty output when asked (as for a TTY), still on stderr', T, async () => {
    const { stdout, stderr } = await run(`createLogger('dest', { pretty: true }).info({ n: 1 }, 'pretty hello');`);
    assert.equal(stdout, '');
    assert.match(stderr, /INFO/);
    assert.match(stderr, /pretty hello/);
    assert.match(stderr, /\(dest\/|dest/);
    assert.throws(() => JSON.parse(stderr.split('\n')[0] ?? ''));
  });
});
