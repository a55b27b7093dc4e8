#!/usr/bin/env node
// Allspark benchmark load generator (Node).  Run by the Python harness:
//
//   node loadgen.js CONFIG.json
//
// It connects every client of the config, prints "READY {...}" on stdout,
// waits for a "GO {...}" line on stdin, drives the load, and prints
// "RESULT {...}" (one JSON line) before exiting.  Everything is bounded: a
// message count and a deadline.  benchmarks/loadgen.py is the Python twin
// (same config, same result); benchmarks/README.md documents both.
//
// Modes (config.mode):
//   allspark   pre-connection over HTTP, then the WebSocket; messages get
//              "accepted"; durable ones carry "seq" and are acked.
//   relay      the harness's relay protocol (bare Autobahn relay, Node ws relay):
//              ws://host:port/?id=NODE[&rooms=R], same message frames.
//   socketio   a Socket.IO relay: emit("m", frame, ack).
//   nats-js    NATS JetStream: each publish awaits its PubAck (stored), the
//              receiver holds a subscription on its own subject.
//   nats-core  NATS core publish/subscribe (no storage).
// Scenarios (config.scenario): direct (pairs), fanout (one sender to a
// session/room of members), idle (connect, hold, close).
'use strict';

const fs = require('fs');
const readline = require('readline');
const { performance } = require('perf_hooks');

const cfg = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
const now = () => performance.now();
const epochMs = () => performance.timeOrigin + performance.now();

const R = {
  mode: cfg.mode, scenario: cfg.scenario, sent: 0, accepted: 0, received: 0, duplicates: 0,
  errors: 0, error_samples: [], lost: 0, expected: 0, not_sent: 0, complete: false,
  t_start: 0, t_end: 0, latencies_ms: [], connect_s: 0, connected: 0, connect_failed: 0,
  acks_sent: 0, acked: 0, ack_incomplete: 0, status_counts: {}, cpu_s: 0, deadline_hit: false,
};

function error(what) {
  R.errors += 1;
  if (R.error_samples.length < 20) R.error_samples.push(String(what).slice(0, 300));
}

// stdout is a pipe: a line over 64 KB (RESULT carries every latency) is
// written asynchronously, so exit only once it has been flushed
function emit(tag, obj, then) { process.stdout.write(tag + ' ' + JSON.stringify(obj) + '\n', then); }

// ---------------------------------------------------------------- transports
// Each connection is {send(obj), close(), onFrame: fn(obj), isOpen()}.

let WebSocket = null;
function ws() { return WebSocket || (WebSocket = require('ws')); }

function openWs(url, client) {
  return new Promise((resolve, reject) => {
    const sock = new (ws())(url, { perMessageDeflate: false, handshakeTimeout: 30000 });
    const conn = {
      client, sock, onFrame: null, hello: null, synced: false,
      send(obj) { sock.send(JSON.stringify(obj)); },
      close() { try { sock.terminate(); } catch (e) { /* gone */ } },
      isOpen() { return sock.readyState === 1; },
    };
    let opened = false;
    sock.on('open', () => { opened = true; if (cfg.mode !== 'allspark') resolve(conn); });
    sock.on('message', (data) => {
      let frame;
      try { frame = JSON.parse(data); } catch (e) { error('bad json from server'); return; }
      // sync on connect, as every client must: the server answers it once this
      // connection's location is known to its peers (live from any server)
      if (!conn.hello && frame.op === 'hello') { conn.hello = frame; conn.send({ op: 'sync', id: 'connect-sync' }); return; }
      if (conn.hello && !conn.synced) {
        if (frame.op === 'sync_done') { conn.synced = true; resolve(conn); }
        return;
      }
      if (conn.onFrame) conn.onFrame(frame);
    });
    sock.on('error', (e) => { if (!opened) reject(e); else if (!stopping) error('socket error: ' + e.message); });
    sock.on('close', (code) => {
      if (!opened) reject(new Error('closed before open: ' + code));
      else if (!stopping) error('connection closed by server: ' + code);
    });
  });
}

