// Test support for the JS client's tests: real `twistd -n allspark` processes
// on 127.0.0.1, HS256 auth keys, bounded waits.
//
// tests/test_js_client.py runs these files with ALLSPARK_JS_TEST naming a JSON
// file: {"twistd", "root", "auth_secret", "cluster_secret", "shared_url"}
// (shared_url: a server the Python side started for the tests that need no
// server of their own).  Run alone (`npm test` in clients/js), the defaults
// below are the repository's venv and tests/support.py's secrets, and the
// shared server is started here.

import { spawn } from "node:child_process";
import { createHmac } from "node:crypto";
import { closeSync, mkdtempSync, openSync, readFileSync, rmSync } from "node:fs";
import { createServer, connect as tcpConnect } from "node:net";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";

import { AllsparkClient } from "../allspark.js";

const HERE = dirname(fileURLToPath(import.meta.url));

function loadConfig() {
  const root = resolve(HERE, "..", "..", "..");
  const defaults = {
    root,
    twistd: join(root, ".venv", "bin", "twistd"),
    auth_secret: "test-secret-0123456789abcdef0123456789",
    cluster_secret: "cluster-secret-0123456789abcdef012345",
    shared_url: null,
  };
  const path = process.env.ALLSPARK_JS_TEST;
  if (!path) return defaults;
  return { ...defaults, ...JSON.parse(readFileSync(path, "utf8")) };
}

export const config = loadConfig();

/** Every server this test process started: killed when it exits, however it exits. */
const started = new Set();
/** Data directories this test process made (servers' data and logs): removed when it exits, unless ALLSPARK_JS_KEEP is set. */
const madeDirs = new Set();
process.on("exit", () => {
  for (const server of started) server.proc?.kill("SIGKILL");
  if (process.env.ALLSPARK_JS_KEEP) return; // keep the servers' logs to look at
  for (const dir of madeDirs) {
    try {
      rmSync(dir, { recursive: true, force: true });
    } catch {
      // a server still writing: the OS's tmp cleaning has it
    }
  }
});

/** A new temporary directory, removed when this process exits. */
export function tempDir(prefix) {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  madeDirs.add(dir);
  return dir;
}

function base64url(data) {
  return Buffer.from(data).toString("base64url");
}

/** An HS256 auth key for `nodeId` (and `clientId`), signed with the test secret. */
export function key(nodeId, clientId = null, ttlSeconds = 3600) {
  const now = Math.floor(Date.now() / 1000);
  const claims = { sub: nodeId, iat: now, exp: now + ttlSeconds };
  if (clientId !== null) claims.client_id = clientId;
  const signingInput = `${base64url(JSON.stringify({ alg: "HS256", typ: "JWT" }))}.${base64url(JSON.stringify(claims))}`;
  const signature = createHmac("sha256", config.auth_secret).update(signingInput).digest("base64url");
  return `${signingInput}.${signature}`;
}

/** A TCP port on 127.0.0.1 nobody listens on right now. */
export function freePort() {
  return new Promise((resolvePort, reject) => {
    const server = createServer();
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      const { port } = server.address();
      server.close(() => resolvePort(port));
    });
  });
}

export function sleep(ms) {
  return new Promise((r) => setTimeout(r, ms));
}

/** Poll `predicate` (sync or async) every `interval` ms until true; fails after `timeout` ms. */
export async function waitUntil(predicate, timeout, what, interval = 50) {
  const deadline = Date.now() + timeout;
  for (;;) {
    if (await predicate()) return;
    if (Date.now() > deadline) throw new Error(`timed out after ${timeout} ms waiting for ${what}`);
    await sleep(interval);
  }
}

async function getJson(url) {
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), 2000);
  try {
    const response = await fetch(url, { signal: controller.signal });
    return { status: response.status, body: await response.json() };
  } finally {
    clearTimeout(timer);
  }
}

/** One real server process with its own data directory (kept across restarts). */
export class ServerProcess {
  constructor({ args = [], port = null, dataDir = null } = {}) {
    this.args = args;
    this.port = port;
    this.dataDir = dataDir ?? tempDir("allspark-js-");
    this.proc = null;
  }

  get baseUrl() {
    return `http://127.0.0.1:${this.port}`;
  }

  get serverId() {
    return `127.0.0.1:${this.port}`;
  }

  get logPath() {
    return join(this.dataDir, `server-${this.port}.log`);
  }

  log() {
    try {
      return readFileSync(this.logPath, "utf8");
    } catch {
      return "(no log)";
    }
  }

