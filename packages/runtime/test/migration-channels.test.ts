// The `channels` argument of migrate / migrate-incoming: each QAPI MigrationAddress form gives
// the URI it stands for; QEMU 10.0's refusals and its input visitor's texts for bad members; the
// union as query-qmp-schema describes it.
import assert from 'node:assert/strict';
import { test } from 'node:test';
import { migrationUri, QMP_MIGRATION_CHANNELS, qmpSchema } from '../src/index.ts';

const main = (addr: Record<string, unknown>): Record<string, unknown> => ({ channels: [{ 'channel-type': 'main', addr }] });
const refusal = (args: Record<string, unknown>, command: 'migrate' | 'migrate-incoming' = 'migrate'): string => {
  try {
    migrationUri(args, command);
  } catch (err) {
    const e = err as { qmpClass?: string; desc?: string; code?: string };
    assert.ok(e.code === 'LM_ERR_QMP_ERROR_REPLY' || e.code === 'LM_ERR_BAD_ADDRESS', `coded: ${e.code}`);
    return e.desc ?? String((err as Error).message);
  }
  return assert.fail('accepted');
};

test('channels: every transport gives the URI it stands for', () => {
  assert.equal(migrationUri({ uri: 'tcp:127.0.0.1:4444' }, 'migrate'), 'tcp:127.0.0.1:4444');
  assert.equal(migrationUri(main({ transport: 'socket', type: 'inet', host: '127.0.0.1', port: '4444' }), 'migrate'), 'tcp:127.0.0.1:4444');
  assert.equal(migrationUri(main({ transport: 'socket', type: 'inet', host: '::1', port: '0' }), 'migrate-incoming'), 'tcp:[::1]:0');
  assert.equal(migrationUri(main({ transport: 'socket', type: 'unix', path: '/run/m.sock' }), 'migrate'), 'unix:/run/m.sock');
  assert.equal(migrationUri(main({ transport: 'socket', type: 'fd', str: '7' }), 'migrate'), 'fd:7');
  assert.equal(migrationUri(main({ transport: 'file', filename: '/tmp/vm.mig', offset: 4096 }), 'migrate'), 'file:/tmp/vm.mig,offset=4096');
  assert.equal(migrationUri(main({ transport: 'exec', args: ['/bin/sh', '-c', 'cat > /tmp/x'] }), 'migrate'), 'exec:cat > /tmp/x');
  assert.equal(migrationUri(main({ transport: 'exec', args: ['dd', 'of=/tmp/my file'] }), 'migrate'), "exec:dd 'of=/tmp/my file'");
});

test("channels: QEMU 10.0's refusals and its input visitor's texts", () => {
  assert.equal(refusal({}), "need either 'uri' or 'channels' argument");
  assert.equal(refusal({ uri: 'tcp:127.0.0.1:1', ...main({ transport: 'socket', type: 'unix', path: '/x' }) }), "need either 'uri' or 'channels' argument");
  const unix = { 'channel-type': 'main', addr: { transport: 'socket', type: 'unix', path: '/x' } };
  assert.equal(refusal({ channels: [unix, unix] }), 'Channel list has more than one main entry');
  assert.equal(refusal({ channels: [unix, unix] }, 'migrate-incoming'), "Channel list must have only one entry, for type 'main'");
  assert.equal(refusal({ channels: [] }), 'Channel list has no main entry');
  assert.equal(refusal({ channels: 'tcp:x:1' }), "Invalid parameter type for 'channels', expected: array");
  assert.equal(refusal(main({ transport: 'socket', type: 'inet', host: 'h' })), "Parameter 'channels[0].addr.port' is missing");
  assert.equal(refusal(main({ transport: 'socket', type: 'inet', host: 'h', port: 4444 })), "Invalid parameter type for 'channels[0].addr.port', expected: string");
  assert.equal(refusal(main({ transport: 'tcp', host: 'h', port: '1' })), "Parameter 'channels[0].addr.transport' does not accept value 'tcp'");
  assert.equal(refusal(main({ transport: 'socket', path: '/x' })), "Parameter 'channels[0].addr.type' is missing");
  assert.equal(refusal(main({ transport: 'socket', type: 'unix', path: '/x', mode: 1 })), "Parameter 'channels[0].addr.mode' is unexpected");
  assert.equal(refusal({ channels: [{ 'channel-type': 'side', addr: unix.addr }] }), "Parameter 'channels[0].channel-type' does not accept value 'side'");
  assert.match(refusal(main({ transport: 'socket', type: 'inet', host: 'h', port: 'http' })), /port "http" is not a number 0-65535/);
  assert.match(refusal(main({ transport: 'socket', type: 'vsock', cid: '3', port: '1' })), /vsock sockets are not supported by livemig/);
});

test('channels: query-qmp-schema shows MigrationAddress and SocketAddress as flat unions (tag, variants)', () => {
  const schema = qmpSchema([{ name: 'migrate', args: { '*channels': QMP_MIGRATION_CHANNELS }, returns: {}, allowOob: false }], []);
  const byName = new Map(schema.map((e) => [e['name'] as string, e]));
  const args = byName.get(byName.get('migrate')!['arg-type'] as string)!;
  const channels = (args['members'] as { name: string; type: string }[])[0]!;
  const element = byName.get(byName.get(channels.type)!['element-type'] as string)!;
  const addr = byName.get((element['members'] as { name: string; type: string }[]).find((m) => m.name === 'addr')!.type)!;
  assert.equal(addr['tag'], 'transport');
  assert.deepEqual((addr['variants'] as { case: string }[]).map((v) => v.case), ['socket', 'exec', 'rdma', 'file']);
  const socket = byName.get((addr['variants'] as { case: string; type: string }[])[0]!.type)!;
  assert.equal(socket['tag'], 'type');
  assert.deepEqual((socket['variants'] as { case: string }[]).map((v) => v.case), ['inet', 'unix', 'vsock', 'fd']);
});
