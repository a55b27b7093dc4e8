// Servers that go away: a restart after a crash (the client retries with
// backoff, then syncs), a draining server in a two-server cluster (reconnect
// frame and 1001: the client moves to the server named), a proxy address
// (need_proxy), 4009 (replaced: no reconnect) and 4011 (revoked: no reconnect).  Each test starts its own
// servers.

import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { after, test } from "node:test";

import { PreConnectionError, preConnection } from "../allspark.js";
import { ServerProcess, client, closeAll, freePort, key, tcpProxy, tempDir, waitUntil } from "./helpers.mjs";

const servers = [];
const run = `r${Date.now().toString(36)}`;

async function server(options) {
  const s = new ServerProcess(options);
  servers.push(s);
  return s.start();
}

after(async () => {
  await closeAll();
  await Promise.all(servers.map((s) => s.kill()));
});

test("a crashed server comes back: the client retries with backoff, reconnects and syncs", async () => {
  const s = await server();
  const bob = await client(s.baseUrl, `${run}-bob1`);
  const alice = await client(s.baseUrl, `${run}-alice1`);
  await alice.send({ dest_id: bob.nodeId, payload: "before" });
  await waitUntil(() => bob.got.message.length === 1, 10_000, "the first message");
  await s.kill(); // kill -9: no close frame, no reconnect frame
  await waitUntil(() => bob.got.disconnected.length === 1 && alice.state !== "ready", 10_000, "the disconnects");
  assert.equal(bob.got.disconnected[0].willReconnect, true);
  const sending = alice.send({ dest_id: bob.nodeId, payload: "while down" }); // waits for the server
  await waitUntil(() => bob.got.reconnecting.filter((r) => r.error !== null).length >= 2, 10_000, "failed attempts");
  const failed = bob.got.reconnecting.filter((r) => r.error !== null);
  assert.ok(failed.length >= 2);
  assert.ok(bob.got.reconnecting.every((r) => r.delay >= 0 && r.delay < 1000)); // bounded by maxDelay
  await s.start({ force: true });
  const accepted = await sending;
  assert.ok(["delivered", "stored"].includes(accepted.status));
  await waitUntil(() => bob.got.message.length === 2, 20_000, "the message sent while down");
  assert.deepEqual(bob.got.message.map((m) => [m.seq, m.payload]), [[1, "before"], [2, "while down"]]);
  assert.equal(bob.got.ready.length, 2);
  assert.equal(bob.got.ready[1].reconnected, true);
  assert.equal(bob.stats.reconnections, 1);
});

test("a draining server's clients move to the server it names and lose nothing", async () => {
  const shared = tempDir("allspark-js-cluster-");
  const store = `--store=sqlite://${join(shared, "allspark.db")}`;
  const args = [store, "--server-heartbeat=0.5", "--server-dead-after=3"];
  // the receiver knows only the first server: it can only find the second
  // through the reconnect frame of the first when that one drains
  const draining = await server({ args });
  const receiver = await client(draining.baseUrl, `${run}-mover`);
  assert.equal(receiver.serverId, draining.serverId);
  const other = await server({ args });
  // both live in each other's view and old enough to be handed out (5 s)
  await waitUntil(async () => {
    const health = await (await fetch(`${draining.baseUrl}/health`)).json();
    const cluster = health.cluster ?? [];
    return cluster.length === 2 && cluster.every((e) => e.state === "live" && Date.now() - e.started_ms > 5500);
  }, 30_000, "a cluster of two live servers", 200);
  const sender = await client(other.baseUrl, `${run}-talker`);
  const total = 30;
  const answers = [];
  for (let i = 0; i < total; i += 1) {
    if (i === 10) draining.proc.kill("SIGTERM");
    answers.push(await sender.send({ dest_id: receiver.nodeId, payload: i }));
  }
  assert.ok(answers.every((x) => ["delivered", "stored"].includes(x.status)));
  await waitUntil(() => receiver.got.message.length === total, 30_000, "every message at the receiver");
  // each once (a copy that went to the old server comes by the sync that fills the hole)
  assert.deepEqual(receiver.got.message.map((m) => m.payload).sort((x, y) => x - y), [...Array(total).keys()]);
  const [gone] = receiver.got.disconnected;
  assert.equal(gone.code, 1001);
  assert.equal(gone.movingTo, other.baseUrl);
  assert.equal(receiver.serverId, other.serverId);
  assert.equal(receiver.got.ready.at(-1).reconnected, true);
  assert.deepEqual(receiver.urls, [draining.baseUrl, other.baseUrl]);
  await draining.stop();
});

