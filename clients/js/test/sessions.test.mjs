// Sessions and presence through the client: create/join/info/my_sessions/
// unjoin, broadcasts (session_seq), an offline member's sync and acks, private
// messages, member events, presence queries and presence_changed events.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { AllsparkError } from "../allspark.js";
import { client, closeAll, cut, sharedServerUrl, stopSharedServer, waitUntil } from "./helpers.mjs";

let url;
const run = `s${Date.now().toString(36)}`;

before(async () => {
  url = await sharedServerUrl();
});

after(async () => {
  await closeAll();
  await stopSharedServer();
});

test("create, join, info, my_sessions, unjoin, and member events", async () => {
  const alice = await client(url, `${run}-alice1`, { clientId: "alice" });
  const bob = await client(url, `${run}-bob1`, { clientId: "bob" });
  const sessionId = `${run}-room1`;
  const created = await alice.createSession({ session_id: sessionId, anyone_can_join: true });
  assert.equal(created.session_id, sessionId);
  assert.equal(created.you.owner, true);
  const member = await bob.joinSession(sessionId, { anonymous: true });
  assert.equal(member.anonymous, true);
  assert.match(member.alias, /^anon-/);
  await waitUntil(() => alice.got.session_event.some((e) => e.op === "member_joined"), 10_000, "member_joined");
  const joined = alice.got.session_event.find((e) => e.op === "member_joined");
  assert.equal(joined.member.name, member.alias);
  assert.equal(joined.member.node_id, undefined); // anonymous: its alias only
  const info = await alice.sessionInfo(sessionId);
  assert.equal(info.member_count, 2);
  assert.equal((await alice.sessionMembers(sessionId)).length, 2);
  assert.deepEqual((await bob.mySessions()).map((s) => s.session_id), [sessionId]);
  const left = await bob.unjoinSession(sessionId);
  assert.equal(left.op, "left");
  assert.deepEqual(await bob.mySessions(), []);
  await assert.rejects(bob.sessionInfo(sessionId), (e) => e instanceof AllsparkError && e.code === "not_a_member");
  await assert.rejects(alice.createSession({ session_id: sessionId }),
    (e) => e instanceof AllsparkError && e.code === "session_exists");
});

test("a broadcast reaches the other members once; an offline member gets it on connect; acks hold", async () => {
  const sessionId = `${run}-room2`;
  const alice = await client(url, `${run}-alice2`);
  const bob = await client(url, `${run}-bob2`);
  const carolId = `${run}-carol2`;
  let carol = await client(url, carolId);
  await alice.createSession({ session_id: sessionId, anyone_can_join: true });
  await bob.joinSession(sessionId);
  await carol.joinSession(sessionId);
  const accepted = await alice.send({ dest_session_id: sessionId, payload: "hi all" });
  assert.equal(accepted.session_seq, 1);
  assert.equal(accepted.recipients, 2);
  for (const member of [bob, carol]) {
    await waitUntil(() => member.got.session_message.length === 1, 10_000, `${member.nodeId}'s broadcast`);
    assert.equal(member.got.session_message[0].session_seq, 1);
    assert.equal(member.got.session_message[0].src_id, alice.nodeId);
    assert.equal(member.got.message.length, 0);
  }
  assert.equal(alice.got.session_message.length, 0); // never its own
  await carol.close();
  for (let i = 0; i < 3; i += 1) await alice.send({ dest_session_id: sessionId, payload: `away ${i}` });
  await bob.send({ dest_session_id: sessionId, payload: "from bob" });
  carol = await client(url, carolId);
  assert.deepEqual(carol.got.session_message.map((m) => m.session_seq), [2, 3, 4, 5]);
  assert.deepEqual(carol.got.session_message.map((m) => m.payload), ["away 0", "away 1", "away 2", "from bob"]);
  await carol.close(); // acks the session cursor
  carol = await client(url, carolId);
  assert.equal(carol.got.session_message.length, 0);
  const cursor = (await carol.mySessions()).find((s) => s.session_id === sessionId);
  assert.equal(cursor.acked_seq, 5);
});

