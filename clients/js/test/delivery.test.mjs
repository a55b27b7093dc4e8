// Definite delivery through the client: offline then sync (nothing lost, no
// duplicates), de-duplication, a message resent after a lost answer, batched
// acks (a reconnect after acks syncs nothing).  Against one real server.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { WebSocket } from "ws";

import { client, closeAll, cut, sharedServerUrl, stopSharedServer, waitUntil } from "./helpers.mjs";

let url;
const run = `d${Date.now().toString(36)}`;

before(async () => {
  url = await sharedServerUrl();
});

after(async () => {
  await closeAll();
  await stopSharedServer();
});

/** The seqs of what `c` handed over as "message" events. */
const seqs = (c) => c.got.message.map((m) => m.seq);

test("offline then sync: at ready everything missed is there, in order, once", async () => {
  const bobId = `${run}-bob1`;
  const first = await client(url, bobId); // known to the cluster from now on
  await first.close();
  const alice = await client(url, `${run}-alice1`);
  for (let i = 0; i < 30; i += 1) {
    const accepted = await alice.send({ dest_id: bobId, payload: i });
    assert.equal(accepted.status, "stored");
  }
  const bob = await client(url, bobId, { connect: false });
  let atReady = null;
  bob.once("ready", () => { atReady = bob.got.message.map((m) => m.payload); });
  await bob.connect();
  assert.deepEqual(atReady, [...Array(30).keys()]);
  assert.deepEqual(seqs(bob), [...Array(30).keys()].map((i) => i + 1));
});

test("a copy seen live and again in a sync is handed over once", async () => {
  const bobId = `${run}-bob2`;
  const bob = await client(url, bobId, { autoAck: false });
  const alice = await client(url, `${run}-alice2`);
  for (let i = 0; i < 10; i += 1) await alice.send({ dest_id: bobId, payload: i });
  await waitUntil(() => bob.got.message.length === 10, 10_000, "ten live messages");
  // the server sends all ten again: a raw sync from the start
  const synced = await bob.request({ op: "sync", after: 0 });
  assert.equal(synced.upto, 10);
  assert.equal(bob.got.message.length, 10);
  assert.equal(bob.stats.duplicates, 10);
});

test("a retried id is stored and delivered once, with the first answer", async () => {
  const bobId = `${run}-bob3`;
  const bob = await client(url, bobId);
  const alice = await client(url, `${run}-alice3`);
  const first = await alice.send({ dest_id: bobId, payload: "once", id: "same-id" });
  const again = await alice.send({ dest_id: bobId, payload: "once", id: "same-id" });
  assert.deepEqual(again, first);
  const marker = await alice.send({ dest_id: bobId, payload: "after" });
  await waitUntil(() => bob.got.message.some((m) => m.id === marker.id), 10_000, "the marker");
  assert.deepEqual(bob.got.message.map((m) => m.payload), ["once", "after"]);
});

/** A `ws` WebSocket that loses the first `accepted` for `id`: the connection dies before it arrives. */
function losingAnswerTo(id) {
  let lost = false;
  return class extends WebSocket {
    addEventListener(type, listener, options) {
      if (type !== "message") return super.addEventListener(type, listener, options);
      return super.addEventListener(type, (event) => {
        if (this.cut) return; // frames ws had read in the same chunk die with the socket
        const frame = JSON.parse(String(event.data));
        if (!lost && frame.op === "accepted" && frame.id === id) {
          lost = true;
          this.cut = true;
          this.terminate();
          return;
        }
        listener(event);
      }, options);
    }
  };
}

test("a message whose answer was lost with its connection is sent again with its id, and kept once", async () => {
  const bobId = `${run}-bob4`;
  const bob = await client(url, bobId);
  const alice = await client(url, `${run}-alice4`, { WebSocket: losingAnswerTo("resend-1") });
  const accepted = await alice.send({ dest_id: bobId, payload: "hello once", id: "resend-1" });
  assert.equal(accepted.id, "resend-1");
  assert.equal(alice.stats.reconnections, 1); // the answer came on the second connection
  assert.equal(alice.got.disconnected.length, 1);
  const marker = await alice.send({ dest_id: bobId, payload: "marker" });
  await waitUntil(() => bob.got.message.some((m) => m.id === marker.id), 10_000, "the marker");
  assert.deepEqual(bob.got.message.map((m) => m.payload), ["hello once", "marker"]);
});

/** A `ws` WebSocket that loses the first message with seq `seq` on its way in. */
function losingSeq(seq) {
  let lost = false;
  return class extends WebSocket {
    addEventListener(type, listener, options) {
      if (type !== "message") return super.addEventListener(type, listener, options);
      return super.addEventListener(type, (event) => {
        const frame = JSON.parse(String(event.data));
        if (!lost && frame.op === undefined && frame.seq === seq) {
          lost = true;
          return;
        }
        listener(event);
      }, options);
    }
  };
}

test("a copy missed on the wire (a hole in the seqs) is fetched by a sync", async () => {
  const bobId = `${run}-bob7`;
  const bob = await client(url, bobId, { WebSocket: losingSeq(2), holeSyncDelay: 200 });
  const alice = await client(url, `${run}-alice7`);
  for (let i = 1; i <= 3; i += 1) await alice.send({ dest_id: bobId, payload: i });
  await waitUntil(() => bob.got.message.length === 3, 10_000, "all three, the lost one by a sync");
  assert.deepEqual(seqs(bob), [1, 3, 2]);
  assert.equal(bob.stats.holeSyncs, 1);
  assert.equal(bob.got.disconnected.length, 0);
});

