/**
 * The Allspark JavaScript client: one ES module, no build step, for browsers
 * (global WebSocket and fetch) and Node 20+ (global fetch; the `ws` package,
 * loaded only when there is no global WebSocket).
 *
 *     import { connect } from "./allspark.js";
 *     const client = await connect({ url: "https://chat.example.com", authKey });
 *     client.on("message", (message) => console.log(message.src_id, message.payload));
 *     await client.send({ dest_id: "bob-phone", payload: { text: "hi" } });
 *
 * What it does for the app (docs/protocol.md is the contract, docs/clients.md
 * the guide):
 *
 * - pre-connection (`/v1/pre_connection_info`, or the seed's
 *   `/?get_pre_connection_info=true`; `needProxy` asks for the proxy address),
 *   then the WebSocket at the `ws_url` it answers, asked again for every attempt
 *   (a validation token is used once);
 * - reconnects by itself, with exponential backoff and full jitter (a random
 *   pause between 0 and min(maxDelay, initialDelay * factor^attempt)); follows
 *   a draining server's `reconnect` frame and 1001 close at once, to the server
 *   it names; never after 4009 (this connection was replaced by a newer one)
 *   nor after 4011 (the app's backend revoked the node);
 * - on every connect: `my_sessions` (each session's cursor), then one `sync`
 *   (the inbox and every session), again while a part says `more`, and only
 *   then the "ready" event;
 * - hands each `seq` (each session's `session_seq`) to the app once, and acks
 *   what it handed over, batched: one `ack` per inbox or session stream per
 *   `ackDelay` ms, or at once after `ackEvery` messages;
 * - requests carry an `id`; their answer (or error frame) settles the promise,
 *   or it rejects after a timeout;
 * - messages get an `id` too, and stay pending across reconnects: one sent
 *   before a connection dropped is sent again with the same `id` on the next
 *   connection, so the server stores and delivers it once (so is one refused
 *   with `rate_limited`, after a pause); ephemeral ones are now or never;
 * - a hole in the seqs (a copy that went to a server the node just left) is
 *   filled by a sync after `holeSyncDelay` ms;
 * - bad input (no destination, a payload that is not JSON, a frame over the
 *   server's `max_message_size`, a bad option) is refused with a clear error
 *   before anything is sent.
 *
 * @module allspark
 */

/** Answers to a request, matched by the request's `id`. */
const ANSWER_OPS = new Set(["accepted", "acked", "synced", "error", "pong", "session", "member", "left",
  "revealed", "master", "sessions", "sync_done", "presence"]);

/** Session events, delivered as "session_event". */
const SESSION_EVENTS = new Set(["member_joined", "member_left", "member_revealed", "master_changed"]);

/** Error codes a message may be sent again for, with the same id. */
const RETRYABLE_CODES = new Set(["rate_limited", "internal_error"]);

/** Error codes of a pre-connection refused for its auth key. */
const KEY_ERRORS = new Set(["missing_key", "malformed_key", "bad_signature", "expired_key", "bad_claims"]);

/** Pre-connection URLs learned from draining servers' `reconnect` frames kept at most. */
const MAX_LEARNED_URLS = 8;

/** A connection that stayed up this long (ms) resets the backoff. */
const STABLE_CONNECTION_MS = 10_000;

/** Full syncs in a row (each part of one ending with `more`) before giving up. */
const MAX_SYNC_ROUNDS = 50;

/** The defaults of every option (milliseconds for times). */
export const DEFAULTS = Object.freeze({
  needProxy: false,
  preConnectionForm: "v1",
  requestTimeout: 10_000,
  sendTimeout: 60_000,
  connectTimeout: 15_000,
  syncTimeout: 60_000,
  syncLimit: 500,
  autoAck: true,
  ackDelay: 100,
  ackEvery: 100,
  inboxAfter: 0,
  pingInterval: 30_000,
  holeSyncDelay: 1000,
  reconnect: Object.freeze({ initialDelay: 500, maxDelay: 30_000, factor: 2, maxAttempts: Infinity }),
});

/** The server answered a request with an error frame (`code` is its code). */
export class AllsparkError extends Error {
  /** @param {{code?: string, message?: string}} frame */
  constructor(frame) {
    super(`${frame.code}: ${frame.message}`);
    this.name = "AllsparkError";
    this.code = frame.code;
    this.frame = frame;
  }
}

/** Pre-connection was refused: `status` is the HTTP status, `code` the body's `error`. */
export class PreConnectionError extends Error {
  constructor(status, body, url) {
    const code = body && typeof body === "object" && typeof body.error === "string" ? body.error : `http_${status}`;
    super(`pre-connection at ${url} refused: HTTP ${status} ${code}`);
    this.name = "PreConnectionError";
    this.status = status;
    this.code = code;
    this.body = body;
    /** True when the auth key itself was refused (a new one is needed). */
    this.keyRefused = status === 401 && KEY_ERRORS.has(code);
  }
}

/** A request got no answer in time. */
export class TimeoutError extends Error {
  constructor(what, ms, frameId = null) {
    super(`${what}: no answer within ${ms} ms`);
    this.name = "TimeoutError";
    this.code = "timeout";
    /** The request's id (send it again with the same id: the server keeps a message once). */
    this.id = frameId;
  }
}

/** The connection closed before a request was answered, or the client was closed. */
export class ConnectionClosedError extends Error {
  constructor(message, closeCode = null, reason = "") {
    super(message);
    this.name = "ConnectionClosedError";
    this.code = "connection_closed";
    this.closeCode = closeCode;
    this.reason = reason;
  }
}

/**
 * De-duplication and ack state of one seq stream (the inbox, or a session).
 * `watermark` is the highest seq below which everything was handed over (or
 * is gone); `seen` the seqs above it handed over already.
 */
export class SeqStream {
  constructor(watermark = 0) {
    this.watermark = watermark;
    this.seen = new Set();
    this.acked = 0;
    /** The answer of the ack on its way, if any. */
    this.ackInFlight = null;
  }

