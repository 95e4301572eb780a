// The processes' shared flags and QMP commands fail with coded errors: a command line that cannot
// be used is LM_ERR_USAGE (keeping the guest's own error as its cause), a refused QMP command a
// QmpError reply with QEMU's class.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { capabilityList, guestFromFlags, parameterList, QmpCommandError, settingsFromFlags } from '../src/index.ts';

describe('machine errors', () => {
  it('guest flags the guest refuses are a usage error, with the guest error as cause', () => {
    let caught: unknown;
    try {
      guestFromFlags({ workload: 'bogus' });
    } catch (err) {
      caught = err;
    }
    assert.equal((caught as { code?: string }).code, 'LM_ERR_USAGE');
    assert.equal((caught as Error).name, 'UsageError');
    assert.equal(((caught as Error).cause as { code?: string }).code, 'LM_ERR_BAD_GUEST_CONFIG');
    assert.throws(() => guestFromFlags({ memory: 'lots' }), { code: 'LM_ERR_USAGE', message: /"lots" is not a size/ });
  });

  it('--vcpus, --fill and --parameters are checked here', () => {
    assert.throws(() => guestFromFlags({ vcpus: '0' }), { code: 'LM_ERR_USAGE', message: /--vcpus "0"/ });
    assert.throws(() => guestFromFlags({ fill: 'ones' }), { code: 'LM_ERR_USAGE', message: /--fill "ones"/ });
    assert.throws(() => parameterList('max-bandwidth'), { code: 'LM_ERR_USAGE' });
    assert.equal(guestFromFlags({}).guest.vcpus, 1);
  });

  it('--capabilities: NAME, NAME=on, NAME=off; a process default stays marked until set', () => {
    assert.deepEqual(capabilityList('events,return-path=off,xbzrle=on'), [
      { capability: 'events', state: true },
      { capability: 'return-path', state: false },
      { capability: 'xbzrle', state: true },
    ]);
    assert.throws(() => capabilityList('events=yes'), { code: 'LM_ERR_USAGE', message: /"events=yes": the value must be on or off/ });
    const byDefault = settingsFromFlags({ capabilities: 'events' }, { 'return-path': true });
    assert.equal(byDefault.capabilities['return-path'], true);
    assert.deepEqual([...byDefault.byDefault], ['return-path']);
    const off = settingsFromFlags({ capabilities: 'return-path=off' }, { 'return-path': true });
    assert.equal(off.capabilities['return-path'], false);
    assert.deepEqual([...off.byDefault], []);
    const explicit = settingsFromFlags({ capabilities: 'return-path' }, { 'return-path': true });
    assert.deepEqual([...explicit.byDefault], [], 'set explicitly: no longer a default');
  });

  it('QmpCommandError is a QMP error reply with its class and the message as desc', () => {
    const e = new QmpCommandError('no such thing', 'DeviceNotFound');
    assert.equal(e.code, 'LM_ERR_QMP_ERROR_REPLY');
    assert.equal(e.qmpClass, 'DeviceNotFound');
    assert.equal(e.desc, 'no such thing');
    assert.equal(e.name, 'QmpCommandError');
    assert.equal(new QmpCommandError('x').qmpClass, 'GenericError');
    assert.deepEqual(JSON.parse(JSON.stringify(e)), {
      name: 'QmpCommandError',
      code: 'LM_ERR_QMP_ERROR_REPLY',
      message: 'no such thing',
      qmpClass: 'DeviceNotFound',
      desc: 'no such thing',
    });
  });
});