test("need_proxy: the client connects through the proxy address the server answers", async () => {
  const port = await freePort();
  const proxy = await tcpProxy(port);
  try {
    const s = await server({ port, args: [`--proxy_80_port=127.0.0.1:${proxy.port}`] });
    const info = await preConnection(s.baseUrl, key(`${run}-proxied`), { needProxy: true });
    assert.equal(info.node.proxy_address, `127.0.0.1:${proxy.port}`);
    const c = await client(s.baseUrl, `${run}-proxied`, { needProxy: true });
    assert.equal(c.nodeId, `${run}-proxied`);
    assert.ok(proxy.connections >= 1);
    assert.equal((await c.ping()).op, "pong");
    await c.close();
  } finally {
    await proxy.close();
  }
});

let plain = null;

/** One server for the tests below: one connection per node, unacked messages kept 1.5 s. */
function plainServer() {
  plain ??= server({ args: ["--max-connections-per-node=1", "--retention-seconds=1.5", "--purge-interval=0.2"] });
  return plain;
}

test("need_proxy on a cluster without a proxy address: no_proxy", async () => {
  const s = await plainServer();
  await assert.rejects(preConnection(s.baseUrl, key(`${run}-np`), { needProxy: true }),
    (e) => e instanceof PreConnectionError && e.status === 503 && e.code === "no_proxy");
});

test("4009: a connection replaced by a newer one of its node does not reconnect", async () => {
  const s = await plainServer();
  const old = await client(s.baseUrl, `${run}-twice`);
  const stopped = new Promise((resolve) => old.once("error", resolve));
  const newer = await client(s.baseUrl, `${run}-twice`);
  await stopped;
  assert.equal(old.got.disconnected[0].code, 4009);
  assert.equal(old.got.disconnected[0].willReconnect, false);
  assert.equal(old.state, "closed");
  assert.equal(newer.state, "ready");
  assert.equal((await newer.ping()).op, "pong");
});

test("4011: a node the app's backend revoked does not reconnect", async () => {
  const dir = tempDir("allspark-js-api-");
  const apiKey = `js-test-api-key-${run}-0123456789`;
  writeFileSync(join(dir, "api-key"), `${apiKey}\n`, { mode: 0o600 });
  const s = await server({ args: [`--api-key-file=${join(dir, "api-key")}`] });
  const nodeId = `${run}-revoked`;
  const revoked = await client(s.baseUrl, nodeId);
  const stopped = new Promise((resolve) => revoked.once("error", resolve));
  const answer = await fetch(`${s.baseUrl}/api/v1/nodes/${nodeId}/disconnect`, {
    method: "POST",
    headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
    body: JSON.stringify({ revoke_until: Math.floor(Date.now() / 1000) + 60, reason: "test" }),
  });
  assert.equal(answer.status, 200, await answer.text());
  await stopped;
  assert.equal(revoked.got.disconnected[0].code, 4011);
  assert.equal(revoked.got.disconnected[0].willReconnect, false);
  assert.equal(revoked.state, "closed");
});

test("messages removed by retention before they were acked: a gap event, then what came after", async () => {
  const s = await plainServer();
  const bobId = `${run}-late`;
  await (await client(s.baseUrl, bobId)).close(); // known from now on
  const alice = await client(s.baseUrl, `${run}-early`);
  for (let i = 0; i < 5; i += 1) await alice.send({ dest_id: bobId, payload: `old ${i}` });
  // a look that acks nothing, until the purge has run
  await waitUntil(async () => {
    const probe = await client(s.baseUrl, bobId, { autoAck: false });
    const purged = probe.got.gap.some((gap) => gap.upto === 5); // all five are gone
    await probe.close();
    return purged;
  }, 20_000, "the retention purge", 300);
  for (let i = 0; i < 2; i += 1) await alice.send({ dest_id: bobId, payload: `new ${i}` });
  const bob = await client(s.baseUrl, bobId);
  assert.deepEqual(bob.got.gap, [{ after: 0, upto: 5 }]);
  assert.deepEqual(bob.got.message.map((m) => [m.seq, m.payload]), [[6, "new 0"], [7, "new 1"]]);
});

test("rate_limited messages are sent again with their ids until accepted: none lost, none twice", async () => {
  const s = await server({ args: ["--max-rate=100", "--max-burst=10"] });
  const bob = await client(s.baseUrl, `${run}-flooded`);
  const alice = await client(s.baseUrl, `${run}-flooder`);
  const total = 40;
  const answers = await Promise.all([...Array(total).keys()].map((i) => alice.send({ dest_id: bob.nodeId, payload: i })));
  assert.equal(new Set(answers.map((a) => a.id)).size, total);
  await waitUntil(() => bob.got.message.length === total, 20_000, "every message");
  assert.deepEqual(bob.got.message.map((m) => m.payload).sort((x, y) => x - y), [...Array(total).keys()]);
});
