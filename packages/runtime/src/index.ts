/**
 * Process glue shared by the livemig source and destination: a QEMU-compatible QMP server and
 * client, migration addresses (`tcp:`, `unix:`, `fd:`, `exec:`, `file:`, `defer`), channels as
 * duplex streams, and the per-process pino logger.
 *
 * @example
 * ```ts
 * import { QmpServer, QmpClient, listenChannel, connectChannel, createLogger } from '@livemig/runtime';
 *
 * const log = createLogger('destination');
 * const qmp = await QmpServer.listen('unix:/tmp/dst.qmp');
 * qmp.register('query-migrate', () => ({ status: 'active' }));
 * const incoming = await listenChannel('tcp:127.0.0.1:0');
 * log.info({ address: incoming.addressText }, 'listening');
 * const socket = await incoming.accepted;
 * qmp.emitEvent('MIGRATION', { status: 'active' });
 *
 * const client = await QmpClient.connect('unix:/tmp/dst.qmp', { timeoutMs: 5000 });
 * await client.execute('query-migrate');
 * await client.waitForEvent('MIGRATION', (e) => e.data?.['status'] === 'active');
 * ```
 * @packageDocumentation
 */

export {
  formatAddress,
  parseAddress,
  toAddress,
  toSocketAddress,
  type MigrationAddress,
  type SocketAddressInfo,
  type Transport,
} from './address.ts';
export { connectChannel, type ConnectChannelOptions } from './channel.ts';
export { acceptWithOnread, listenChannel, type ChannelListener, type ListenChannelOptions } from './channel-listen.ts';
export { PositionedFileChannel } from './positioned-file-channel.ts';
export { openIncomingPipe } from './incoming-pipe.ts';
export { adoptWithOnread, detachFd, type OnreadOptions, socketFd } from './socket-handle.ts';
export { keepForProcessLife } from './keep-for-process-life.ts';
export {
  looksLikeTlsHello,
  OBJECT_TYPES,
  ObjectRegistry,
  parseObjectOption,
  peerDistinguishedName,
  pumpOnread,
  secureClientSide,
  secureServerSide,
  TlsError,
  type Authz,
  type TlsClientOptions,
  type TlsCreds,
  type TlsServerOptions,
  type UserObject,
} from './tls.ts';
export { type HandedConnection, WorkerConnection } from './worker-connection.ts';
export { CommandThread } from './command-thread.ts';
export {
  AddressError,
  ChannelError,
  QmpError,
  RuntimeError,
  RuntimeErrorCode,
  type RuntimeErrorCodeValue,
} from './errors.ts';
export { DEFAULT_MAX_MESSAGE_BYTES, encodeQmpLine, JsonStreamSplitter, type JsonStreamHandlers } from './json-stream.ts';
export { boundAddress, listenServer } from './listen.ts';
export { createLogger, setStatusLine, type Logger, type LoggerOptions, type LogLevel, type StatusLine } from './log.ts';
export {
  QmpClient,
  type QmpClientOptions,
  type QmpEvent,
  type QmpExecuteOptions,
  type QmpGreeting,
} from './qmp-client.ts';
export {
  QmpServer,
  type QmpCommandContext,
  type QmpHandler,
  type QmpRegisterOptions,
  type QmpServerOptions,
  type QmpVersion,
} from './qmp-server.ts';
export {
  qmpEnum,
  qmpSchema,
  checkQmpValue,
  qmpUnion,
  QMP_UNION,
  type QmpUnion,
  QMP_ENUM_VALUES,
  type QmpBuiltin,
  type QmpCommandDescription,
  type QmpEnum,
  type QmpEventDescription,
  type QmpMembers,
  type QmpType,
} from './qmp-schema.ts';
export { migrationUri, QMP_MIGRATION_CHANNELS } from './migration-channels.ts';