async function preConnection(base, key) {
  const url = `${base}/?get_pre_connection_info=true&auth_key=${encodeURIComponent(key)}`;
  for (let attempt = 0; ; attempt++) {
    try {
      const res = await fetch(url);
      const body = await res.json();
      if (res.status !== 200) throw new Error(`pre-connection HTTP ${res.status}: ${JSON.stringify(body)}`);
      return body.node.ws_url;
    } catch (e) {
      if (attempt >= 2) throw e;
      await new Promise((r) => setTimeout(r, 100));
    }
  }
}

async function connectAllspark(client) {
  const base = cfg.servers[client.server % cfg.servers.length];
  const url = await preConnection(base, client.key);
  return openWs(url, client);
}

function connectRelay(client) {
  const base = cfg.servers[client.server % cfg.servers.length];
  let url = `${base}/?id=${encodeURIComponent(client.id)}`;
  if (client.rooms) url += `&rooms=${encodeURIComponent(client.rooms.join(','))}`;
  return openWs(url, client);
}

function connectSocketIO(client) {
  const { io } = require('socket.io-client');
  const base = cfg.servers[client.server % cfg.servers.length];
  return new Promise((resolve, reject) => {
    const query = { id: client.id };
    if (client.rooms) query.rooms = client.rooms.join(',');
    const sock = io(base, { transports: ['websocket'], query, reconnection: false, forceNew: true,
      timeout: 30000 });
    const conn = {
      client, sock, onFrame: null,
      send(obj) {
        sock.emit('m', obj, (answer) => { if (conn.onFrame) conn.onFrame(answer); });
      },
      close() { sock.disconnect(); },
      isOpen() { return sock.connected; },
    };
    sock.on('connect', () => resolve(conn));
    sock.on('connect_error', (e) => reject(e));
    sock.on('m', (frame) => { if (conn.onFrame) conn.onFrame(frame); });
    sock.on('disconnect', (reason) => { if (!stopping) error('socket.io disconnect: ' + reason); });
  });
}

let natsConn = null;
let jetstream = null;
async function natsSetup() {
  const { connect } = require('nats');
  natsConn = await connect({ servers: cfg.servers[0], maxReconnectAttempts: 0, pingInterval: 60000 });
  if (cfg.mode === 'nats-js') {
    const jsm = await natsConn.jetstreamManager();
    try { await jsm.streams.delete('BENCH'); } catch (e) { /* none yet */ }
    await jsm.streams.add({ name: 'BENCH', subjects: ['bench.>'], storage: 'file' });
    jetstream = natsConn.jetstream();
  }
}

function connectNats(client) {
  // One NATS connection carries every client of this process (a NATS
  // client multiplexes subjects); each receiver is a subscription.
  const conn = {
    client, onFrame: null,
    send(obj) {
      const data = Buffer.from(JSON.stringify(obj));
      const subject = 'bench.' + obj.dest_id;
      if (jetstream) {
        jetstream.publish(subject, data).then(
          () => { if (conn.onFrame) conn.onFrame({ op: 'accepted', id: obj.id, status: 'stored' }); },
          (e) => { if (conn.onFrame) conn.onFrame({ op: 'error', id: obj.id, message: e.message }); });
      } else {
        natsConn.publish(subject, data);
        if (conn.onFrame) conn.onFrame({ op: 'accepted', id: obj.id, status: 'delivered' });
      }
    },
    close() {},
    isOpen() { return !natsConn.isClosed(); },
  };
  if (client.role === 'receiver') {
    const sub = natsConn.subscribe('bench.' + client.id);
    (async () => {
      for await (const m of sub) {
        let frame;
        try { frame = JSON.parse(Buffer.from(m.data).toString()); } catch (e) { error('bad json'); continue; }
        if (conn.onFrame) conn.onFrame(frame);
      }
    })();
  }
  return Promise.resolve(conn);
}

function connectOne(client) {
  switch (cfg.mode) {
    case 'allspark': return connectAllspark(client);
    case 'relay': return connectRelay(client);
    case 'socketio': return connectSocketIO(client);
    case 'nats-js': case 'nats-core': return connectNats(client);
    default: throw new Error('unknown mode ' + cfg.mode);
  }
}

