import assert from 'node:assert/strict';
import { describe, it } from 'node:test';
import { formatAddress, parseAddress, toSocketAddress, type MigrationAddress } from '../src/index.ts';

describe('parseAddress: valid', () => {
  const cases: Array<[string, MigrationAddress, string?]> = [
    ['tcp:127.0.0.1:4444', { transport: 'tcp', host: '127.0.0.1', port: 4444 }],
    ['tcp:localhost:0', { transport: 'tcp', host: 'localhost', port: 0 }],
    ['tcp::4444', { transport: 'tcp', host: '', port: 4444 }],
    ['tcp:[::1]:65535', { transport: 'tcp', host: '::1', port: 65535 }],
    ['tcp:[fe80::1%lo]:1', { transport: 'tcp', host: 'fe80::1%lo', port: 1 }],
    ['unix:/tmp/x.sock', { transport: 'unix', path: '/tmp/x.sock' }],
    ['unix:rel/x', { transport: 'unix', path: 'rel/x' }],
    ['fd:3', { transport: 'fd', fd: 3 }],
    ['exec:cat > /tmp/out', { transport: 'exec', command: 'cat > /tmp/out' }],
    ['exec:a:b:c', { transport: 'exec', command: 'a:b:c' }],
    ['file:/tmp/m.bin', { transport: 'file', path: '/tmp/m.bin', offset: 0 }],
    ['file:/tmp/m.bin,offset=4096', { transport: 'file', path: '/tmp/m.bin', offset: 4096 }],
    ['file:/tmp/m.bin,offset=0x1000', { transport: 'file', path: '/tmp/m.bin', offset: 4096 }, 'file:/tmp/m.bin,offset=4096'],
    ['file:/tmp/m.bin,offset=4k', { transport: 'file', path: '/tmp/m.bin', offset: 4096 }, 'file:/tmp/m.bin,offset=4096'],
    ['file:/tmp/a,b,offset=1M', { transport: 'file', path: '/tmp/a,b', offset: 1048576 }, 'file:/tmp/a,b,offset=1048576'],
    ['file:/x,offset=0', { transport: 'file', path: '/x', offset: 0 }, 'file:/x'],
    ['defer', { transport: 'defer' }],
  ];
  for (const [text, expected, formatted] of cases) {
    it(`${text} round-trips`, () => {
      const parsed = parseAddress(text);
      assert.deepEqual(parsed, expected);
      assert.equal(formatAddress(parsed), formatted ?? text);
    });
  }
});

describe('parseAddress: invalid (LM_ERR_BAD_ADDRESS)', () => {
  const cases: Array<[string, RegExp]> = [
    ['', /missing transport prefix/],
    ['localhost:4444', /unknown transport "localhost"/],
    ['http://x', /unknown transport "http"/],
    ['rdma:1.2.3.4:5', /rdma: is not supported/],
    ['tcp:127.0.0.1', /missing ":PORT"/],
    ['tcp:127.0.0.1:', /port "" is not a number/],
    ['tcp:127.0.0.1:http', /port "http" is not a number/],
    ['tcp:127.0.0.1:65536', /port 65536 is above 65535/],
    ['tcp:127.0.0.1:-1', /port "-1" is not a number/],
    ['tcp:127.0.0.1:4444,ipv4', /socket options .* not supported/],
    ['tcp:::1:4444', /IPv6 host must be written in brackets/],
    ['tcp:[::1:4444', /no closing "\]"/],
    ['tcp:[::1]4444', /expected ":PORT" after/],
    ['tcp:[127.0.0.1]:4444', /is not an IPv6 address/],
    ['tcp:a b:1', /is not a host name/],
    ['unix:', /unix socket path is empty/],
    [`unix:/${'x'.repeat(120)}`, /longer than the 107/],
    ['fd:', /is not a descriptor number/],
    ['fd:-1', /is not a descriptor number/],
    ['fd:migfd', /named fds are not supported/],
    ['fd:99999999999', /out of range/],
    ['exec:', /exec command is empty/],
    ['exec:   ', /exec command is empty/],
    ['file:', /file path is empty/],
    ['file:,offset=1', /file path is empty/],
    ['file:/x,offset=', /offset "" is not a byte count/],
    ['file:/x,offset=-5', /offset "-5" is not a byte count/],
    ['file:/x,offset=1.5', /offset "1.5" is not a byte count/],
    ['file:/x,offset=99999E', /offset "99999E" is not a byte count/],
    ['Defer', /missing transport prefix/],
  ];
  for (const [text, message] of cases) {
    it(JSON.stringify(text), () => {
      assert.throws(
        () => parseAddress(text),
        (err: unknown) => {
          const e = err as { code?: unknown; message: string; address?: unknown; name?: unknown };
          assert.equal(e.code, 'LM_ERR_BAD_ADDRESS');
          assert.equal(e.name, 'AddressError');
          assert.equal(e.address, text);
          assert.match(e.message, message);
          assert.ok(e.message.includes(JSON.stringify(text)), 'message quotes the address');
          return true;
        },
      );
    });
  }
});

describe('toSocketAddress', () => {
  it('inet with the port as a string, as query-migrate reports it', () => {
    assert.deepEqual(toSocketAddress(parseAddress('tcp:127.0.0.1:40123')), [
      { type: 'inet', host: '127.0.0.1', port: '40123' },
    ]);
    assert.deepEqual(toSocketAddress(parseAddress('tcp:[::1]:1')), [{ type: 'inet', host: '::1', port: '1' }]);
  });
  it('unix, fd, and nothing for non-sockets', () => {
    assert.deepEqual(toSocketAddress(parseAddress('unix:/run/m.sock')), [{ type: 'unix', path: '/run/m.sock' }]);
    assert.deepEqual(toSocketAddress(parseAddress('fd:7')), [{ type: 'fd', str: '7' }]);
    assert.deepEqual(toSocketAddress(parseAddress('exec:true')), []);
    assert.deepEqual(toSocketAddress(parseAddress('file:/x')), []);
    assert.deepEqual(toSocketAddress(parseAddress('defer')), []);
  });
  it('formats IPv6 with brackets', () => {
    assert.equal(formatAddress({ transport: 'tcp', host: '::', port: 5 }), 'tcp:[::]:5');
  });
});
