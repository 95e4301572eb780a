// The `channels` argument of `migrate` and `migrate-incoming` (QEMU 8.2+; QAPI MigrationChannel):
// the same addresses as a `uri`, as a structure. livemig turns it into the URI it stands for.
//
//   channels: [{ "channel-type": "main",
//                "addr": { "transport": "socket", "type": "inet", "host": "10.0.0.2", "port": "4444" } }]
//                        { "transport": "socket", "type": "unix", "path": "/run/mig.sock" }
//                        { "transport": "socket", "type": "fd", "str": "7" }
//                        { "transport": "exec", "args": ["/bin/sh", "-c", "nc host 4444"] }
//                        { "transport": "file", "filename": "/tmp/vm.mig", "offset": 0 }

import { formatAddress, type MigrationAddress } from './address.ts';
import { AddressError, QmpError, RuntimeErrorCode } from './errors.ts';
import { checkQmpValue, qmpEnum, type QmpType, qmpUnion } from './qmp-schema.ts';

const INET = { host: 'str', port: 'str', '*numeric': 'bool', '*to': 'int', '*ipv4': 'bool', '*ipv6': 'bool', '*keep-alive': 'bool' } as const;

/** QAPI SocketAddress (QEMU 10.0): the socket transports, `type` picking one. */
const SOCKET_ADDRESS = qmpUnion({}, 'type', {
  inet: INET,
  unix: { path: 'str', '*abstract': 'bool', '*tight': 'bool' },
  vsock: { cid: 'str', port: 'str' },
  fd: { str: 'str' },
});

/** QAPI MigrationAddress: `transport` picks the endpoint's kind. */
const MIGRATION_ADDRESS = qmpUnion({}, 'transport', {
  socket: SOCKET_ADDRESS,
  exec: { args: ['str'] },
  rdma: INET,
  file: { filename: 'str', offset: 'int' },
});

/** migrate's and migrate-incoming's `channels` member: a list of QAPI MigrationChannel. */
export const QMP_MIGRATION_CHANNELS: QmpType = [{ 'channel-type': qmpEnum(['main', 'cpr']), addr: MIGRATION_ADDRESS }];

/** A refusal with QEMU's text, sent back as a GenericError. */
function refuse(desc: string): QmpError {
  return new QmpError(RuntimeErrorCode.QMP_ERROR_REPLY, desc, { qmpClass: 'GenericError', desc });
}

/** One shell word: QEMU runs exec's `args` as they are; livemig's exec: runs a /bin/sh command line. */
function shellWord(arg: string): string {
  return /^[A-Za-z0-9_@%+=:,./-]+$/.test(arg) ? arg : `'${arg.replaceAll("'", `'\\''`)}'`;
}

/** The address a MigrationAddress stands for; throws QEMU's (or livemig's) refusal. */
function addressOf(addr: Record<string, unknown>): MigrationAddress {
  switch (addr['transport']) {
    case 'socket':
      switch (addr['type']) {
        case 'inet': {
          const port = String(addr['port']);
          if (!/^[0-9]{1,5}$/.test(port) || Number(port) > 65535) throw new AddressError(port, `port ${JSON.stringify(port)} is not a number 0-65535 (service names are not supported)`);
          return { transport: 'tcp', host: String(addr['host']), port: Number(port) };
        }
        case 'unix':
          if (addr['abstract'] === true) throw refuse('abstract unix sockets are not supported by livemig');
          return { transport: 'unix', path: String(addr['path']) };
        case 'fd': {
          const fd = String(addr['str']);
          if (!/^[0-9]+$/.test(fd)) throw new AddressError(fd, `fd ${JSON.stringify(fd)} is not a descriptor number (named fds are not supported)`);
          return { transport: 'fd', fd: Number(fd) };
        }
        default:
          throw refuse(`${String(addr['type'])} sockets are not supported by livemig`);
      }
    case 'exec': {
      const args = addr['args'] as string[];
      if (args.length === 0) throw refuse("Parameter 'args' must not be empty");
      // The very argv QEMU builds from an exec: URI gives that command back.
      const command = args.length === 3 && args[0] === '/bin/sh' && args[1] === '-c' ? args[2]! : args.map(shellWord).join(' ');
      return { transport: 'exec', command };
    }
    case 'file': {
      const offset = addr['offset'] as number;
      if (offset < 0) throw refuse("Parameter 'offset' expects uint64");
      return { transport: 'file', path: String(addr['filename']), offset };
    }
    default:
      throw refuse('rdma: is not supported');
  }
}

/**
 * The URI a `migrate` or `migrate-incoming` asks for: its `uri`, or what its `channels` say.
 * Exactly one of the two, as QEMU 10.0 checks, with its texts; a `channels` value is checked
 * member by member as QEMU's input visitor does.
 */
export function migrationUri(args: Record<string, unknown>, command: 'migrate' | 'migrate-incoming'): string {
  const uri = args['uri'];
  const channels = args['channels'];
  if ((uri === undefined) === (channels === undefined)) throw refuse("need either 'uri' or 'channels' argument");
  if (uri !== undefined) return String(uri);
  const bad = checkQmpValue(QMP_MIGRATION_CHANNELS, channels, 'channels');
  if (bad !== undefined) throw refuse(bad);
  const list = channels as { 'channel-type': string; addr: Record<string, unknown> }[];
  if (command === 'migrate-incoming') {
    if (list.length !== 1) throw refuse("Channel list must have only one entry, for type 'main'");
  } else {
    for (const type of ['main', 'cpr']) {
      if (list.filter((c) => c['channel-type'] === type).length > 1) throw refuse(`Channel list has more than one ${type} entry`);
    }
  }
  const main = list.find((c) => c['channel-type'] === 'main');
  if (main === undefined) throw refuse('Channel list has no main entry');
  if (list.some((c) => c['channel-type'] === 'cpr')) throw refuse("livemig does not support a 'cpr' channel");
  return formatAddress(addressOf(main.addr));
}