async function connectAll(clients) {
  const conns = new Array(clients.length);
  let next = 0;
  const concurrency = cfg.connect_concurrency || 200;
  async function worker() {
    while (next < clients.length) {
      const i = next++;
      try {
        conns[i] = await connectOne(clients[i]);
        R.connected += 1;
      } catch (e) {
        R.connect_failed += 1;
        error('connect ' + clients[i].id + ': ' + (e && e.message));
      }
    }
  }
  const t0 = now();
  if (cfg.mode === 'nats-js' || cfg.mode === 'nats-core') await natsSetup();
  await Promise.all(Array.from({ length: Math.min(concurrency, clients.length) }, worker));
  R.connect_s = (now() - t0) / 1000;
  return conns;
}

// ---------------------------------------------------------------- the load
let stopping = false;

function waitGo() {
  return new Promise((resolve) => {
    const rl = readline.createInterface({ input: process.stdin });
    rl.on('line', (line) => {
      if (line.startsWith('GO')) { const rest = line.slice(2).trim(); resolve(rest ? JSON.parse(rest) : {}); }
      if (line.startsWith('STOP')) { finish('stopped by the harness'); }
    });
    rl.on('close', () => finish('stdin closed'));
  });
}

let finishHook = null;
function finish(why) { if (finishHook) finishHook(why); }

function padding() { return cfg.payload_pad ? 'x'.repeat(cfg.payload_pad) : undefined; }

async function runDirect(conns, go) {
  // pairs: [senderIndex, receiverIndex]; each pair sends cfg.per_pair messages
  const pad = padding();
  const perPair = cfg.per_pair;
  const pairs = cfg.pairs.map(([s, r], k) => ({
    k, s: conns[s], r: conns[r], rid: cfg.clients[r].id, sent: 0, got: 0, acc: 0,
    seen: new Uint8Array(perPair), inflightCap: cfg.window,
  }));
  const live = pairs.filter((p) => p.s && p.r);
  R.expected = perPair * pairs.length;
  const durable = !!cfg.durable;
  const ackEvery = cfg.ack_every || 100;
  const ackDelay = cfg.ack_delay_ms || 50;
  const rate = cfg.rate || 0;   // messages/s for this process, 0 = as fast as the window allows
  const pairRate = rate / Math.max(1, live.length);
  let t0 = 0;
  let done = null;
  const finished = new Promise((resolve) => { done = resolve; });
  let lastSendAt = 0;
  let allSent = false;

  function sendOne(p) {
    const i = p.sent++;
    const frame = { dest_id: p.rid, payload: { s: p.k, i, t: now() } };
    if (cfg.ids !== false) frame.id = p.k + '-' + i;   // without an id: no de-duplication record
    if (pad) frame.payload.x = pad;
    if (cfg.mode === 'allspark' && !durable) frame.ephemeral = true;
    p.s.send(frame);
    R.sent += 1;
    lastSendAt = now();
  }
  function topUp(p) {
    if (rate) return;
    while (p.sent < perPair && p.sent - p.got < p.inflightCap) sendOne(p);
    checkAllSent();
  }
  function checkAllSent() {
    if (!allSent && R.sent >= live.length * perPair) allSent = true;
    if (allSent && R.received >= R.sent && (!cfg.wait_accepted || R.accepted >= R.sent)) done('complete');
  }

  // the sender's answers
  for (const p of live) {
    p.s.onFrame = (f) => {
      if (f.op === 'accepted') {
        R.accepted += 1; p.acc += 1;
        R.status_counts[f.status] = (R.status_counts[f.status] || 0) + 1;
        if (f.status === 'dropped') error('message dropped: ' + f.id);
        checkAllSent();
      } else if (f.op === 'error') error('error frame: ' + JSON.stringify(f));
    };
    // the receiver's frames
    const rstate = { maxSeq: 0, ackedSent: 0, ackedConfirmed: 0, pending: 0, timer: null };
    p.rstate = rstate;
    const sendAck = () => {
      if (rstate.timer) { clearTimeout(rstate.timer); rstate.timer = null; }
      if (rstate.maxSeq > rstate.ackedSent && p.r.isOpen()) {
        p.r.send({ op: 'ack', upto: rstate.maxSeq });
        rstate.ackedSent = rstate.maxSeq; rstate.pending = 0; R.acks_sent += 1;
      }
    };
    rstate.flush = sendAck;
    p.r.onFrame = (f) => {
      if (f.op !== undefined) {
        if (f.op === 'acked') { R.acked += 1; rstate.ackedConfirmed = Math.max(rstate.ackedConfirmed, f.upto); }
        else if (f.op === 'error') error('error frame to receiver: ' + JSON.stringify(f));
        return;
      }
      const pl = f.payload;
      if (!pl || pl.s !== p.k) { error('unexpected message at ' + p.rid); return; }
      if (p.seen[pl.i]) { R.duplicates += 1; } else {
        p.seen[pl.i] = 1; p.got += 1; R.received += 1;
        R.latencies_ms.push(now() - pl.t);
        R.t_end = epochMs();
      }
      if (durable && f.seq !== undefined) {
        if (f.seq > rstate.maxSeq) rstate.maxSeq = f.seq;
        rstate.pending += 1;
        if (rstate.pending >= ackEvery) sendAck();
        else if (!rstate.timer) rstate.timer = setTimeout(sendAck, ackDelay);
      }
      topUp(p);
      checkAllSent();
    };
  }

  let ticker = null;
  if (rate) {
    // open loop: each pair sends pairRate messages/s, ticked every 2 ms, never
    // more than cfg.max_inflight unanswered per pair (a bound, not a window)
    const cap = cfg.max_inflight || 1000;
    ticker = setInterval(() => {
      const elapsed = (now() - t0) / 1000;
      for (const p of live) {
        const target = Math.min(perPair, Math.floor(pairRate * elapsed));
        while (p.sent < target && p.sent - p.got < cap) sendOne(p);
      }
      checkAllSent();
      if (allSent) { clearInterval(ticker); ticker = null; }
    }, 2);
  }

  t0 = now();
  R.t_start = epochMs();
  if (!rate) for (const p of live) topUp(p);
  if (live.length === 0) done('nothing to do');
  const deadline = setTimeout(() => { R.deadline_hit = true; done('deadline'); }, cfg.deadline_s * 1000);
  finishHook = done;
  // a drain bound: once everything is sent, wait at most drain_s for the rest
  const drainCheck = setInterval(() => {
    if (allSent && now() - lastSendAt > cfg.drain_s * 1000) done('drain timeout');
  }, 100);
  const why = await finished;
  clearTimeout(deadline); clearInterval(drainCheck); if (ticker) clearInterval(ticker);
  R.finish_reason = why;
  if (durable) {
    // flush the last acks and wait (bounded) until the server confirmed them
    for (const p of live) p.rstate.flush();
    const until = now() + cfg.drain_s * 1000;
    while (now() < until && live.some((p) => p.rstate.ackedConfirmed < p.rstate.maxSeq)) {
      await new Promise((r) => setTimeout(r, 20));
    }
    R.ack_incomplete = live.filter((p) => p.rstate.ackedConfirmed < p.rstate.maxSeq).length;
  }
  R.not_sent = R.expected - R.sent;
  R.lost = R.sent - R.received;
  R.complete = R.not_sent === 0 && R.lost === 0;
}

