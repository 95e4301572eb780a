// The processes' shared flags and QMP commands fail with coded errors: a command line that cannot
// be used is LM_ERR_USAGE (keeping the guest's own error as its cause), a refused QMP command a
// QmpError reply with QEMU's class.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { guestFromFlags, parameterList, QmpCommandError } from '../src/index.ts';

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
