// QMP introspection as QEMU 7.2 has it, on real livemig processes: query-commands, query-events,
// query-name (--name), query-version, query-qmp-schema (every command and event described, the
// server checking arguments from the same descriptions), SHUTDOWN on quit. QEMU 7.2 itself no
// longer has query-events; livemig keeps it, in its old [{name}] shape. Then the same shapes
// side by side with a real QEMU 7.2 (skipped locally when QEMU is missing, as the interop tests).

import assert from 'node:assert/strict';
import { test } from 'node:test';
import { type Child, withHarness } from './helpers/processes.ts';
import { qemuSkip, startQemu } from './helpers/qemu.ts';

const T = { timeout: 60_000 };
/** Members livemig has from a later QEMU than the 7.2 it is compared with (QEMU 10.0's migrate and migrate-incoming). */
const NEWER_QEMU_MEMBERS: Record<string, string[]> = {
  migrate: ['*channels', '*uri'],
  'migrate-incoming': ['*channels', '*uri'],
};
const GUEST = ['-m', '16M'];

type SchemaInfo = { name: string; 'meta-type': string; [key: string]: unknown };

/** query-qmp-schema as a lookup, with an entry's argument members resolved to {name: type}. */
async function schemaOf(c: Child): Promise<{ byName: Map<string, SchemaInfo>; members(typeName: string): Record<string, string> }> {
  const list = await c.execute<SchemaInfo[]>('query-qmp-schema');
  const byName = new Map(list.map((e) => [e.name, e]));
  const resolve = (t: string): string => {
    const e = byName.get(t);
    assert.ok(e !== undefined, `${c.name}: type ${t} is in the schema`);
    if (e['meta-type'] === 'builtin') return t;
    if (e['meta-type'] === 'array') return `[${resolve(String(e['element-type']))}]`;
    return e['meta-type']; // object, enum, alternate: compared by kind only
  };
  return {
    byName,
    members(typeName) {
      const t = byName.get(typeName);
      assert.equal(t?.['meta-type'], 'object', `${c.name}: ${typeName} is an object type`);
      const out: Record<string, string> = {};
      for (const m of t!['members'] as { name: string; type: string; default?: null }[]) {
        out[`${Object.hasOwn(m, 'default') ? '*' : ''}${m.name}`] = resolve(m.type);
      }
      return out;
    },
  };
}

async function argsOf(c: Child, command: string): Promise<Record<string, string>> {
  const s = await schemaOf(c);
  const entry = s.byName.get(command);
  assert.equal(entry?.['meta-type'], 'command', `${c.name}: ${command} is a command in the schema`);
  return s.members(String(entry!['arg-type']));
}

