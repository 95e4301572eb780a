// A connected TCP loopback pair for the source's socket tests.

import { once } from 'node:events';
import net from 'node:net';

/** The connecting side and the accepted one, both connected. */
export async function socketPair(): Promise<[net.Socket, net.Socket]> {
  const server = net.createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const accepted = once(server, 'connection') as Promise<[net.Socket]>;
  const client = net.connect((server.address() as net.AddressInfo).port, '127.0.0.1');
  await once(client, 'connect');
  const [peer] = await accepted;
  server.close();
  return [client, peer];
}