  /** Start it (`force`: after a crash) and wait until /health says it is live. */
  async start({ force = false, timeout = 30_000 } = {}) {
    if (this.port === null) this.port = await freePort();
    const log = openSync(this.logPath, "a");
    const args = ["-n", "--pidfile=", "allspark", "--host_address=127.0.0.1", `--port=${this.port}`,
      `--data-dir=${this.dataDir}`, ...this.args];
    if (force) args.push("--force");
    const env = {
      ...process.env,
      ALLSPARK_AUTH_SECRET: config.auth_secret,
      ALLSPARK_CLUSTER_SECRET: config.cluster_secret,
      PYTHONPATH: config.root + (process.env.PYTHONPATH ? `:${process.env.PYTHONPATH}` : ""),
    };
    this.proc = spawn(config.twistd, args, { cwd: this.dataDir, env, stdio: ["ignore", log, log] });
    closeSync(log);
    started.add(this);
    const proc = this.proc;
    let exited = null;
    proc.once("exit", (code, signal) => { exited = { code, signal }; });
    await waitUntil(async () => {
      if (exited) throw new Error(`server exited (${exited.code ?? exited.signal}):\n${this.log()}`);
      try {
        const { status, body } = await getJson(`${this.baseUrl}/health`);
        return status === 200 && body.state !== "starting";
      } catch {
        return false;
      }
    }, timeout, `server ${this.port} to be healthy`, 100);
    return this;
  }

  /** Send `signal` and wait until the process is gone. */
  async stop(signal = "SIGTERM", timeout = 20_000) {
    const proc = this.proc;
    if (!proc || proc.exitCode !== null || proc.signalCode !== null) return;
    const gone = new Promise((r) => proc.once("exit", r));
    proc.kill(signal);
    const timer = setTimeout(() => proc.kill("SIGKILL"), timeout);
    await gone;
    clearTimeout(timer);
    started.delete(this);
  }

  /** A crash: SIGKILL. */
  kill() {
    return this.stop("SIGKILL");
  }
}

let shared = null;

/** The base URL of a server shared by the tests that need no server of their own. */
export async function sharedServerUrl() {
  if (config.shared_url) return config.shared_url;
  if (shared === null) shared = new ServerProcess().start();
  return (await shared).baseUrl;
}

/** Stop the shared server if this process started it. */
export async function stopSharedServer() {
  if (shared !== null) await (await shared).stop();
}

/** Clients made by `client()`, closed by `closeAll()`. */
const clients = new Set();

/**
 * A client for `nodeId` on `url` (reconnect pauses kept short for tests),
 * connected and synced unless `connect: false`.  Every message and event is
 * recorded: `client.got` (by event type).
 */
export async function client(url, nodeId, { clientId = null, connect = true, ...options } = {}) {
  const c = new AllsparkClient({
    url,
    authKey: key(nodeId, clientId),
    reconnect: { initialDelay: 100, maxDelay: 1000 },
    ...options,
  });
  c.got = { message: [], session_message: [], presence: [], session_event: [], ready: [], disconnected: [],
    error: [], gap: [], reconnecting: [] };
  for (const type of Object.keys(c.got)) c.on(type, (detail) => c.got[type].push(detail));
  clients.add(c);
  if (connect) await c.connect();
  return c;
}

/** Close every client made by `client()`. */
export async function closeAll() {
  const all = [...clients];
  clients.clear();
  await Promise.all(all.map((c) => c.close().catch(() => {})));
}

/** Cut a client's connection as a dead network would (ws: no close handshake; a WHATWG WebSocket: close()). */
export function cut(c) {
  const socket = c._socket;
  if (typeof socket.terminate === "function") socket.terminate();
  else socket.close();
}

/** A TCP forwarder on a free port to `targetPort` (a stand-in proxy such as nginx). */
export async function tcpProxy(targetPort) {
  const sockets = new Set();
  let connections = 0;
  const server = createServer((inbound) => {
    connections += 1;
    const outbound = tcpConnect(targetPort, "127.0.0.1");
    for (const s of [inbound, outbound]) {
      sockets.add(s);
      s.on("error", () => {});
      s.on("close", () => { sockets.delete(s); inbound.destroy(); outbound.destroy(); });
    }
    inbound.pipe(outbound);
    outbound.pipe(inbound);
  });
  const port = await new Promise((r) => server.listen(0, "127.0.0.1", () => r(server.address().port)));
  return {
    port,
    get connections() { return connections; },
    close() {
      for (const s of sockets) s.destroy();
      return new Promise((r) => server.close(() => r()));
    },
  };
}
