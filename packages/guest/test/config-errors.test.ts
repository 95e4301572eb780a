// Guest configuration that cannot be built fails with LM_ERR_BAD_GUEST_CONFIG, whatever part is bad.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { Guest, GuestRam, parseBlocks, parseSize, parseWorkload } from '../src/index.ts';

const BAD = { code: 'LM_ERR_BAD_GUEST_CONFIG', name: 'GuestConfigError' };

describe('guest configuration errors', () => {
  it('workload text', () => {
    assert.throws(() => parseWorkload('bogus'), { ...BAD, message: /unknown workload "bogus"/ });
    assert.throws(() => parseWorkload('random:fast'), BAD);
    assert.throws(() => parseWorkload('hotset:0:10'), BAD);
    assert.throws(() => parseWorkload('hotset:1:2:3'), { ...BAD, message: /too many fields/ });
    assert.equal(parseWorkload('idle').kind, 'idle');
  });

  it('sizes and --block specs', () => {
    assert.throws(() => parseSize('lots'), BAD);
    assert.throws(() => parseBlocks(undefined, ['noname']), { ...BAD, message: /--block "noname"/ });
    assert.equal(parseSize('1M'), 1024 * 1024);
  });

  it('RAM block lengths and the Guest itself (before any thread starts)', () => {
    assert.throws(() => new GuestRam([{ idstr: 'a', length: 4095 }]), BAD);
    assert.throws(() => new Guest({ blocks: [], vcpus: 1, workload: parseWorkload('idle'), fill: 'zero', livemigDevices: false }), BAD);
    assert.throws(() => new Guest({ blocks: [{ idstr: 'a', length: 4096 }], vcpus: 65, workload: parseWorkload('idle'), fill: 'zero', livemigDevices: false }), {
      ...BAD,
      message: /--vcpus 65/,
    });
  });
});
