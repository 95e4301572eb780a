// The VFIO v1 migration region driven register by register: every device_state value and every
// transition between them, the save and resume sequences, and each access the kernel would refuse.

import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { describe, test } from 'node:test';
import {
  GuestErrorCode,
  VFIO_DATA_OFFSET,
  VfioMigInfo,
  VfioV1Region,
  VfioV1State,
  vfioV1StateIsError,
  vfioV1StateValid,
  vfioV1TransitionAllowed,
} from '../src/index.ts';

const { STOP, RUNNING, SAVING, RESUMING } = VfioV1State;
const PRE_COPY = SAVING | RUNNING;
const ERROR = SAVING | RESUMING;
const CHUNK = 1024;
const RECORD = 4 + CHUNK;

function region(): VfioV1Region {
  // 16 chunks, 3 records per buffer: a full save takes 6 buffers.
  return new VfioV1Region({ memoryBytes: 16 * CHUNK, chunkBytes: CHUNK, dataAreaBytes: 3 * RECORD + 100, seed: 7 });
}

function throwsCode(fn: () => unknown, code: string, errno?: string): void {
  assert.throws(fn, (err: { code?: string; errno?: string }) => {
    assert.equal(err.code, code);
    if (errno !== undefined) assert.equal(err.errno, errno);
    return true;
  });
}

const setState = (r: VfioV1Region, s: number): void => r.write(VfioMigInfo.DEVICE_STATE, 4, s);
const pending = (r: VfioV1Region): number => r.read(VfioMigInfo.PENDING_BYTES, 8);
const dataOffset = (r: VfioV1Region): number => r.read(VfioMigInfo.DATA_OFFSET, 8);
const dataSize = (r: VfioV1Region): number => r.read(VfioMigInfo.DATA_SIZE, 8);

/** Drive a region into `s` from reset along allowed moves. */
function inState(s: number): VfioV1Region {
  const r = region();
  if (s !== RUNNING) setState(r, s);
  assert.equal(r.deviceState, s);
  return r;
}

/** The save sequence until pending_bytes is `downToBytes` or less (0: all): the buffers read, in order. */
function saveAll(r: VfioV1Region, during?: () => void, downToBytes = 0): Buffer[] {
  const out: Buffer[] = [];
  for (let p = pending(r); p > downToBytes; p = pending(r)) {
    const off = dataOffset(r);
    const size = dataSize(r);
    const buf = Buffer.alloc(size);
    r.readData(off, buf, 0, size);
    out.push(buf);
    during?.();
  }
  return out;
}

function resumeAll(r: VfioV1Region, buffers: Buffer[]): void {
  for (const b of buffers) {
    const off = dataOffset(r);
    r.writeData(off, b, 0, b.length);
    r.write(VfioMigInfo.DATA_SIZE, 8, b.length);
  }
}

describe('device_state values', () => {
  test('the header rule: with _RESUMING set no other bit may be; 110b is the error state', () => {
    const valid = [0, 1, 2, 3, 4].map(vfioV1StateValid);
    assert.deepEqual(valid, [true, true, true, true, true]);
    assert.deepEqual([5, 6, 7].map(vfioV1StateValid), [false, false, false]);
    assert.deepEqual([0, 1, 2, 3, 4, 5, 6, 7].map(vfioV1StateIsError), [false, false, false, false, false, false, true, false]);
  });

  test('reset state is _RUNNING; reserved reads 0 and ignores writes', () => {
    const r = region();
    assert.equal(r.read(VfioMigInfo.DEVICE_STATE, 4), RUNNING);
    r.write(VfioMigInfo.RESERVED, 4, 0xdead);
    assert.equal(r.read(VfioMigInfo.RESERVED, 4), 0);
  });

  for (const bad of [5, 6, 7, 8, 0xffffffff, -1, 1.5]) {
    test(`writing ${bad} is refused with EINVAL in every valid state, and the state stays`, () => {
      for (const s of [STOP, RUNNING, SAVING, PRE_COPY, RESUMING]) {
        const r = inState(s);
        throwsCode(() => setState(r, bad), GuestErrorCode.VFIO_INVALID_STATE, 'EINVAL');
        assert.equal(r.deviceState, s);
      }
    });
  }
});

