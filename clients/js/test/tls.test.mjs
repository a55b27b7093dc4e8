// wss:// with a certificate from a private CA (made by tests/test_js_client.py):
// the client connects when Node trusts that CA (a `ws` subclass given `ca`, or
// NODE_EXTRA_CA_CERTS), and refuses the server otherwise.  Pre-connection is
// plain HTTP on a second port, as in tests/e2e/test_client_tls.py.

import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readFileSync } from "node:fs";
import { after, before, test } from "node:test";

import { WebSocket } from "ws";

import { ConnectionClosedError } from "../allspark.js";
import { ServerProcess, client, closeAll, config, freePort, key } from "./helpers.mjs";

const tls = config.tls ?? null;
const skip = tls ? false : "no test CA: run through tests/test_js_client.py";
let server;

before(async () => {
  if (!tls) return;
  const tlsPort = await freePort();
  const plainPort = await freePort();
  // --port is the TLS one (what pre-connection names); /health and pre-connection on the plain one
  server = await new ServerProcess({
    port: plainPort,
    args: [`--port=${tlsPort}`, `--listen=ssl:${tlsPort}:interface=127.0.0.1:privateKey=${tls.key}:certKey=${tls.cert}`,
      `--listen=tcp:${plainPort}:interface=127.0.0.1`],
  }).start();
});

after(async () => {
  await closeAll();
  await server?.stop();
});

/** `ws` with a CA to trust. */
function trusting(caPath) {
  const ca = readFileSync(caPath);
  return class extends WebSocket {
    constructor(url) {
      super(url, { ca });
    }
  };
}

test("a client whose ws trusts the CA connects over wss://", { skip }, async () => {
  const c = await client(server.baseUrl, "tls-alice", { WebSocket: trusting(tls.ca) });
  assert.equal((await c.ping()).op, "pong");
});

test("a certificate from a CA it does not trust is refused, attempt after attempt", { skip }, async () => {
  for (const WebSocketImpl of [undefined, trusting(tls.other_ca)]) { // the system's store, another CA
    const c = await client(server.baseUrl, "tls-bob", { connect: false, WebSocket: WebSocketImpl,
      reconnect: { initialDelay: 10, maxDelay: 20, maxAttempts: 2 } });
    await assert.rejects(c.connect(), (e) => e instanceof ConnectionClosedError && /after 2 attempts/.test(e.message));
    assert.equal(c.got.ready.length, 0);
  }
});

test("NODE_EXTRA_CA_CERTS is enough: Node's fetch and ws both trust it", { skip }, async () => {
  const script = `
    import { connect } from ${JSON.stringify(new URL("../allspark.js", import.meta.url).href)};
    const client = await connect({ url: process.argv[1], authKey: process.argv[2] });
    console.log(JSON.stringify({ serverId: client.serverId, pong: (await client.ping()).op }));
    await client.close();`;
  const output = await new Promise((resolve, reject) => {
    execFile(process.execPath, ["--input-type=module", "-e", script, server.baseUrl, key("tls-carol")],
      { env: { ...process.env, NODE_EXTRA_CA_CERTS: tls.ca }, timeout: 30_000 },
      (error, stdout, stderr) => (error ? reject(new Error(`${error.message}\n${stderr}`)) : resolve(stdout)));
  });
  assert.equal(JSON.parse(output).pong, "pong");
});