test('both processes: query-name, query-version, query-commands/events, and a schema describing every one', T, () =>
  withHarness(async (h) => {
    const src = await h.source({ guest: GUEST, args: ['--name', 'guest-a'] });
    const dst = await h.destination({ incoming: 'defer', guest: GUEST });
    assert.deepEqual(await src.execute('query-name'), { name: 'guest-a' });
    assert.deepEqual(await dst.execute('query-name'), {}, 'no --name: {} as QEMU without -name');
    for (const c of [src, dst]) {
      const v = await c.execute<{ qemu: Record<string, number>; package: string }>('query-version');
      assert.deepEqual(v.qemu, { micro: 0, minor: 2, major: 7 });
      assert.match(v.package, /^livemig \d+\.\d+\.\d+/);

      const commands = (await c.execute<{ name: string }[]>('query-commands')).map((x) => x.name);
      const events = (await c.execute<{ name: string }[]>('query-events')).map((x) => x.name);
      for (const name of ['query-qmp-schema', 'query-events', 'query-name', 'query-version', 'quit', 'query-migrate']) assert.ok(commands.includes(name), `${c.name} has ${name}`);
      for (const name of ['STOP', 'RESUME', 'SHUTDOWN', 'MIGRATION']) assert.ok(events.includes(name), `${c.name} declares ${name}`);
      if (c === src) assert.ok(events.includes('MIGRATION_PASS'));

      // Every command and event is in the schema, each command with described (object) arguments.
      const s = await schemaOf(c);
      for (const name of commands) {
        const e = s.byName.get(name);
        assert.equal(e?.['meta-type'], 'command', `${c.name}: ${name} in the schema`);
        s.members(String(e!['arg-type']));
      }
      for (const name of events) assert.equal(s.byName.get(name)?.['meta-type'], 'event', `${c.name}: event ${name} in the schema`);
      assert.deepEqual(s.members(String(s.byName.get('SHUTDOWN')!['arg-type'])), { guest: 'bool', reason: 'enum' });
      assert.deepEqual(s.members(String(s.byName.get('MIGRATION')!['arg-type'])), { status: 'enum' });
    }
    assert.deepEqual(await argsOf(src, 'migrate'), {
      '*uri': 'str',
      '*channels': '[object]',
      '*blk': 'bool',
      '*inc': 'bool',
      '*detach': 'bool',
      '*resume': 'bool',
    });
    assert.deepEqual(await argsOf(dst, 'migrate-incoming'), { '*uri': 'str', '*channels': '[object]' });
    assert.equal((await schemaOf(dst)).byName.get('migrate-recover')?.['allow-oob'], true);
    assert.equal((await argsOf(src, 'migrate-set-parameters'))['*downtime-limit'], 'int');
  }),
);

test('the schema is what the server checks: missing, unexpected and mistyped arguments get QEMU messages', T, () =>
  withHarness(async (h) => {
    const src = await h.source({ guest: GUEST });
    const desc = (args: Record<string, unknown>): Promise<string> =>
      src.execute('migrate', args).then(
        () => assert.fail('migrate accepted'),
        (e: { desc?: string }) => String(e.desc),
      );
    // QEMU 10.0's text: uri became optional when `channels` came (8.2).
    assert.equal(await desc({}), "need either 'uri' or 'channels' argument");
    assert.equal(await desc({ uri: 5 }), "Invalid parameter type for 'uri', expected: string");
    assert.equal(await desc({ uri: 'tcp:127.0.0.1:1', speed: 'fast' }), "Parameter 'speed' is unexpected");
    const p = await src.execute('migrate-set-parameters', { 'downtime-limit': 'soon' }).catch((e: { desc?: string }) => e.desc);
    assert.equal(p, "Invalid parameter type for 'downtime-limit', expected: integer");
    assert.equal(await src.execute('query-status', { verbose: true }).catch((e: { desc?: string }) => e.desc), "Parameter 'verbose' is unexpected");
    assert.deepEqual(await src.execute('query-migrate'), {}, 'nothing was started');
  }),
);

test('quit: SHUTDOWN {guest:false, reason:"host-qmp-quit"} (before the reply, as QEMU 7.2), then exit 0', T, () =>
  withHarness(async (h) => {
    for (const c of [await h.source({ guest: GUEST }), await h.destination({ incoming: 'defer', guest: GUEST })]) {
      assert.deepEqual(await c.execute('quit'), {});
      const e = await c.waitForEvent('SHUTDOWN', undefined, 15_000);
      assert.deepEqual(e.data, { guest: false, reason: 'host-qmp-quit' });
      assert.deepEqual(await c.waitForExit(), { code: 0, signal: null });
    }
  }),
);

test('SIGTERM: SHUTDOWN {guest:false, reason:"host-signal"}, as QEMU, then exit 143', T, () =>
  withHarness(async (h) => {
    for (const c of [await h.source({ guest: GUEST }), await h.destination({ incoming: 'defer', guest: GUEST })]) {
      process.kill(c.pid, 'SIGTERM');
      const e = await c.waitForEvent('SHUTDOWN', undefined, 15_000);
      assert.deepEqual(e.data, { guest: false, reason: 'host-signal' });
      assert.deepEqual(await c.waitForExit(), { code: 143, signal: null });
    }
  }),
);

