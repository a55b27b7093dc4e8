// hello, pre-connection (both forms), send/receive, user-wide sends, errors
// and bad input: against one real server.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import {
  AllsparkClient, AllsparkError, ConnectionClosedError, PreConnectionError, TimeoutError, backoffDelay, preConnection,
} from "../allspark.js";
import { client, closeAll, cut, freePort, key, sharedServerUrl, stopSharedServer, waitUntil } from "./helpers.mjs";

let url;
const run = `m${Date.now().toString(36)}`;

before(async () => {
  url = await sharedServerUrl();
});

after(async () => {
  await closeAll();
  await stopSharedServer();
});

describe("connecting", () => {
  test("hello: ready once connected and synced, with who the server believes we are", async () => {
    const alice = await client(url, `${run}-alice-laptop`, { clientId: `${run}-alice`, connect: false });
    const ready = new Promise((r) => alice.once("ready", r));
    const hello = await alice.connect();
    assert.equal(hello.op, "hello");
    assert.equal(hello.node_id, `${run}-alice-laptop`);
    assert.equal(alice.nodeId, `${run}-alice-laptop`);
    assert.equal(alice.clientId, `${run}-alice`);
    assert.equal(typeof hello.max_message_size, "number");
    const detail = await ready;
    assert.equal(detail.reconnected, false);
    assert.equal(detail.serverId, hello.server_id);
    assert.equal(alice.state, "ready");
    assert.equal((await alice.ping()).op, "pong");
    // the global WebSocket when there is one (browsers, Node 22, --experimental-websocket), else ws
    const expected = globalThis.WebSocket ?? (await import("ws")).WebSocket;
    assert.equal(alice._socket.constructor, expected);
  });

  test("both pre-connection forms answer a ws_url the client connects to", async () => {
    for (const form of ["v1", "seed"]) {
      const info = await preConnection(url, key(`${run}-forms`), { form });
      assert.match(info.node.ws_url, /^ws:\/\/127\.0\.0\.1:\d+\/ws\?auth_key=.+&validation_token=.+/);
      const c = await client(url, `${run}-form-${form}`, { preConnectionForm: form });
      assert.equal(c.nodeId, `${run}-form-${form}`);
    }
  });

  test("a refused auth key rejects connect() with the server's code and stops", async () => {
    const c = new AllsparkClient({ url, authKey: "not-a-jwt" });
    await assert.rejects(c.connect(), (error) => error instanceof PreConnectionError && error.status === 401
      && error.code === "malformed_key" && error.keyRefused);
    assert.equal(c.state, "closed");
  });

  test("an authKey function is asked again after its key is refused", async () => {
    const keys = ["not-a-jwt", key(`${run}-fresh`)];
    let asked = 0;
    const c = await client(url, `${run}-fresh`, { authKey: () => keys[Math.min(asked++, 1)] });
    assert.equal(c.nodeId, `${run}-fresh`);
    assert.equal(asked, 2);
  });

  test("close() while connecting stops it: connect() rejects, no socket stays open", async () => {
    const c = new AllsparkClient({ url, authKey: key(`${run}-quitter`) });
    const connecting = c.connect();
    await c.close();
    await assert.rejects(connecting, ConnectionClosedError);
    assert.equal(c.state, "closed");
    await assert.rejects(c.send({ dest_id: "x" }), ConnectionClosedError);
    assert.equal(c._socket, null);
  });

  test("nothing listening: bounded attempts with growing pauses, then connect() rejects", async () => {
    const nowhere = `http://127.0.0.1:${await freePort()}`;
    const c = new AllsparkClient({ url: nowhere, authKey: key(`${run}-lost`),
      reconnect: { initialDelay: 20, maxDelay: 40, maxAttempts: 4 } });
    const pauses = [];
    c.on("reconnecting", (detail) => pauses.push(detail));
    const stopped = new Promise((resolve) => c.once("error", resolve));
    await assert.rejects(c.connect(), (e) => e instanceof ConnectionClosedError && /after 4 attempts/.test(e.message));
    assert.match((await stopped).message, /could not connect after 4 attempts/);
    assert.deepEqual(pauses.map((p) => p.attempt), [1, 2, 3]);
    assert.ok(pauses.every((p) => p.delay < 40 && p.error instanceof Error));
    assert.equal(c.state, "closed");
  });

  test("a message that gets no answer in time rejects with TimeoutError and its id", async () => {
    const c = new AllsparkClient({ url: `http://127.0.0.1:${await freePort()}`, authKey: key(`${run}-slow`) });
    // never connected: the message waits for "ready" until its timeout
    await assert.rejects(c.send({ dest_id: "anyone", id: "late-1" }, { timeout: 50 }),
      (e) => e instanceof TimeoutError && e.id === "late-1" && e.code === "timeout");
    const pending = c.ping();
    await c.close();
    await assert.rejects(pending, ConnectionClosedError); // what still waited is rejected by close()
  });

  test("backoff: full jitter under a ceiling that grows by factor up to maxDelay", () => {
    const policy = { initialDelay: 500, maxDelay: 30_000, factor: 2 };
    assert.equal(backoffDelay(0, policy, () => 0), 0);
    assert.equal(backoffDelay(0, policy, () => 0.999999), 499);
    assert.equal(backoffDelay(3, policy, () => 0.5), 2000);
    assert.equal(backoffDelay(20, policy, () => 0.999999), 29_999);
    for (let attempt = 0; attempt < 30; attempt += 1) {
      const delay = backoffDelay(attempt, policy);
      assert.ok(delay >= 0 && delay < Math.min(30_000, 500 * 2 ** attempt));
    }
  });

  test("bad options are refused at once with a clear error", () => {
    assert.throws(() => new AllsparkClient({ url: "ftp://x", authKey: "k" }), TypeError);
    assert.throws(() => new AllsparkClient({ url, authKey: 7 }), TypeError);
    assert.throws(() => new AllsparkClient({ url, authKey: "k", preConnectionForm: "v2" }), TypeError);
    assert.throws(() => new AllsparkClient({ url, authKey: "k", syncLimit: 5000 }), /syncLimit must be an integer >= 1 and <= 1000/);
    assert.throws(() => new AllsparkClient({ url, authKey: "k", ackEvery: 0 }), /ackEvery/);
    assert.throws(() => new AllsparkClient({ url, authKey: "k", requestTimeout: "10s" }), /requestTimeout/);
    assert.throws(() => new AllsparkClient({ url, authKey: "k", reconnect: { initialDelay: 1000, maxDelay: 10 } }),
      /reconnect.maxDelay must be a number >= 1000/);
    assert.throws(() => new AllsparkClient({ url, authKey: "k", reconnect: { maxAttempts: 0 } }), /maxAttempts/);
    assert.ok(new AllsparkClient({ url, authKey: "k", reconnect: { maxAttempts: Infinity } }));
  });
});