  /** Whether `seq` is new (and records it). */
  accept(seq) {
    if (seq <= this.watermark || this.seen.has(seq)) return false;
    this.seen.add(seq);
    this._advance();
    return true;
  }

  /** Everything up to `upto` was handed over or is gone. */
  skipTo(upto) {
    if (upto > this.watermark) {
      this.watermark = upto;
      for (const seq of this.seen) if (seq <= upto) this.seen.delete(seq);
      this._advance();
    }
  }

  _advance() {
    while (this.seen.has(this.watermark + 1)) {
      this.watermark += 1;
      this.seen.delete(this.watermark);
    }
  }
}

/** Refuse numeric options that would make the client misbehave (a TypeError naming the option). */
function checkOptions(options) {
  const number = (name, value, { min = 0, integer = false, max = Infinity, infinite = false } = {}) => {
    const ok = typeof value === "number" && !Number.isNaN(value) && value >= min && value <= max
      && (infinite || Number.isFinite(value)) && (!integer || Number.isInteger(value) || value === Infinity);
    if (!ok) {
      throw new TypeError(`${name} must be ${integer ? "an integer" : "a number"} >= ${min}${max < Infinity ? ` and <= ${max}` : ""}, not ${String(value)}`);
    }
  };
  for (const name of ["requestTimeout", "sendTimeout", "connectTimeout", "syncTimeout"]) number(name, options[name], { min: 1 });
  for (const name of ["ackDelay", "pingInterval", "holeSyncDelay"]) number(name, options[name]);
  number("syncLimit", options.syncLimit, { min: 1, max: 1000, integer: true });
  number("ackEvery", options.ackEvery, { min: 1, integer: true });
  number("inboxAfter", options.inboxAfter, { integer: true });
  const policy = options.reconnect;
  number("reconnect.initialDelay", policy.initialDelay, { min: 1 });
  number("reconnect.maxDelay", policy.maxDelay, { min: policy.initialDelay });
  number("reconnect.factor", policy.factor, { min: 1 });
  number("reconnect.maxAttempts", policy.maxAttempts, { min: 1, integer: true, infinite: true });
}

let wsModule = null;

/** The WebSocket class: the option, the global one, else `ws` (imported once). */
async function webSocketClass(option) {
  if (option) return option;
  if (typeof globalThis.WebSocket === "function") return globalThis.WebSocket;
  if (wsModule === null) {
    wsModule = import(/* webpackIgnore: true */ /* @vite-ignore */ "ws").then((m) => m.WebSocket ?? m.default, (error) => {
      wsModule = null;
      throw new Error(`no global WebSocket and the "ws" package could not be loaded (npm install ws): ${error.message}`);
    });
  }
  return wsModule;
}

function randomHex(bytes) {
  const data = new Uint8Array(bytes);
  globalThis.crypto.getRandomValues(data);
  return Array.from(data, (b) => b.toString(16).padStart(2, "0")).join("");
}

function utf8Length(text) {
  return new TextEncoder().encode(text).length;
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const wake = () => {
      clearTimeout(timer);
      resolve();
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", wake);
      resolve();
    }, ms);
    signal?.addEventListener("abort", wake, { once: true });
  });
}

/**
 * The pause before reconnect attempt `attempt` (0 for the first retry): full
 * jitter, a uniform random pause in [0, min(maxDelay, initialDelay * factor^attempt)).
 */
export function backoffDelay(attempt, { initialDelay, maxDelay, factor }, random = Math.random) {
  const ceiling = Math.min(maxDelay, initialDelay * Math.pow(factor, attempt));
  return Math.floor(random() * ceiling);
}

/**
 * Ask `baseUrl` where to connect; resolves with the pre-connection answer
 * (`validation_token`, `expires_in`, `node` with its `ws_url`), rejects with
 * PreConnectionError when refused.
 *
 * @param {string} baseUrl the server's HTTP(S) base, e.g. "http://127.0.0.1:8080"
 * @param {string} authKey
 * @param {{needProxy?: boolean, form?: "v1"|"seed", timeout?: number, fetch?: typeof fetch}} [options]
 */
export async function preConnection(baseUrl, authKey, options = {}) {
  const { needProxy = false, form = "v1", timeout = DEFAULTS.requestTimeout } = options;
  const fetchImpl = options.fetch ?? globalThis.fetch;
  if (typeof fetchImpl !== "function") throw new Error("no fetch available: pass the fetch option");
  const query = new URLSearchParams();
  let path;
  if (form === "seed") {
    path = "/";
    query.set("get_pre_connection_info", "true");
  } else if (form === "v1") {
    path = "/v1/pre_connection_info";
  } else {
    throw new TypeError(`preConnectionForm must be "v1" or "seed", not ${JSON.stringify(form)}`);
  }
  query.set("auth_key", authKey);
  if (needProxy) query.set("need_proxy", "true");
  const url = `${String(baseUrl).replace(/\/+$/, "")}${path}?${query}`;
  const controller = new AbortController();
  const timer = setTimeout(() => controller.abort(), timeout);
  let response, text;
  try {
    response = await fetchImpl(url, { method: "GET", signal: controller.signal, cache: "no-store" });
    text = await response.text();
  } catch (error) {
    if (controller.signal.aborted) throw new TimeoutError(`pre-connection at ${baseUrl}`, timeout);
    throw error;
  } finally {
    clearTimeout(timer);
  }
  let body;
  try {
    body = JSON.parse(text);
  } catch {
    body = text;
  }
  if (response.status !== 200) throw new PreConnectionError(response.status, body, baseUrl);
  if (!body || typeof body !== "object" || !body.node || typeof body.node.ws_url !== "string") {
    throw new PreConnectionError(response.status, body, baseUrl);
  }
  return body;
}

