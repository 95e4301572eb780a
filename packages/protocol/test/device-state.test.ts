// decodeDeviceState / DeviceStateDump (device-state.ts): device section bytes → fields, in the
// notation of QEMU's analyze-migration.py -d state. The QEMU 7.2 streams are compared with that
// script's own output in packages/cli/test/analyze.test.ts; these are the corners they lack.

import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { decodeDeviceState, DeviceStateDump, type VmdescDevice } from '../src/index.ts';

const where = { sectionId: 3, idstr: 'dev', dataOffset: 100 };

describe('decodeDeviceState', () => {
  it('integers: 2×size hex digits, signed negatives with their value, unsigned never', () => {
    const device: VmdescDevice = {
      name: 'dev',
      instance_id: 0,
      fields: [
        { name: 'a', type: 'int8', size: 1 },
        { name: 'b', type: 'uint8', size: 1 },
        { name: 'c', type: 'int64', size: 8 },
        { name: 'd', type: 'uint64', size: 8 },
        { name: 'e', type: 'int32 le', size: 4 },
        { name: 'f', type: 'uint16 equal', size: 2 },
        { name: 'g', type: 'int16', size: 2 },
      ],
    };
    const data = Buffer.from('ff' + 'ff' + 'fffffffffffffffe' + 'ffffffffffffffff' + '01000000' + '8000' + '0102', 'hex');
    assert.deepEqual(decodeDeviceState(data, device, where), {
      a: '0xff (-1)',
      b: '0xff',
      c: '0xfffffffffffffffe (-2)',
      d: '0xffffffffffffffff',
      e: '0x01000000', // read big-endian, as the script does
      f: '0x8000 (-32768)', // the script reads "uint16 equal" as signed
      g: '0x0102',
    });
  });

  it('bool, byte strings, arrays (array_len and element-by-element index), structs and subsections', () => {
    const device: VmdescDevice = {
      name: 'dev',
      instance_id: 0,
      fields: [
        { name: 'on', type: 'bool', size: 1 },
        { name: 'off', type: 'bool', size: 1 },
        { name: 'buf', type: 'buffer', size: 3 },
        { name: 'none', type: 'unused_buffer', size: 0 },
        { name: 'arr', type: 'uint16', size: 2, array_len: 2 },
        { name: 'el', type: 'uint8', size: 1, index: 0 },
        { name: 'el', type: 'uint8', size: 1, index: 1 },
        {
          name: 'st',
          type: 'struct',
          size: 2,
          array_len: 2,
          struct: { vmsd_name: 'pair', version: 1, fields: [{ name: 'x', type: 'uint8', size: 1 }, { name: 'y', type: 'uint8', size: 1 }] },
        },
      ],
      subsections: [{ vmsd_name: 'dev/extra', version: 2, fields: [{ name: 'z', type: 'uint32', size: 4 }], subsections: [{ vmsd_name: 'dev/deeper', version: 1, fields: [{ name: 'w', type: 'timer', size: 2 }] }] }],
    };
    const sub = (name: string): string => '05' + name.length.toString(16).padStart(2, '0') + Buffer.from(name).toString('hex') + '00000001';
    const hex = '02' + '00' + 'a0b1c2' + '00010002' + '0708' + '1112' + '2122' + sub('dev/extra') + 'deadbeef' + sub('dev/deeper') + 'abcd';
    assert.deepEqual(decodeDeviceState(Buffer.from(hex, 'hex'), device, where), {
      on: true,
      off: false,
      buf: 'a0 b1 c2',
      none: '',
      arr: ['0x0001', '0x0002'],
      el: ['0x07', '0x08'],
      st: [
        { x: '0x11', y: '0x12' },
        { x: '0x21', y: '0x22' },
      ],
      'dev/extra': { z: '0xdeadbeef', 'dev/deeper': { w: 'ab cd' } },
    });
  });
});

describe('DeviceStateDump', () => {
  it('keys sections "idstr (section id)" in stream order; the n-th section of a device gets its n-th description; undescribed ones are left out', () => {
    const dump = new DeviceStateDump({
      page_size: 4096,
      devices: [
        { name: 'd', instance_id: 0, fields: [{ name: 'v', type: 'uint8', size: 1 }] },
        { name: 'd', instance_id: 0, fields: [{ name: 'w', type: 'uint16', size: 2 }] },
      ],
    });
    dump.ramBlocks(2, 'ram', [{ idstr: 'pc.ram', length: 0x4000000 }]);
    dump.deviceSection({ sectionId: 5, idstr: 'd', instanceId: 0, dataOffset: 0 }, Buffer.from('09', 'hex'));
    dump.deviceSection({ sectionId: 6, idstr: 'other', instanceId: 0, dataOffset: 0 }, Buffer.from('09', 'hex'));
    dump.deviceSection({ sectionId: 7, idstr: 'd', instanceId: 0, dataOffset: 0 }, Buffer.from('0a0b', 'hex'));
    assert.deepEqual(JSON.stringify(dump.state), JSON.stringify({ 'ram (2)': { 'section sizes': { 'pc.ram': '0x0000000004000000' } }, 'd (5)': { v: '0x09' }, 'd (7)': { w: '0x0a0b' } }));
  });
});