test("a message sent while disconnected waits and goes out once reconnected", async () => {
  const bobId = `${run}-bob5`;
  const bob = await client(url, bobId);
  const alice = await client(url, `${run}-alice5`, { WebSocket: losingAnswerTo("never") });
  let stateAtSend = null;
  const sending = new Promise((resolve) => alice.once("disconnected", () => {
    stateAtSend = alice.state;
    resolve(alice.send({ dest_id: bobId, payload: "queued" }));
  }));
  cut(alice); // the network dies
  const accepted = await sending;
  assert.equal(stateAtSend, "connecting");
  assert.ok(["delivered", "stored"].includes(accepted.status));
  await waitUntil(() => bob.got.message.length === 1, 10_000, "the queued message");
  assert.equal(bob.got.message[0].payload, "queued");
});

test("acks are batched, and a reconnect after them syncs nothing", async () => {
  const bobId = `${run}-bob6`;
  const bob = await client(url, bobId, { ackDelay: 60_000, ackEvery: 10 });
  const alice = await client(url, `${run}-alice6`);
  for (let i = 0; i < 25; i += 1) await alice.send({ dest_id: bobId, payload: i });
  await waitUntil(() => bob.got.message.length === 25, 10_000, "25 messages");
  // one ack per 10 messages (the delay is long): at 10 and at 20
  await waitUntil(() => [...bob._streams.values()].every((s) => !s.ackInFlight), 10_000, "acks answered");
  assert.equal(bob.stats.acksSent, 2);
  await bob.close(); // sends the rest (21-25)
  const again = await client(url, bobId);
  assert.equal(again.got.message.length, 0);
  const fresh = await alice.send({ dest_id: bobId, payload: "new" });
  assert.equal(fresh.status, "delivered");
  await waitUntil(() => again.got.message.length === 1, 10_000, "the new message");
  assert.equal(again.got.message[0].seq, 26);
});

test("a new client object of the same node is not taken for a retry of the old one's ids", async () => {
  const bobId = `${run}-bob8`;
  const bob = await client(url, bobId);
  for (const text of ["first", "second"]) {
    const alice = await client(url, `${run}-alice8`);
    const accepted = await alice.send({ dest_id: bobId, payload: text });
    assert.equal(accepted.status, "delivered");
    await alice.close();
  }
  await waitUntil(() => bob.got.message.length === 2, 10_000, "both messages");
  assert.deepEqual(bob.got.message.map((m) => m.payload), ["first", "second"]);
});

test("with autoAck false nothing is acked unless the app acks", async () => {
  const bobId = `${run}-bob9`;
  let bob = await client(url, bobId, { autoAck: false });
  const alice = await client(url, `${run}-alice9`);
  for (let i = 0; i < 3; i += 1) await alice.send({ dest_id: bobId, payload: i });
  await waitUntil(() => bob.got.message.length === 3, 10_000, "three messages");
  await bob.close();
  bob = await client(url, bobId, { autoAck: false });
  assert.deepEqual(seqs(bob), [1, 2, 3]); // nothing was acked: all three again
  const acked = await bob.ack(2);
  assert.equal(acked.removed, 2);
  await bob.close();
  bob = await client(url, bobId, { autoAck: false });
  assert.deepEqual(seqs(bob), [3]);
  assert.equal(bob.stats.acksSent, 0);
});

test("inboxAfter: what an earlier run handed over is not handed over again; one beyond the inbox starts over", async () => {
  const bobId = `${run}-bob10`;
  let bob = await client(url, bobId, { autoAck: false });
  const alice = await client(url, `${run}-alice10`);
  for (let i = 0; i < 4; i += 1) await alice.send({ dest_id: bobId, payload: i });
  await waitUntil(() => bob.inboxSeq === 4, 10_000, "four messages");
  await bob.close(); // nothing acked (autoAck false), but the app kept inboxSeq
  bob = await client(url, bobId, { autoAck: false, inboxAfter: 3 });
  assert.deepEqual(seqs(bob), [4]);
  await bob.close();
  // a seq this inbox never reached (the app's state is from another store): a bad_cursor, then everything
  bob = await client(url, bobId, { autoAck: false, inboxAfter: 99 });
  assert.deepEqual(seqs(bob), [1, 2, 3, 4]);
  assert.equal(bob.got.error[0].code, "bad_cursor");
});

/** A `ws` WebSocket whose first connection dies when the first `synced` arrives (mid-sync). */
function dyingInFirstSync() {
  let died = false;
  return class extends WebSocket {
    addEventListener(type, listener, options) {
      if (type !== "message") return super.addEventListener(type, listener, options);
      return super.addEventListener(type, (event) => {
        if (this.cut) return; // frames ws had read in the same chunk die with the socket
        if (!died && JSON.parse(String(event.data)).op === "synced") {
          died = true;
          this.cut = true;
          this.terminate();
          return;
        }
        listener(event);
      }, options);
    }
  };
}

test("a connection that dies during the connect's sync: another attempt, ready once, nothing twice", async () => {
  const bobId = `${run}-bob11`;
  await (await client(url, bobId)).close();
  const alice = await client(url, `${run}-alice11`);
  for (let i = 0; i < 3; i += 1) await alice.send({ dest_id: bobId, payload: i });
  const bob = await client(url, bobId, { WebSocket: dyingInFirstSync() });
  assert.deepEqual(seqs(bob), [1, 2, 3]);
  assert.equal(bob.got.ready.length, 1);
  assert.equal(bob.got.reconnecting.filter((r) => r.error !== null).length, 1);
  assert.equal(bob.stats.reconnections, 0); // ready once: the failed attempt never was
});