/**
 * One node's connection to an Allspark cluster.  An EventTarget: listen with
 * `addEventListener(type, (event) => event.detail)` or `on(type, (detail) => ...)`.
 *
 * Events: "ready" (connected and synced; detail `{hello, serverId,
 * reconnected}`), "message" (a message without `dest_session_id`),
 * "session_message" (a message in a session: broadcast or private),
 * "presence" (`presence_changed` events, and the answer of each presence
 * subscription made again after a reconnect), "session_event"
 * (`member_joined`, `member_left`, `member_revealed`, `master_changed`),
 * "disconnected" (`{code, reason, willReconnect, movingTo}`), "reconnecting"
 * (`{attempt, delay, error}`), "gap" (`{after, upto, session_id?}`: messages
 * removed by retention before they were acked), "error" (an error frame
 * answering nothing, an unreadable frame, or the reason the client stopped).
 */
export class AllsparkClient extends EventTarget {
  /**
   * @param {object} options see allspark.d.ts (`ClientOptions`) and DEFAULTS
   */
  constructor(options) {
    super();
    if (!options || typeof options !== "object") throw new TypeError("options must be an object");
    const urls = Array.isArray(options.url) ? options.url : [options.url];
    if (urls.length === 0 || urls.some((u) => typeof u !== "string" || !/^https?:\/\//i.test(u))) {
      throw new TypeError("url must be an http(s):// base URL, or an array of them");
    }
    if (typeof options.authKey !== "string" && typeof options.authKey !== "function") {
      throw new TypeError("authKey must be a string, or a function returning one (or a promise of one)");
    }
    if (options.preConnectionForm !== undefined && !["v1", "seed"].includes(options.preConnectionForm)) {
      throw new TypeError('preConnectionForm must be "v1" or "seed"');
    }
    this.options = { ...DEFAULTS, ...options, reconnect: { ...DEFAULTS.reconnect, ...(options.reconnect ?? {}) } };
    checkOptions(this.options);
    this._configuredUrls = urls.map((u) => u.replace(/\/+$/, ""));
    /** The pre-connection URLs tried in turn: the configured ones, then those draining servers named. */
    this.urls = [...this._configuredUrls];
    /** "idle", "connecting", "syncing", "ready", "closed" */
    this.state = "idle";
    /** The last `hello` frame. */
    this.hello = null;
    /** Counters: messages handed over, duplicates dropped, acks sent, reconnections, last close code. */
    this.stats = { received: 0, duplicates: 0, acksSent: 0, reconnections: 0, holeSyncs: 0, lastCloseCode: null };
    this._socket = null;
    this._pending = new Map();
    this._fullSyncs = new Map();
    this._streams = new Map([[null, new SeqStream(this.options.inboxAfter)]]);
    this._idPrefix = `js-${randomHex(4)}-`;
    this._counter = 0;
    this._ackTimer = null;
    this._pingTimer = null;
    this._moveTo = null;
    this._listeners = new Map();
    this._presenceSubscriptions = new Set();
    this._stop = new AbortController();
    this._running = null;
    this._readyWaiters = [];
    this._urlIndex = 0;
    this._authKey = typeof options.authKey === "string" ? options.authKey : null;
    this._readyCount = 0;
    this._closedResolver = null;
    this._holeTimer = null;
    this._fullSync = null;
  }

  // -- events ---------------------------------------------------------------

  /** Call `listener(detail, event)` on each `type` event; returns a function that removes it. */
  on(type, listener) {
    let byType = this._listeners.get(listener);
    if (!byType) this._listeners.set(listener, (byType = new Map()));
    if (!byType.has(type)) {
      const wrapper = (event) => listener(event.detail, event);
      byType.set(type, wrapper);
      this.addEventListener(type, wrapper);
    }
    return () => this.off(type, listener);
  }

  /** Remove a listener added with `on`. */
  off(type, listener) {
    const byType = this._listeners.get(listener);
    const wrapper = byType?.get(type);
    if (wrapper) {
      this.removeEventListener(type, wrapper);
      byType.delete(type);
    }
  }

  /** Call `listener(detail, event)` on the next `type` event only. */
  once(type, listener) {
    const off = this.on(type, (detail, event) => {
      off();
      listener(detail, event);
    });
    return off;
  }

  _emit(type, detail) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // -- life cycle -----------------------------------------------------------

  /** This node's id (from `hello`), null before the first connection. */
  get nodeId() { return this.hello?.node_id ?? null; }

  /** This node's client_id (from `hello`), null when it has none. */
  get clientId() { return this.hello?.client_id ?? null; }

  /** The server this client is connected to (from `hello`). */
  get serverId() { return this.hello?.server_id ?? null; }

  /** Whether the client is connected and synced. */
  get ready() { return this.state === "ready"; }

  /**
   * The inbox seq up to which everything was handed to the app: an app that
   * keeps it (e.g. in localStorage) and gives it back as `inboxAfter` is never
   * handed those messages again, even if their ack did not reach the server.
   */
  get inboxSeq() { return this._stream(null).watermark; }

  /**
   * Start connecting (and reconnecting whenever the connection drops); resolves
   * with the `hello` frame once connected and synced, rejects when the client
   * stops before that (a refused key, `maxAttempts` reached, close()).
   */
  connect() {
    if (this.state === "closed") return Promise.reject(new ConnectionClosedError("the client was closed"));
    if (this.state === "ready") return Promise.resolve(this.hello);
    const waiter = new Promise((resolve, reject) => this._readyWaiters.push({ resolve, reject }));
    if (this._running === null) {
      this._running = this._run().catch((error) => this._stopWith(error));
    }
    return waiter;
  }

  /** Resolves at the next "ready" (at once when ready now). */
  whenReady() {
    return this.connect();
  }

  /**
   * Close for good: send the pending acks (waiting at most `requestTimeout`),
   * close the socket with 1000 and reject every pending request.
   */
  async close() {
    if (this.state === "closed") return;
    if (this.state === "ready") {
      try {
        await this.flushAcks();
      } catch {
        // closing anyway
      }
    }
    this._stopWith(new ConnectionClosedError("the client was closed"));
    const socket = this._socket;
    if (socket) {
      let timer;
      const closed = new Promise((resolve) => {
        socket.addEventListener("close", () => resolve(), { once: true });
        timer = setTimeout(resolve, 2000); // a dead network never answers the close
      }).finally(() => clearTimeout(timer));
      this._detach(1000, "client closed", true);
      try {
        socket.close(1000);
      } catch {
        // already closing
      }
      await closed;
    }
  }

  _stopWith(error) {
    if (this.state === "closed") return;
    this.state = "closed";
    this._stop.abort();
    this._clearTimers();
    for (const [id, entry] of this._pending) {
      this._pending.delete(id);
      clearTimeout(entry.timer);
      entry.reject(error);
    }
    for (const waiter of this._readyWaiters.splice(0)) waiter.reject(error);
    if (!(error instanceof ConnectionClosedError && error.message === "the client was closed")) {
      this._emit("error", error);
    }
  }

  _clearTimers() {
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    clearInterval(this._pingTimer);
    this._pingTimer = null;
    clearTimeout(this._holeTimer);
    this._holeTimer = null;
  }

  /** The connect loop: connect, sync, wait for the close, pause, again. */
  async _run() {
    const policy = this.options.reconnect;
    let failures = 0;
    while (this.state !== "closed") {
      let closed;
      try {
        closed = await this._connectOnce();
      } catch (error) {
        if (this.state === "closed") return;
        if (error instanceof PreConnectionError && !this._retryable(error)) throw error;
        failures += 1;
        if (failures >= policy.maxAttempts) {
          throw new ConnectionClosedError(`could not connect after ${failures} attempts: ${error.message}`);
        }
        const delay = backoffDelay(failures - 1, policy);
        this._emit("reconnecting", { attempt: failures, delay, error });
        await sleep(delay, this._stop.signal);
        continue;
      }
      const readyAt = Date.now();
      const { code, reason } = await closed;
      if (this.state === "closed") return;
      // a connection that lasted counts as a success; one closed soon after it
      // opened (a server that accepts and drops) keeps the pauses growing
      failures = Date.now() - readyAt >= STABLE_CONNECTION_MS ? 0 : failures + 1;
      const replaced = code === 4009;
      const revoked = code === 4011;
      const moving = code === 1001 || this._moveTo !== null;
      this._emit("disconnected", { code, reason, willReconnect: !replaced && !revoked, movingTo: this._moveTo });
      if (replaced) {
        throw new ConnectionClosedError("replaced: this node opened a newer connection (4009)", code, reason);
      }
      if (revoked) {
        throw new ConnectionClosedError(`revoked by the app's backend (4011): ${reason}`, code, reason);
      }
      if (!moving) {
        // a dropped connection: a random pause first too (many clients of one server do not come back at once)
        const delay = backoffDelay(failures, policy);
        this._emit("reconnecting", { attempt: failures, delay, error: null });
        await sleep(delay, this._stop.signal);
      }
    }
  }

  /** Whether a refused pre-connection is worth trying again. */
  _retryable(error) {
    if (error.keyRefused) return typeof this.options.authKey === "function";
    return error.status !== 400;
  }

  async _currentKey(fresh) {
    if (typeof this.options.authKey === "string") return this.options.authKey;
    if (this._authKey === null || fresh) {
      const key = await this.options.authKey();
      if (typeof key !== "string" || key.length === 0) throw new TypeError("the authKey function gave no key");
      this._authKey = key;
    }
    return this._authKey;
  }

  /**
   * Remember a server a draining one named: later attempts try it in turn with
   * the configured URLs (which may be down by then).  At most
   * MAX_LEARNED_URLS are kept, the newest.
   */
  _learn(url) {
    this._learned = [...(this._learned ?? []).filter((u) => u !== url), url].slice(-MAX_LEARNED_URLS);
    this.urls = [...this._configuredUrls, ...this._learned.filter((u) => !this._configuredUrls.includes(u))];
  }

  _nextBaseUrl() {
    if (this._moveTo !== null) {
      const target = this._moveTo;
      this._moveTo = null;
      return target;
    }
    const url = this.urls[this._urlIndex % this.urls.length];
    this._urlIndex += 1;
    return url;
  }

  /**
   * One attempt: pre-connection, socket, hello, sync.  Resolves (once ready)
   * with a promise of the socket's close; rejects when the attempt failed.
   */
  async _connectOnce() {
    this.state = "connecting";
    const baseUrl = this._nextBaseUrl();
    let info;
    try {
      info = await preConnection(baseUrl, await this._currentKey(false), {
        needProxy: this.options.needProxy, form: this.options.preConnectionForm,
        timeout: this.options.requestTimeout, fetch: this.options.fetch,
      });
    } catch (error) {
      if (error instanceof PreConnectionError && error.keyRefused) this._authKey = null;
      throw error;
    }
    const WebSocketImpl = await webSocketClass(this.options.WebSocket);
    if (this.state === "closed") throw new ConnectionClosedError("the client was closed");
    const { socket, hello, closed } = await this._open(WebSocketImpl, info.node.ws_url);
    if (this.state === "closed") {
      // close() was called while this socket opened
      try { socket.close(1000); } catch { /* closing */ }
      throw new ConnectionClosedError("the client was closed");
    }
    this.hello = hello;
    this.state = "syncing";
    try {
      await this._syncOnConnect();
    } catch (error) {
      if (this._socket === socket) {
        this._detach(4000, `sync failed: ${error.message}`, true);
        try { socket.close(1000); } catch { /* closing */ }
      }
      throw error;
    }
    if (this._socket !== socket || this.state === "closed") {
      throw new ConnectionClosedError("the connection closed during sync");
    }
    this.state = "ready";
    if (this.options.pingInterval > 0) {
      this._pingTimer = setInterval(() => this._checkAlive(socket), this.options.pingInterval);
    }
    this._flushPending();
    this._resubscribe();
    if ([...this._streams.values()].some((stream) => stream.seen.size > 0)) this._holeSoon();
    const reconnected = this._readyCount > 0;
    this._readyCount += 1;
    if (reconnected) this.stats.reconnections += 1;
    for (const waiter of this._readyWaiters.splice(0)) waiter.resolve(hello);
    this._emit("ready", { hello, serverId: hello.server_id, reconnected });
    return closed;
  }

  /** Open the socket and wait for `hello`. */
  _open(WebSocketImpl, wsUrl) {
    return new Promise((resolve, reject) => {
      let socket;
      try {
        socket = new WebSocketImpl(wsUrl);
      } catch (error) {
        reject(error);
        return;
      }
      let helloSeen = false;
      let resolveClosed;
      const closed = new Promise((r) => { resolveClosed = r; });
      const timer = setTimeout(() => {
        if (helloSeen) return;
        try { socket.close(); } catch { /* not open */ }
        if (this._socket === socket) this._detach(4000, "no hello", true);
        reject(new TimeoutError("WebSocket open and hello", this.options.connectTimeout));
      }, this.options.connectTimeout);
      this._socket = socket;
      this._closedResolver = resolveClosed;
      socket.addEventListener("message", (event) => {
        if (this._socket !== socket) return;
        const frame = this._parse(event.data);
        if (frame === null) return;
        if (!helloSeen && frame.op === "hello") {
          helloSeen = true;
          clearTimeout(timer);
          resolve({ socket, hello: frame, closed });
          return;
        }
        try {
          this._onFrame(frame);
        } catch (error) {
          this._emit("error", error); // a frame this client could not handle: reported, never a crash
        }
      });
      socket.addEventListener("close", (event) => {
        if (this._socket !== socket) return;
        clearTimeout(timer);
        this._detach(event.code, event.reason, true);
        if (!helloSeen) reject(new ConnectionClosedError(`WebSocket closed before hello (${event.code})`, event.code, event.reason));
      });
      socket.addEventListener("error", () => {
        // a close event follows; the error itself says nothing more in browsers
      });
    });
  }

  _parse(data) {
    let text = data;
    if (typeof data !== "string") {
      try {
        text = new TextDecoder().decode(data);
      } catch {
        this._emit("error", new Error("a frame from the server that is not text"));
        return null;
      }
    }
    try {
      const frame = JSON.parse(text);
      if (frame && typeof frame === "object" && !Array.isArray(frame)) return frame;
    } catch {
      // below
    }
    this._emit("error", new Error(`a frame from the server that is not a JSON object: ${String(text).slice(0, 100)}`));
    return null;
  }

  /**
   * This socket is gone (closed, or given up on): forget it, fail what waited
   * for its answers (messages stay pending, to be sent again), stop timers.
   */
  _detach(code, reason, notify) {
    const wasConnected = this._socket !== null;
    this._socket = null;
    this.stats.lastCloseCode = code;
    this._clearTimers();
    if (this.state !== "closed") this.state = "connecting";
    for (const [id, entry] of this._pending) {
      if (entry.sent && !entry.retry) {
        this._pending.delete(id);
        clearTimeout(entry.timer);
        entry.reject(new ConnectionClosedError(`connection closed (${code}) before an answer`, code, reason));
      } else {
        entry.sent = false;
      }
    }
    const resolveClosed = this._closedResolver;
    this._closedResolver = null;
    if (notify && wasConnected && resolveClosed) resolveClosed({ code, reason });
  }

  /** A JSON `ping` every `pingInterval`; no answer within `requestTimeout`: the connection is dead. */
  _checkAlive(socket) {
    if (this._socket !== socket || this.state !== "ready") return;
    this.ping().catch((error) => {
      if (error instanceof TimeoutError && this._socket === socket) {
        this._detach(4000, "no answer to ping", true);
        try {
          if (typeof socket.terminate === "function") socket.terminate(); // ws: no close handshake to wait for
          else socket.close();
        } catch { /* dead anyway */ }
      }
    });
  }

  // -- frames ---------------------------------------------------------------

  _onFrame(frame) {
    const op = frame.op;
    if (op === undefined) {
      this._onMessage(frame);
      return;
    }
    if (op === "reconnect") {
      const target = typeof frame.pre_connection_url === "string" && /^https?:\/\//i.test(frame.pre_connection_url)
        ? frame.pre_connection_url.replace(/\/+$/, "") : null;
      this._moveTo = target;
      if (target !== null && !this.urls.includes(target)) this._learn(target);
      return;
    }
    if (op === "member_joined" && frame.you === true && frame.member) {
      this._joined(frame.session_id, frame.member);
    }
    const id = frame.id;
    if (op === "synced" && this._fullSyncs.has(id)) {
      this._synced(frame, this._fullSyncs.get(id));
      this._touch(id);
      return;
    }
    if (id !== undefined && ANSWER_OPS.has(op) && this._pending.has(id)) {
      this._answer(id, frame);
      return;
    }
    if (op === "presence_changed") {
      this._emit("presence", frame);
    } else if (SESSION_EVENTS.has(op)) {
      this._emit("session_event", frame);
    } else if (op === "error") {
      this._emit("error", new AllsparkError(frame));
    } else {
      this._emit("event", frame);
    }
  }

  _onMessage(frame) {
    let stream, seq;
    if (frame.session_seq !== undefined) {
      stream = this._stream(frame.dest_session_id ?? null);
      seq = frame.session_seq;
    } else {
      stream = this._stream(null);
      seq = frame.seq;
    }
    if (typeof seq === "number") {
      if (!stream.accept(seq)) {
        this.stats.duplicates += 1;
        return;
      }
      this._ackSoon(stream);
      if (stream.seen.size > 0) this._holeSoon();
    }
    this.stats.received += 1;
    for (const [id] of this._fullSyncs) this._touch(id);
    this._emit(frame.dest_session_id !== undefined ? "session_message" : "message", frame);
  }

  /**
   * A seq above one not seen yet (a hole): a copy missed on its way, e.g.
   * delivered to a server this node just left.  Every stored message is in the
   * store, so a hole still open after `holeSyncDelay` ms is filled by a sync.
   */
  _holeSoon() {
    if (this._holeTimer !== null || this.state !== "ready") return;
    this._holeTimer = setTimeout(() => {
      this._holeTimer = null;
      const open = [...this._streams.values()].some((stream) => stream.seen.size > 0);
      if (!open || this.state !== "ready") return;
      this.stats.holeSyncs += 1;
      this.sync().catch(() => {}); // a failure here is a dropped connection: its reconnect syncs
    }, this.options.holeSyncDelay);
  }

  _stream(sessionId) {
    let stream = this._streams.get(sessionId);
    if (!stream) {
      stream = new SeqStream();
      this._streams.set(sessionId, stream);
    }
    return stream;
  }

  /** This node is a member (`member` is its own view): its stream starts at its cursor. */
  _joined(sessionId, member) {
    const stream = this._stream(sessionId);
    stream.skipTo(Math.max(member.acked_seq ?? 0, member.joined_seq ?? 0));
    stream.acked = Math.max(stream.acked, member.acked_seq ?? 0);
  }

  /** One part of a full sync: everything up to its `upto` came before it. */
  _synced(frame, round) {
    const sessionId = frame.session_id ?? null;
    if (frame.gap) {
      const gap = { ...frame.gap };
      if (sessionId !== null) gap.session_id = sessionId;
      this._emit("gap", gap);
    }
    if (frame.more) round.more = true;
    const stream = this._stream(sessionId);
    if (typeof frame.upto === "number") stream.skipTo(frame.upto);
    this._ackSoon(stream);
  }

  // -- requests -------------------------------------------------------------

  _nextId() {
    this._counter += 1;
    return `${this._idPrefix}${this._counter}`;
  }

  /**
   * Send `frame` (an `id` is added when it has none); resolves with the answer,
   * rejects with AllsparkError (an error frame), TimeoutError, or
   * ConnectionClosedError.  `immediate`: now, on the current socket (the
   * connect's own requests); otherwise it waits for "ready".  `retry`: sent
   * again with the same id after a reconnect (messages).
   */
  _request(frame, { immediate = false, retry = false, timeout = this.options.requestTimeout } = {}) {
    if (!frame || typeof frame !== "object" || Array.isArray(frame)) {
      return Promise.reject(new TypeError("a frame must be an object"));
    }
    if (this.state === "closed") return Promise.reject(new ConnectionClosedError("the client was closed"));
    const full = { ...frame };
    if (full.id === undefined) full.id = this._nextId();
    if (typeof full.id !== "string" || full.id.length < 1 || full.id.length > 64) {
      return Promise.reject(new TypeError("a frame id must be a string of 1-64 characters"));
    }
    const existing = this._pending.get(full.id);
    if (existing) {
      return existing.retry && retry ? existing.promise
        : Promise.reject(new TypeError(`a request with id ${full.id} is already waiting for its answer`));
    }
    let text;
    try {
      text = JSON.stringify(full);
    } catch (error) {
      return Promise.reject(new TypeError(`the frame cannot be written as JSON: ${error.message}`));
    }
    const tooLarge = this._tooLarge(text);
    if (tooLarge) return Promise.reject(tooLarge);
    if (immediate && this._socket === null) {
      return Promise.reject(new ConnectionClosedError("not connected"));
    }
    const entry = { frame: full, text, sent: false, retry, timer: null, timeout, retries: 0 };
    entry.promise = new Promise((resolve, reject) => {
      entry.resolve = resolve;
      entry.reject = reject;
    });
    entry.timer = setTimeout(() => this._expire(full.id, entry), timeout);
    this._pending.set(full.id, entry);
    if (immediate || this.state === "ready") this._transmit(entry);
    return entry.promise;
  }

  _tooLarge(text) {
    const limit = this.hello?.max_message_size;
    if (typeof limit !== "number" || text.length * 3 <= limit) return null; // 3 bytes at most per UTF-16 unit
    const size = utf8Length(text);
    if (size <= limit) return null;
    return new AllsparkError({ code: "too_large", message: `the frame is ${size} bytes, over the server's max_message_size (${limit})`, limit, size });
  }

  _expire(id, entry) {
    if (this._pending.get(id) !== entry) return;
    this._pending.delete(id);
    entry.reject(new TimeoutError(`${entry.frame.op ?? "message"} ${id}`, entry.timeout, id));
  }

  /** Restart a waiting request's timer (a sync that keeps making progress). */
  _touch(id) {
    const entry = this._pending.get(id);
    if (!entry) return;
    clearTimeout(entry.timer);
    entry.timer = setTimeout(() => this._expire(id, entry), entry.timeout);
  }

  _transmit(entry) {
    const socket = this._socket;
    if (!socket) return;
    const tooLarge = this._tooLarge(entry.text);
    if (tooLarge) {
      this._pending.delete(entry.frame.id);
      clearTimeout(entry.timer);
      entry.reject(tooLarge);
      return;
    }
    try {
      socket.send(entry.text);
      entry.sent = true;
    } catch {
      // the socket is closing: the close event detaches it
    }
  }

  /** Send what waited for "ready", in the order it was asked. */
  _flushPending() {
    for (const entry of this._pending.values()) if (!entry.sent) this._transmit(entry);
  }

  _answer(id, frame) {
    const entry = this._pending.get(id);
    if (frame.op === "error" && entry.retry && RETRYABLE_CODES.has(frame.code)) {
      // the server did not handle it: the same frame again, a little later
      entry.sent = false;
      entry.retries += 1;
      const ceiling = Math.min(2000, 100 * 2 ** Math.min(entry.retries, 5));
      const pause = ceiling / 2 + Math.random() * (ceiling / 2); // jittered: refused messages do not come back together
      setTimeout(() => {
        if (this._pending.get(id) === entry && !entry.sent && this.state === "ready") this._transmit(entry);
      }, pause);
      return;
    }
    this._pending.delete(id);
    clearTimeout(entry.timer);
    if (frame.op === "error") entry.reject(new AllsparkError(frame));
    else entry.resolve(frame);
  }

  /**
   * Send any frame with an `op` (and an `id`, added when missing); resolves
   * with its answer.  Waits for "ready" first (at most the timeout).
   * @param {object} frame
   * @param {{timeout?: number}} [options]
   */
  request(frame, options = {}) {
    return this._request(frame, { timeout: options.timeout ?? this.options.requestTimeout });
  }

  /**
   * Send a message: `dest_id`, `dest_client_id` or `dest_session_id`, with
   * `payload`, `payload1`, `payload2`, `type`, `ephemeral`, `id` as the
   * protocol has them.  Resolves with `accepted`.  Without an `id` it is
   * given one; it waits for "ready" and survives reconnects (sent again with
   * the same id, so the server keeps it once) until `sendTimeout`.  An
   * ephemeral message is now or never: rejected with ConnectionClosedError
   * when not connected, or when its connection closes before `accepted`.
   */
  send(message, options = {}) {
    if (!message || typeof message !== "object" || Array.isArray(message)) {
      return Promise.reject(new TypeError("a message must be an object"));
    }
    if (message.dest_id === undefined && message.dest_client_id === undefined && message.dest_session_id === undefined) {
      return Promise.reject(new TypeError("a message needs dest_id, dest_client_id or dest_session_id"));
    }
    if (message.op !== undefined) return Promise.reject(new TypeError("a message has no op"));
    if (message.ephemeral === true) {
      // now or never: not queued while disconnected, not sent again after a reconnect
      if (this.state !== "ready") return Promise.reject(new ConnectionClosedError("not connected"));
      return this._request(message, { timeout: options.timeout ?? this.options.requestTimeout });
    }
    const sessionId = message.dest_session_id;
    return this._request(message, { retry: true, timeout: options.timeout ?? this.options.sendTimeout })
      .then((accepted) => {
        if (sessionId !== undefined && typeof accepted.session_seq === "number") {
          // a member never receives its own broadcast: count it as handed over
          const stream = this._stream(sessionId);
          stream.accept(accepted.session_seq);
          this._ackSoon(stream);
        }
        return accepted;
      });
  }

  /** `ping`; resolves with `pong`. */
  ping() {
    return this._request({ op: "ping" });
  }

  // -- sync and ack ---------------------------------------------------------

  /** The connect's sync: every session's cursor, then full syncs until no part says `more`. */
  async _syncOnConnect() {
    for (const entry of await this._mySessions(true)) {
      this._joined(entry.session_id, entry);
    }
    for (let round = 0; round < MAX_SYNC_ROUNDS; round += 1) {
      const id = this._nextId();
      const state = { more: false };
      this._fullSyncs.set(id, state);
      try {
        await this._request({ op: "sync", after: this._stream(null).watermark, limit: this.options.syncLimit, id },
          { immediate: true, timeout: this.options.syncTimeout });
      } catch (error) {
        if (!(error instanceof AllsparkError && error.code === "bad_cursor" && this._stream(null).watermark > 0)) {
          throw error;
        }
        // the inbox is behind what this client had (inboxAfter from another store, a
        // store restored from a backup): the server's inbox is the truth, start over
        this._emit("error", error);
        this._streams.set(null, new SeqStream(0));
        continue;
      } finally {
        this._fullSyncs.delete(id);
      }
      if (!state.more) return;
    }
    throw new AllsparkError({ code: "sync_stalled", message: `sync still had more after ${MAX_SYNC_ROUNDS} rounds` });
  }

  /**
   * Sync now (the client does it on every connect by itself): one full `sync`,
   * or with `sessionId` that session page by page.  Resolves with how many new
   * messages were handed over.
   */
  async sync(sessionId = null) {
    const before = this.stats.received;
    if (sessionId === null) {
      // one full sync at a time (the server answers another with sync_in_progress)
      this._fullSync ??= this._syncEverything().finally(() => { this._fullSync = null; });
      await this._fullSync;
      return this.stats.received - before;
    }
    const stream = this._stream(sessionId);
    let after = stream.watermark > 0 ? stream.watermark : null;
    for (let page = 0; page < 10_000; page += 1) {
      const frame = { op: "sync", session_id: sessionId, limit: this.options.syncLimit };
      if (after !== null) frame.after = after;
      const synced = await this._request(frame, { timeout: this.options.syncTimeout });
      this._synced(synced, {});
      if (!synced.more) break;
      if (after !== null && synced.upto <= after) await sleep(50, this._stop.signal);
      after = synced.upto;
    }
    return this.stats.received - before;
  }

  async _syncEverything() {
    const id = this._nextId();
    const state = { more: false };
    this._fullSyncs.set(id, state);
    try {
      await this._request({ op: "sync", after: this._stream(null).watermark, limit: this.options.syncLimit, id },
        { timeout: this.options.syncTimeout });
    } finally {
      this._fullSyncs.delete(id);
    }
  }

  _ackSoon(stream) {
    if (!this.options.autoAck || stream.watermark <= stream.acked) return;
    if (stream.watermark - stream.acked >= this.options.ackEvery) {
      this._sendAcks();
    } else if (this._ackTimer === null) {
      this._ackTimer = setTimeout(() => {
        this._ackTimer = null;
        this._sendAcks();
      }, this.options.ackDelay);
    }
  }

  /** One `ack` for each stream with something handed over since its last one. */
  _sendAcks() {
    const sent = [];
    // autoAck false: the app acks what it processed itself, nothing is acked for it
    if (!this.options.autoAck || this._socket === null || this.state === "connecting") return sent;
    for (const [sessionId, stream] of this._streams) {
      if (stream.watermark <= stream.acked || stream.ackInFlight) continue;
      sent.push(this.ack(stream.watermark, sessionId).catch(() => null));
    }
    for (const [, stream] of this._streams) if (stream.ackInFlight) sent.push(stream.ackInFlight.catch(() => null));
    return sent;
  }

  /**
   * Ack the inbox (or a session's stream) up to `upto`: the server deletes the
   * inbox's messages (moves the session cursor).  With `autoAck` (the
   * default) the client does this by itself.
   */
  ack(upto, sessionId = null) {
    if (!Number.isInteger(upto) || upto < 0) return Promise.reject(new TypeError("upto must be an integer >= 0"));
    const frame = { op: "ack", upto };
    if (sessionId !== null) frame.session_id = sessionId;
    const stream = this._stream(sessionId);
    const before = stream.acked;
    stream.acked = Math.max(stream.acked, upto);
    this.stats.acksSent += 1;
    const done = this._request(frame, { immediate: true }).then((answer) => {
      if (stream.ackInFlight === done) stream.ackInFlight = null;
      if (stream.watermark > stream.acked) this._ackSoon(stream);
      return answer;
    }, (error) => {
      // not acked after all: the next ack covers it
      if (stream.ackInFlight === done) stream.ackInFlight = null;
      stream.acked = Math.min(stream.acked, before);
      throw error;
    });
    stream.ackInFlight = done;
    return done;
  }

  /** Send the batched acks now (with autoAck; without it the app acks by itself); resolves once answered. */
  async flushAcks() {
    clearTimeout(this._ackTimer);
    this._ackTimer = null;
    await Promise.all(this._sendAcks());
  }

  // -- sessions and presence -------------------------------------------------

  /**
   * `create_session` (`session_id`, `anonymous`, `anyone_can_join`,
   * `session_type`: "group" or "game"); resolves with the `session` answer.
   */
  async createSession(options = {}) {
    const answer = await this._request({ ...options, op: "create_session" });
    if (answer.you) this._joined(answer.session_id, answer.you);
    return answer;
  }

  /** `join_session` (`anonymous`; `node_id` when the owner adds another node); resolves with `member`. */
  async joinSession(sessionId, options = {}) {
    const answer = await this._request({ ...options, op: "join_session", session_id: sessionId });
    if (options.node_id === undefined || options.node_id === this.nodeId) this._joined(sessionId, answer);
    return answer;
  }

  /** `unjoin_session` (the owner may name `node_id` or `alias`); resolves with `left`. */
  async unjoinSession(sessionId, options = {}) {
    const answer = await this._request({ ...options, op: "unjoin_session", session_id: sessionId });
    if (options.node_id === undefined && options.alias === undefined) {
      // this node left: nothing more to track or ack there
      this._presenceSubscriptions.delete(sessionId);
      this._streams.delete(sessionId);
    }
    return answer;
  }

  /** `get_session_info`: one page of members (`after`, `limit`); resolves with `session`. */
  sessionInfo(sessionId, { after, limit } = {}) {
    const frame = { op: "get_session_info", session_id: sessionId };
    if (after !== undefined) frame.after = after;
    if (limit !== undefined) frame.limit = limit;
    return this._request(frame);
  }

  /** Every member of a session (`get_session_info` page by page). */
  async sessionMembers(sessionId, limit = 1000) {
    const members = [];
    let after;
    for (let page = 0; page < 100_000; page += 1) {
      const answer = await this.sessionInfo(sessionId, { after, limit });
      members.push(...answer.members);
      if (!answer.more) break;
      after = answer.next;
    }
    return members;
  }

  /** `reveal_anonymity`; resolves with `revealed`. */
  revealAnonymity(sessionId) {
    return this._request({ op: "reveal_anonymity", session_id: sessionId });
  }

  /** `set_master` with `{node_id}` or `{alias}`; resolves with `master`. */
  setMaster(sessionId, member) {
    return this._request({ ...member, op: "set_master", session_id: sessionId });
  }

  async _mySessions(immediate, limit = 1000) {
    const sessions = [];
    let frame = { op: "my_sessions", limit };
    for (let page = 0; page < 100_000; page += 1) {
      const answer = await this._request(frame, { immediate });
      sessions.push(...answer.sessions);
      if (!answer.more) break;
      frame = { op: "my_sessions", limit, after: answer.next };
    }
    return sessions;
  }

  /** Every session this node is a member of, with its cursors (`my_sessions` page by page). */
  mySessions(limit = 1000) {
    return this._mySessions(false, limit);
  }

  /**
   * `presence` with one of `session_id` (and `after`, `limit`), `client_id`,
   * `node_id`; resolves with the `presence` answer.  Use subscribePresence for events.
   */
  presence(query) {
    if (!query || typeof query !== "object") return Promise.reject(new TypeError("presence takes a query object"));
    return this._request({ ...query, op: "presence" });
  }

  /**
   * Subscribe to a session's presence: resolves with the members online now;
   * "presence" events follow (`presence_changed`).  The client subscribes
   * again after every reconnect and emits that answer as a "presence" event.
   */
  async subscribePresence(sessionId) {
    const answer = await this._request({ op: "presence", session_id: sessionId, subscribe: true });
    this._presenceSubscriptions.add(sessionId);
    return answer;
  }

  /** End a presence subscription. */
  unsubscribePresence(sessionId) {
    this._presenceSubscriptions.delete(sessionId);
    return this._request({ op: "presence", session_id: sessionId, subscribe: false });
  }

  _resubscribe() {
    for (const sessionId of this._presenceSubscriptions) {
      this._request({ op: "presence", session_id: sessionId, subscribe: true }).then(
        (answer) => this._emit("presence", answer),
        (error) => {
          if (error instanceof AllsparkError) this._presenceSubscriptions.delete(sessionId);
          this._emit("error", error);
        },
      );
    }
  }

  /** Whether `message` is a copy of what this user sent from another of its devices. */
  isOwnCopy(message) {
    const clientId = this.clientId;
    return clientId !== null && message?.src_client_id === clientId;
  }
}

/** Make a client and connect it; resolves with the client once it is connected and synced. */
export async function connect(options) {
  const client = new AllsparkClient(options);
  await client.connect();
  return client;
}

export default AllsparkClient;