describe('the transition table', () => {
  const valid = [STOP, RUNNING, SAVING, PRE_COPY, RESUMING];
  const refused = new Set([`${SAVING}>${RESUMING}`, `${PRE_COPY}>${RESUMING}`, `${RESUMING}>${SAVING}`, `${RESUMING}>${PRE_COPY}`]);
  for (const from of valid) {
    for (const to of valid) {
      const ok = !refused.has(`${from}>${to}`);
      test(`${from} → ${to}: ${ok ? 'taken' : 'EINVAL, state kept'}`, () => {
        assert.equal(vfioV1TransitionAllowed(from, to), ok);
        const r = inState(from);
        if (ok) {
          setState(r, to);
          assert.equal(r.deviceState, to);
        } else {
          throwsCode(() => setState(r, to), GuestErrorCode.VFIO_BAD_TRANSITION, 'EINVAL');
          assert.equal(r.deviceState, from);
        }
      });
    }
  }

  test('the error state: only device_state reads and a reset work there', () => {
    const r = inState(RESUMING);
    dataOffset(r);
    r.writeData(VFIO_DATA_OFFSET, Buffer.alloc(10), 0, 10);
    throwsCode(() => r.write(VfioMigInfo.DATA_SIZE, 8, 10), GuestErrorCode.VFIO_DEVICE_ERROR, 'EIO');
    assert.equal(r.read(VfioMigInfo.DEVICE_STATE, 4), ERROR);
    for (const s of [STOP, RUNNING, SAVING, PRE_COPY, RESUMING, ERROR]) throwsCode(() => setState(r, s), GuestErrorCode.VFIO_DEVICE_ERROR, 'EIO');
    for (const at of [VfioMigInfo.PENDING_BYTES, VfioMigInfo.DATA_OFFSET, VfioMigInfo.DATA_SIZE]) throwsCode(() => r.read(at, 8), GuestErrorCode.VFIO_DEVICE_ERROR);
    throwsCode(() => r.read(VfioMigInfo.RESERVED, 4), GuestErrorCode.VFIO_DEVICE_ERROR);
    throwsCode(() => r.readData(VFIO_DATA_OFFSET, Buffer.alloc(1), 0, 1), GuestErrorCode.VFIO_DEVICE_ERROR);
    throwsCode(() => r.writeData(VFIO_DATA_OFFSET, Buffer.alloc(1), 0, 1), GuestErrorCode.VFIO_DEVICE_ERROR);
    const before = Buffer.from(r.memory);
    r.tick(10);
    assert.deepEqual(r.memory, before, 'a broken device does not run');
    r.reset();
    assert.equal(r.deviceState, RUNNING);
    setState(r, PRE_COPY);
    assert.ok(pending(r) > 0);
  });

  test('resume data naming a chunk outside the device memory also breaks it', () => {
    const r = inState(RESUMING);
    dataOffset(r);
    const rec = Buffer.alloc(RECORD);
    rec.writeUInt32BE(16, 0);
    r.writeData(VFIO_DATA_OFFSET, rec, 0, RECORD);
    throwsCode(() => r.write(VfioMigInfo.DATA_SIZE, 8, RECORD), GuestErrorCode.VFIO_DEVICE_ERROR, 'EIO');
    assert.equal(r.deviceState, ERROR);
  });
});

describe('register access', () => {
  test('wrong width, no register there, read-only fields', () => {
    const r = region();
    throwsCode(() => r.read(VfioMigInfo.DEVICE_STATE, 8), GuestErrorCode.VFIO_OUT_OF_RANGE);
    throwsCode(() => r.read(VfioMigInfo.PENDING_BYTES, 4), GuestErrorCode.VFIO_OUT_OF_RANGE);
    throwsCode(() => r.read(12, 4), GuestErrorCode.VFIO_OUT_OF_RANGE);
    throwsCode(() => r.read(32, 8), GuestErrorCode.VFIO_OUT_OF_RANGE);
    setState(r, PRE_COPY);
    throwsCode(() => r.write(VfioMigInfo.PENDING_BYTES, 8, 0), GuestErrorCode.VFIO_OUT_OF_RANGE);
    throwsCode(() => r.write(VfioMigInfo.DATA_OFFSET, 8, 0), GuestErrorCode.VFIO_OUT_OF_RANGE);
  });

  test('outside _SAVING and _RESUMING the sequence registers mean nothing', () => {
    for (const s of [STOP, RUNNING]) {
      const r = inState(s);
      throwsCode(() => pending(r), GuestErrorCode.VFIO_SEQUENCE, 'EINVAL');
      throwsCode(() => dataOffset(r), GuestErrorCode.VFIO_SEQUENCE);
      throwsCode(() => dataSize(r), GuestErrorCode.VFIO_SEQUENCE);
      throwsCode(() => r.write(VfioMigInfo.DATA_SIZE, 8, 0), GuestErrorCode.VFIO_SEQUENCE);
      throwsCode(() => r.readData(VFIO_DATA_OFFSET, Buffer.alloc(1), 0, 1), GuestErrorCode.VFIO_SEQUENCE);
      throwsCode(() => r.writeData(VFIO_DATA_OFFSET, Buffer.alloc(1), 0, 1), GuestErrorCode.VFIO_SEQUENCE);
    }
    throwsCode(() => pending(inState(RESUMING)), GuestErrorCode.VFIO_SEQUENCE);
  });
});

