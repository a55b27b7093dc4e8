// How the JS client copes with volume, against a real server (started like the
// tests do, from the repository's .venv):
//   node clients/js/bench/backlog.mjs            (N=10000 by default)
// - N messages sent at once (pipelined promises) by one client to an offline
//   node: the rate at which all were accepted (the server's --max-rate and
//   --max-burst refuse some with rate_limited; the client sends those again);
// - that node connecting: the time until "ready", i.e. until the whole backlog
//   was synced and handed over, and how many were handed over (once each).

import { client, closeAll, sharedServerUrl, stopSharedServer } from "../test/helpers.mjs";

const N = Number(process.env.N ?? 10_000);
const url = await sharedServerUrl();
const stamp = Date.now().toString(36);
const bobId = `bench-bob-${stamp}`;
await (await client(url, bobId)).close(); // known to the server from now on
const alice = await client(url, `bench-alice-${stamp}`, { sendTimeout: 300_000 });

let started = performance.now();
await Promise.all([...Array(N).keys()].map((i) => alice.send({ dest_id: bobId, payload: { i } })));
const sendMs = performance.now() - started;

started = performance.now();
const bob = await client(url, bobId);
const syncMs = performance.now() - started;

console.log(JSON.stringify({
  messages: N,
  accepted_per_s: Math.round((N / sendMs) * 1000),
  connect_and_sync_ms: Math.round(syncMs),
  handed_over: bob.stats.received,
  duplicates_dropped: bob.stats.duplicates,
}));
await closeAll();
await stopSharedServer();