describe("messages", () => {
  test("send and receive: accepted, then the message stamped by the server, with its seq", async () => {
    const alice = await client(url, `${run}-a1`, { clientId: `${run}-alice` });
    const bob = await client(url, `${run}-b1`, { clientId: `${run}-bob` });
    const accepted = await alice.send({ dest_id: `${run}-b1`, payload: { text: "hi" }, type: 7 });
    assert.equal(accepted.op, "accepted");
    assert.equal(accepted.status, "delivered");
    assert.match(accepted.id, /^js-/);
    await waitUntil(() => bob.got.message.length === 1, 10_000, "bob's message");
    const [message] = bob.got.message;
    assert.deepEqual(message.payload, { text: "hi" });
    assert.equal(message.src_id, `${run}-a1`);
    assert.equal(message.src_client_id, `${run}-alice`);
    assert.equal(message.dest_id, `${run}-b1`);
    assert.equal(message.seq, 1);
    assert.equal(message.type, 7);
    assert.equal(message.id, accepted.id);
  });

  test("a user-wide send reaches every device of the user and the sender's other devices", async () => {
    const laptop = await client(url, `${run}-cw-laptop`, { clientId: `${run}-cwa` });
    const phone = await client(url, `${run}-cw-phone`, { clientId: `${run}-cwa` });
    const bobPhone = await client(url, `${run}-cw-bphone`, { clientId: `${run}-cwb` });
    const bobTab = await client(url, `${run}-cw-btab`, { clientId: `${run}-cwb` });
    const accepted = await laptop.send({ dest_client_id: `${run}-cwb`, payload: "to all of bob" });
    assert.equal(accepted.recipients, 3);
    for (const device of [phone, bobPhone, bobTab]) {
      await waitUntil(() => device.got.message.length === 1, 10_000, `${device.nodeId}'s copy`);
      assert.equal(device.got.message[0].dest_id, device.nodeId);
    }
    assert.equal(phone.isOwnCopy(phone.got.message[0]), true);
    assert.equal(bobPhone.isOwnCopy(bobPhone.got.message[0]), false);
    assert.equal(laptop.got.message.length, 0);
  });

  test("ephemeral messages: delivered to who is online, never queued or resent", async () => {
    const alice = await client(url, `${run}-eph-a`);
    const bob = await client(url, `${run}-eph-b`);
    const live = await alice.send({ dest_id: bob.nodeId, payload: "typing", ephemeral: true });
    assert.equal(live.status, "delivered");
    await waitUntil(() => bob.got.message.length === 1, 10_000, "the ephemeral message");
    assert.equal(bob.got.message[0].ephemeral, true);
    assert.equal(bob.got.message[0].seq, undefined);
    await bob.close();
    const dropped = await alice.send({ dest_id: bob.nodeId, payload: "typing", ephemeral: true });
    assert.equal(dropped.status, "dropped");
    const whileDown = new Promise((resolve) => alice.once("disconnected", () => {
      resolve(alice.send({ dest_id: bob.nodeId, payload: "typing", ephemeral: true }));
    }));
    cut(alice); // the network dies; the client reconnects by itself
    await assert.rejects(whileDown, (e) => e instanceof ConnectionClosedError && e.message === "not connected");
  });

  test("an error answer rejects with AllsparkError and its code; the connection stays", async () => {
    const alice = await client(url, `${run}-err`);
    await assert.rejects(alice.send({ dest_id: `${run}-nobody-ever` }),
      (error) => error instanceof AllsparkError && error.code === "unknown_destination");
    await assert.rejects(alice.request({ op: "frobnicate" }),
      (error) => error instanceof AllsparkError && error.code === "unknown_op");
    assert.equal((await alice.ping()).op, "pong");
  });

  test("bad input is refused locally with a clear error, never sent", async () => {
    const alice = await client(url, `${run}-bad`);
    await assert.rejects(alice.send({ payload: 1 }), /needs dest_id, dest_client_id or dest_session_id/);
    await assert.rejects(alice.send(null), TypeError);
    const circular = {};
    circular.self = circular;
    await assert.rejects(alice.send({ dest_id: `${run}-bad`, payload: circular }), /cannot be written as JSON/);
    await assert.rejects(alice.send({ dest_id: `${run}-bad`, payload: "x".repeat(70_000) }),
      (error) => error instanceof AllsparkError && error.code === "too_large");
    await assert.rejects(alice.request({ op: "ping", id: "" }), /1-64 characters/);
    assert.equal(alice.state, "ready");
    assert.equal((await alice.ping()).op, "pong");
  });
});