describe('the save sequence', () => {
  test('pre-copy then stop-and-copy hands out every chunk; the device memory rebuilt from the buffers equals it', () => {
    const src = region();
    setState(src, PRE_COPY);
    assert.equal(pending(src), 16 * RECORD);
    assert.equal(pending(src), 16 * RECORD, 'a repeated read at step a has no side effect');
    // A running device dirties as it goes: pre-copy gets down to about one chunk, never to 0.
    const precopy = saveAll(src, () => src.tick(1), RECORD);
    assert.ok(precopy.length >= 6, `${precopy.length} buffers`);
    // The device ran the whole time: more to send, until it stops.
    src.tick(5);
    assert.ok(pending(src) > 0);
    setState(src, SAVING);
    const before = Buffer.from(src.memory);
    src.tick(5);
    assert.deepEqual(src.memory, before, 'a stopped device writes nothing');
    const final = saveAll(src);
    assert.equal(pending(src), 0);
    throwsCode(() => dataOffset(src), GuestErrorCode.VFIO_SEQUENCE, 'EINVAL');
    setState(src, STOP);

    const dst = region();
    dst.memory.fill(0);
    setState(dst, RESUMING);
    resumeAll(dst, [...precopy, ...final]);
    assert.deepEqual(dst.memory, src.memory);
    assert.equal(dst.stats.resumedBuffers, precopy.length + final.length);
    assert.equal(dst.stats.resumedBytes, src.stats.savedBytes);
    setState(dst, RUNNING);
    assert.equal(dst.deviceState, RUNNING);
  });

  test('data_offset and data_size repeat their values; every buffer holds whole records', () => {
    const r = inState(PRE_COPY);
    pending(r);
    assert.equal(dataOffset(r), VFIO_DATA_OFFSET);
    assert.equal(dataOffset(r), VFIO_DATA_OFFSET);
    const size = dataSize(r);
    assert.equal(size, 3 * RECORD);
    assert.equal(dataOffset(r), VFIO_DATA_OFFSET);
    assert.equal(dataSize(r), size);
    assert.equal(pending(r), 13 * RECORD);
  });

  test('out of order: data_offset before pending_bytes, data_size before data_offset, data before data_size, pending_bytes before data_size', () => {
    const r = inState(PRE_COPY);
    throwsCode(() => dataOffset(r), GuestErrorCode.VFIO_SEQUENCE, 'EINVAL');
    throwsCode(() => dataSize(r), GuestErrorCode.VFIO_SEQUENCE);
    pending(r);
    throwsCode(() => dataSize(r), GuestErrorCode.VFIO_SEQUENCE);
    dataOffset(r);
    throwsCode(() => r.readData(VFIO_DATA_OFFSET, Buffer.alloc(4), 0, 4), GuestErrorCode.VFIO_SEQUENCE);
    throwsCode(() => pending(r), GuestErrorCode.VFIO_SEQUENCE);
    throwsCode(() => r.write(VfioMigInfo.DATA_SIZE, 8, 1), GuestErrorCode.VFIO_SEQUENCE);
    throwsCode(() => r.writeData(VFIO_DATA_OFFSET, Buffer.alloc(1), 0, 1), GuestErrorCode.VFIO_SEQUENCE);
    assert.equal(dataSize(r), 3 * RECORD);
  });

  test('reads past data_size or before data_offset are refused', () => {
    const r = inState(SAVING);
    pending(r);
    dataOffset(r);
    const size = dataSize(r);
    const buf = Buffer.alloc(size + 1);
    r.readData(VFIO_DATA_OFFSET, buf, 0, size);
    r.readData(VFIO_DATA_OFFSET + size - 1, buf, 0, 1);
    throwsCode(() => r.readData(VFIO_DATA_OFFSET, buf, 0, size + 1), GuestErrorCode.VFIO_OUT_OF_RANGE, 'EINVAL');
    throwsCode(() => r.readData(VFIO_DATA_OFFSET + size, buf, 0, 1), GuestErrorCode.VFIO_OUT_OF_RANGE);
    throwsCode(() => r.readData(VFIO_DATA_OFFSET - 1, buf, 0, 1), GuestErrorCode.VFIO_OUT_OF_RANGE);
  });

  test('pre-copy → stop-and-copy keeps the sequence where it was (the user need not drain first)', () => {
    const r = inState(PRE_COPY);
    pending(r);
    dataOffset(r);
    setState(r, SAVING);
    const size = dataSize(r);
    assert.equal(size, 3 * RECORD);
    assert.equal(pending(r), 13 * RECORD);
  });

  test('leaving _SAVING drops the tracking; saving again starts over with everything', () => {
    const r = inState(PRE_COPY);
    saveAll(r);
    setState(r, RUNNING);
    throwsCode(() => pending(r), GuestErrorCode.VFIO_SEQUENCE);
    setState(r, PRE_COPY);
    assert.equal(pending(r), 16 * RECORD);
  });
});