test('the same shapes from a real QEMU 7.2: query-name, query-version, SHUTDOWN, and the arguments of the commands both have', { ...T, skip: qemuSkip() }, () =>
  withHarness(async (h) => {
    const qemu = await startQemu(h, 'qemu', ['-machine', 'none', '-name', 'guest-a']);
    const src = await h.source({ guest: GUEST, args: ['--name', 'guest-a'] });
    const dst = await h.destination({ incoming: 'defer', guest: GUEST });
    assert.deepEqual(await src.execute('query-name'), await qemu.execute('query-name'));
    const qv = await qemu.execute<{ qemu: Record<string, number>; package: string }>('query-version');
    const lv = await src.execute<{ qemu: Record<string, number>; package: string }>('query-version');
    assert.deepEqual(Object.keys(lv).sort(), Object.keys(qv).sort());
    assert.deepEqual(Object.keys(lv.qemu).sort(), Object.keys(qv.qemu).sort());
    assert.equal(typeof qv.package, typeof lv.package);

    // Every command and event livemig shares with QEMU takes the same arguments (QEMU may have more
    // optional ones); builtin types must agree, composite ones by kind.
    const q = await schemaOf(qemu);
    let compared = 0;
    for (const c of [src, dst]) {
      const l = await schemaOf(c);
      for (const [name, entry] of l.byName) {
        const kind = entry['meta-type'];
        if (kind !== 'command' && kind !== 'event') continue;
        const theirs = q.byName.get(name);
        if (theirs === undefined) continue; // livemig's own (x-query-guest-digest)
        assert.equal(theirs['meta-type'], kind, name);
        compared++;
        const ours = l.members(String(entry['arg-type']));
        const qemus = q.members(String(theirs['arg-type']));
        for (const [member, type] of Object.entries(ours)) {
          // livemig's own members carry its prefix (x-livemig-stall-timeout …); QEMU has none of them.
          if (member.replace(/^\*/, '').startsWith('x-livemig-')) continue;
          // cpr-exec's parameters come from QEMUs after 7.2 (mode from 8.2, cpr-exec later).
          if (['mode', 'cpr-exec-command'].includes(member.replace(/^\*/, '')) && name.endsWith('-parameters')) continue;
          // Members of a later QEMU (its `channels`, 8.2+), which livemig takes as well.
          if (NEWER_QEMU_MEMBERS[name]?.includes(member) === true) continue;
          const qt = qemus[member];
          assert.ok(qt !== undefined, `${c.name}: ${name}'s ${member} is in QEMU's ${name} too (${JSON.stringify(qemus)})`);
          if (['str', 'int', 'bool', 'number'].includes(qt)) assert.equal(type, qt, `${name}.${member}`);
        }
        for (const [member] of Object.entries(qemus)) {
          // QEMU 8.2 made `uri` optional (either it or `channels`): livemig follows.
          const optionalSince = NEWER_QEMU_MEMBERS[name]?.includes(`*${member}`) === true;
          if (!member.startsWith('*') && !optionalSince) assert.ok(member in ours, `${c.name}: ${name} requires ${member} as QEMU does`);
        }
        if (theirs['allow-oob'] === true) assert.equal(entry['allow-oob'], true, `${name} allows OOB as in QEMU`);
      }
    }
    assert.ok(compared >= 20, `compared ${compared} commands and events with QEMU's`);
    // SHUTDOWN on quit carries the same data.
    await qemu.execute('quit');
    const qe = await qemu.waitForEvent('SHUTDOWN', undefined, 15_000);
    await src.execute('quit');
    const le = await src.waitForEvent('SHUTDOWN', undefined, 15_000);
    assert.deepEqual(le.data, qe.data);
  }),
);
