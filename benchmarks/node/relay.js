#!/usr/bin/env node
// Reference relays for Allspark's benchmark harness: what a user might write
// or pick instead of Allspark.  Both speak the harness's relay protocol:
//
//   connect  ws://127.0.0.1:PORT/?id=NODE[&rooms=R1,R2]   (Socket.IO: query id, rooms)
//   send     {"id": "...", "dest_id": "bob", "payload": ...}
//            or {"id": "...", "dest_session_id": "R1", "payload": ...} (to every room member)
//   get      {"src_id": "alice", "dest_id": "bob", "payload": ..., "id": "..."}
//   answer   {"op": "accepted", "id": "...", "status": "delivered"}
//
// No storage, no auth: a ceiling, not a product.
//   node relay.js ws PORT
//   node relay.js socketio PORT
'use strict';

const http = require('http');
const kind = process.argv[2];
const port = Number(process.argv[3]);
const byId = new Map();
const rooms = new Map();

function join(id, roomList, conn) {
  byId.set(id, conn);
  for (const r of roomList) {
    if (!rooms.has(r)) rooms.set(r, new Set());
    rooms.get(r).add(conn);
  }
}
function leave(id, roomList, conn) {
  if (byId.get(id) === conn) byId.delete(id);
  for (const r of roomList) { const s = rooms.get(r); if (s) s.delete(conn); }
}

if (kind === 'ws') {
  const { WebSocketServer } = require('ws');
  const wss = new WebSocketServer({ host: '127.0.0.1', port, perMessageDeflate: false });
  wss.on('connection', (sock, req) => {
    const q = new URL(req.url, 'http://x').searchParams;
    const id = q.get('id');
    const roomList = (q.get('rooms') || '').split(',').filter(Boolean);
    join(id, roomList, sock);
    sock.on('message', (data) => {
      let m;
      try { m = JSON.parse(data); } catch (e) { return; }
      if (m.op === 'ack') return;
      const out = { src_id: id, dest_id: m.dest_id, payload: m.payload, id: m.id };
      if (m.dest_session_id !== undefined) {
        out.dest_session_id = m.dest_session_id;
        const text = JSON.stringify(out);   // one encode per fan-out
        for (const peer of rooms.get(m.dest_session_id) || []) if (peer !== sock) peer.send(text);
      } else {
        const peer = byId.get(m.dest_id);
        if (peer) peer.send(JSON.stringify(out));
      }
      sock.send(JSON.stringify({ op: 'accepted', id: m.id, status: 'delivered' }));
    });
    sock.on('close', () => leave(id, roomList, sock));
  });
  wss.on('listening', () => console.log('LISTENING ' + port));
} else if (kind === 'socketio') {
  const { Server } = require('socket.io');
  const server = http.createServer();
  const io = new Server(server, { transports: ['websocket'], perMessageDeflate: false,
    maxHttpBufferSize: 1e6 });
  io.on('connection', (sock) => {
    const id = sock.handshake.query.id;
    const roomList = String(sock.handshake.query.rooms || '').split(',').filter(Boolean);
    byId.set(id, sock);
    for (const r of roomList) sock.join(r);
    sock.on('m', (m, ack) => {
      const out = { src_id: id, dest_id: m.dest_id, payload: m.payload, id: m.id };
      if (m.dest_session_id !== undefined) {
        out.dest_session_id = m.dest_session_id;
        sock.to(m.dest_session_id).emit('m', out);
      } else {
        const peer = byId.get(m.dest_id);
        if (peer) peer.emit('m', out);
      }
      if (typeof ack === 'function') ack({ op: 'accepted', id: m.id, status: 'delivered' });
    });
    sock.on('disconnect', () => { if (byId.get(id) === sock) byId.delete(id); });
  });
  server.listen(port, '127.0.0.1', () => console.log('LISTENING ' + port));
} else {
  console.error('usage: node relay.js ws|socketio PORT');
  process.exit(2);
}
process.on('SIGTERM', () => process.exit(0));
process.on('SIGINT', () => process.exit(0));