test("a private message inside a session comes as a session_message with its inbox seq", async () => {
  const sessionId = `${run}-room3`;
  const alice = await client(url, `${run}-alice3`);
  const bob = await client(url, `${run}-bob3`);
  await alice.createSession({ session_id: sessionId, anyone_can_join: true });
  const member = await bob.joinSession(sessionId, { anonymous: true });
  await alice.send({ dest_session_id: sessionId, dest_id: member.alias, payload: "just you" });
  await waitUntil(() => bob.got.session_message.length === 1, 10_000, "the private message");
  const [message] = bob.got.session_message;
  assert.equal(message.seq, 1);
  assert.equal(message.dest_id, bob.nodeId);
  assert.equal(message.session_seq, undefined);
});

test("presence: a query, then presence_changed events as a member goes and comes back", async () => {
  const sessionId = `${run}-room4`;
  const alice = await client(url, `${run}-alice4`, { clientId: `${run}-a` });
  const bobId = `${run}-bob4`;
  let bob = await client(url, bobId);
  await alice.createSession({ session_id: sessionId, anyone_can_join: true });
  await bob.joinSession(sessionId);
  const now = await alice.subscribePresence(sessionId);
  assert.equal(now.subscribed, true);
  assert.deepEqual(now.online, [alice.nodeId, bobId].sort());
  assert.deepEqual((await alice.presence({ client_id: `${run}-a` })).online, [alice.nodeId]);
  await bob.close();
  await waitUntil(() => alice.got.presence.some((p) => p.name === bobId && p.online === false), 15_000,
    "bob shown offline");
  assert.equal((await alice.presence({ node_id: bobId })).online, false);
  bob = await client(url, bobId);
  await waitUntil(() => alice.got.presence.some((p) => p.name === bobId && p.online === true), 15_000,
    "bob shown online again");
  assert.equal(alice.got.presence.every((p) => p.op === "presence_changed" && p.session_id === sessionId), true);
});

test("presence subscriptions are renewed after a reconnect, and events keep coming", async () => {
  const sessionId = `${run}-room5`;
  const alice = await client(url, `${run}-alice5`);
  const bobId = `${run}-bob5`;
  const bob = await client(url, bobId);
  await alice.createSession({ session_id: sessionId, anyone_can_join: true });
  await bob.joinSession(sessionId);
  await alice.subscribePresence(sessionId);
  cut(alice); // the network drops; the client comes back by itself
  await waitUntil(() => alice.got.presence.some((p) => p.op === "presence" && p.subscribed === true), 15_000,
    "the renewed subscription");
  const renewed = alice.got.presence.find((p) => p.op === "presence");
  assert.deepEqual(renewed.online, [alice.nodeId, bobId].sort());
  await bob.close();
  await waitUntil(() => alice.got.presence.some((p) => p.op === "presence_changed" && p.name === bobId && !p.online),
    15_000, "bob shown offline on the new connection");
});

test("a node the owner adds gets member_joined (you) and the session's broadcasts from where it joined", async () => {
  const sessionId = `${run}-room6`;
  const alice = await client(url, `${run}-alice6`);
  const bob = await client(url, `${run}-bob6`, { holeSyncDelay: 60_000 }); // no sync to hide a wrong start
  await alice.createSession({ session_id: sessionId });
  await alice.send({ dest_session_id: sessionId, payload: "before bob" }); // bob never sees it
  await alice.joinSession(sessionId, { node_id: bob.nodeId });
  await waitUntil(() => bob.got.session_event.some((e) => e.op === "member_joined" && e.you === true), 10_000,
    "bob told he was added");
  await alice.send({ dest_session_id: sessionId, payload: "after bob" });
  await waitUntil(() => bob.got.session_message.length === 1, 10_000, "the broadcast");
  assert.equal(bob.got.session_message[0].payload, "after bob");
  assert.equal(bob.got.session_message[0].session_seq, 2);
  // its stream started where it joined (1): 2 follows without a hole, so it is acked
  await bob.flushAcks();
  const [cursor] = await bob.mySessions();
  assert.deepEqual([cursor.session_id, cursor.joined_seq, cursor.acked_seq], [sessionId, 1, 2]);
});