async function runFanout(conns, go) {
  // one sender (index cfg.sender) to cfg.members (indexes); the session id
  // comes in the GO line (the harness created it) or cfg.session_id
  const sessionId = go.session_id || cfg.session_id;
  const sender = conns[cfg.sender];
  const members = cfg.members.map((i) => ({ conn: conns[i], id: cfg.clients[i].id,
    seen: new Uint8Array(cfg.messages), got: 0, maxSeq: 0, acked: 0, ackedConfirmed: 0, timer: null }));
  const live = members.filter((m) => m.conn);
  const total = cfg.messages;
  R.expected = total * members.length;
  const durable = !!cfg.durable;
  const pad = padding();
  let sent = 0; let accepted = 0;
  let done = null;
  const finished = new Promise((resolve) => { done = resolve; });
  let lastSendAt = 0;

  function topUp() {
    while (sent < total && sent - accepted < cfg.window) {
      const i = sent++;
      const frame = { id: 'f-' + i, dest_session_id: sessionId, payload: { s: -1, i, t: now() } };
      if (pad) frame.payload.x = pad;
      if (cfg.mode === 'allspark' && !durable) frame.ephemeral = true;
      sender.send(frame);
      R.sent += 1;
      lastSendAt = now();
    }
    check();
  }
  function check() {
    if (sent >= total && R.received >= R.expected) done('complete');
  }
  sender.onFrame = (f) => {
    if (f.op === 'accepted') {
      accepted += 1; R.accepted += 1;
      R.status_counts[f.status] = (R.status_counts[f.status] || 0) + 1;
      topUp();
    } else if (f.op === 'error') { error('error frame: ' + JSON.stringify(f)); accepted += 1; topUp(); }
  };
  for (const m of live) {
    const sendAck = () => {
      if (m.timer) { clearTimeout(m.timer); m.timer = null; }
      if (m.maxSeq > m.acked && m.conn.isOpen()) {
        m.conn.send({ op: 'ack', session_id: sessionId, upto: m.maxSeq });
        m.acked = m.maxSeq; R.acks_sent += 1;
      }
    };
    m.flush = sendAck;
    m.conn.onFrame = (f) => {
      if (f.op !== undefined) {
        if (f.op === 'acked') { R.acked += 1; m.ackedConfirmed = Math.max(m.ackedConfirmed, f.upto); }
        else if (f.op === 'error') error('error frame to member: ' + JSON.stringify(f));
        return;
      }
      const pl = f.payload;
      if (!pl || pl.s !== -1) return;   // membership events and the like
      if (m.seen[pl.i]) R.duplicates += 1; else {
        m.seen[pl.i] = 1; m.got += 1; R.received += 1;
        R.latencies_ms.push(now() - pl.t); R.t_end = epochMs();
      }
      const seq = f.session_seq !== undefined ? f.session_seq : f.seq;
      if (durable && seq !== undefined) {
        if (seq > m.maxSeq) m.maxSeq = seq;
        if (m.maxSeq - m.acked >= (cfg.ack_every || 100)) sendAck();
        else if (!m.timer) m.timer = setTimeout(sendAck, cfg.ack_delay_ms || 50);
      }
      check();
    };
  }
  R.t_start = epochMs();
  finishHook = done;
  if (sender && live.length) topUp(); else done('nothing to do');
  const deadline = setTimeout(() => { R.deadline_hit = true; done('deadline'); }, cfg.deadline_s * 1000);
  const drainCheck = setInterval(() => {
    if (sent >= total && now() - lastSendAt > cfg.drain_s * 1000) done('drain timeout');
  }, 100);
  R.finish_reason = await finished;
  clearTimeout(deadline); clearInterval(drainCheck);
  if (durable) {
    for (const m of live) m.flush();
    const until = now() + cfg.drain_s * 1000;
    while (now() < until && live.some((m) => m.ackedConfirmed < m.maxSeq)) {
      await new Promise((r) => setTimeout(r, 20));
    }
    R.ack_incomplete = live.filter((m) => m.ackedConfirmed < m.maxSeq).length;
  }
  R.not_sent = (total - sent) * members.length;
  R.lost = sent * members.length - R.received;
  R.complete = R.not_sent === 0 && R.lost === 0;
}