describe('the resume sequence', () => {
  test('data before data_offset, data_size before data_offset, past the area, data_size over what was written', () => {
    const r = inState(RESUMING);
    throwsCode(() => r.writeData(VFIO_DATA_OFFSET, Buffer.alloc(1), 0, 1), GuestErrorCode.VFIO_SEQUENCE, 'EINVAL');
    throwsCode(() => r.write(VfioMigInfo.DATA_SIZE, 8, 0), GuestErrorCode.VFIO_SEQUENCE);
    dataOffset(r);
    throwsCode(() => r.writeData(VFIO_DATA_OFFSET + r.dataAreaBytes, Buffer.alloc(1), 0, 1), GuestErrorCode.VFIO_OUT_OF_RANGE, 'EINVAL');
    throwsCode(() => r.writeData(VFIO_DATA_OFFSET - 1, Buffer.alloc(1), 0, 1), GuestErrorCode.VFIO_OUT_OF_RANGE);
    r.writeData(VFIO_DATA_OFFSET, Buffer.alloc(RECORD), 0, RECORD);
    throwsCode(() => r.write(VfioMigInfo.DATA_SIZE, 8, RECORD + 1), GuestErrorCode.VFIO_OUT_OF_RANGE);
    r.write(VfioMigInfo.DATA_SIZE, 8, RECORD);
    // Each buffer begins with data_offset again.
    throwsCode(() => r.writeData(VFIO_DATA_OFFSET, Buffer.alloc(1), 0, 1), GuestErrorCode.VFIO_SEQUENCE);
    assert.equal(r.stats.resumedBuffers, 1);
    assert.deepEqual(r.memory.subarray(0, CHUNK), Buffer.alloc(CHUNK));
  });

  test('_RESUMING does not run the device; _RUNNING after it does', () => {
    const r = inState(RESUMING);
    const before = Buffer.from(r.memory);
    r.tick(3);
    assert.deepEqual(r.memory, before);
    setState(r, RUNNING);
    r.tick(3);
    assert.notDeepEqual(r.memory, before);
  });
});

test('docs/state-machines/vfio-v1.md: its diagram draws exactly the device_state writes the region takes', () => {
  const doc = readFileSync(new URL('../../../docs/state-machines/vfio-v1.md', import.meta.url), 'utf8');
  const mermaid = /```mermaid\n([\s\S]*?)```/.exec(doc)?.[1] ?? '';
  const drawn = new Set([...mermaid.matchAll(/^\s*(\w+)\s*-->\s*(\w+)\s*:\s*write$/gm)].map((m) => `${m[1]} --> ${m[2]}`));
  const names: Record<number, string> = { [STOP]: 'STOP', [RUNNING]: 'RUNNING', [SAVING]: 'STOP_COPY', [PRE_COPY]: 'PRE_COPY', [RESUMING]: 'RESUMING' };
  const taken = new Set<string>();
  for (const from of [STOP, RUNNING, SAVING, PRE_COPY, RESUMING]) {
    for (const to of [STOP, RUNNING, SAVING, PRE_COPY, RESUMING]) {
      if (from === to) continue;
      const r = inState(from);
      try {
        setState(r, to);
        taken.add(`${names[from]} --> ${names[to]}`);
      } catch {
        // refused: no edge
      }
    }
  }
  assert.deepEqual([...drawn].sort(), [...taken].sort());
});