async function main() {
  const cpu0 = process.cpuUsage();
  const conns = await connectAll(cfg.clients);
  emit('READY', { connected: R.connected, connect_failed: R.connect_failed, connect_s: R.connect_s,
    errors: R.errors, error_samples: R.error_samples });
  const go = await waitGo();
  const cpu1 = process.cpuUsage();
  if (cfg.scenario === 'direct') await runDirect(conns, go);
  else if (cfg.scenario === 'fanout') await runFanout(conns, go);
  else if (cfg.scenario === 'idle') { R.complete = R.connect_failed === 0; }
  const cpu2 = process.cpuUsage(cpu1);
  R.cpu_s = (cpu2.user + cpu2.system) / 1e6;
  R.wall_s = R.t_end && R.t_start ? (R.t_end - R.t_start) / 1000 : 0;
  stopping = true;
  for (const c of conns) if (c) c.close();
  if (natsConn) { try { await natsConn.close(); } catch (e) { /* closed */ } }
  void cpu0;
  R.latencies_ms = R.latencies_ms.map((x) => Math.round(x * 1000) / 1000);
  emit('RESULT', R, () => process.exit(0));
}

process.on('SIGTERM', () => process.exit(1));
main().catch((e) => { error('fatal: ' + (e && e.stack)); emit('RESULT', R, () => process.exit(2)); });
