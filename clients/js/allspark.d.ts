// Types of allspark.js, the Allspark JavaScript client (browsers and Node 20+).
// The wire contract is docs/protocol.md; the guide is docs/clients.md.

/** Any JSON object as the server sends it. */
export type Frame = { [field: string]: unknown };

/** A message as the recipient gets it (docs/protocol.md, "What the recipient gets"). */
export interface Message {
  /** Position in this node's inbox (absent for ephemeral messages and session broadcasts). */
  seq?: number;
  /** Position in the session's stream (session broadcasts only). */
  session_seq?: number;
  src_id: string;
  src_client_id?: string;
  dest_id?: string;
  dest_client_id?: string;
  dest_session_id?: string;
  payload?: unknown;
  payload1?: unknown;
  payload2?: unknown;
  type?: number;
  id?: string;
  ephemeral?: boolean;
  timestamp: number;
}

/** What `send` takes: one destination (or a session plus `dest_id`), content, an optional id. */
export interface OutgoingMessage {
  dest_id?: string;
  dest_client_id?: string;
  dest_session_id?: string;
  payload?: unknown;
  payload1?: unknown;
  payload2?: unknown;
  type?: number;
  ephemeral?: boolean;
  /** 1-64 characters; given one when absent. The same id within 10 minutes is stored once. */
  id?: string;
}

export interface Hello {
  op: "hello";
  node_id: string;
  client_id?: string;
  server_id: string;
  heartbeat: number;
  max_message_size: number;
}

export interface Accepted {
  op: "accepted";
  id: string;
  status: "delivered" | "stored" | "dropped";
  recipients: number;
  live: number;
  session_seq?: number;
  ignored?: string[];
}

export interface ReconnectPolicy {
  /** The first pause's ceiling, ms (default 500). */
  initialDelay?: number;
  /** The largest pause's ceiling, ms (default 30000). */
  maxDelay?: number;
  /** Growth of the ceiling per failed attempt (default 2). */
  factor?: number;
  /** Failed attempts in a row before the client stops (default Infinity). */
  maxAttempts?: number;
}

export interface ClientOptions {
  /** The HTTP(S) base URL of any server of the cluster, or several (tried in turn). */
  url: string | string[];
  /** The node's auth key, or a function giving one (asked again when the key is refused). */
  authKey: string | (() => string | Promise<string>);
  /** Ask for the server's proxy address (clients that reach only 80/443). Default false. */
  needProxy?: boolean;
  /** "v1": GET /v1/pre_connection_info (default); "seed": GET /?get_pre_connection_info=true. */
  preConnectionForm?: "v1" | "seed";
  /** Timeout of a request (op) in ms, and of a pre-connection. Default 10000. */
  requestTimeout?: number;
  /** How long a message may wait for its `accepted`, across reconnects, in ms. Default 60000. */
  sendTimeout?: number;
  /** Socket opening plus `hello`, in ms. Default 15000. */
  connectTimeout?: number;
  /** A sync without any progress for this long fails the connection attempt, ms. Default 60000. */
  syncTimeout?: number;
  /** Rows per store read of a sync (1-1000). Default 500. */
  syncLimit?: number;
  /** Ack what was handed to the app, batched. Default true. */
  autoAck?: boolean;
  /** Batch window of the acks, ms. Default 100. */
  ackDelay?: number;
  /** Ack at once when this many messages of one stream are unacked. Default 100. */
  ackEvery?: number;
  /** The last inbox seq the app processed in an earlier run (it stores it itself). Default 0. */
  inboxAfter?: number;
  /** A JSON ping this often while ready; no pong within requestTimeout: reconnect. 0: off. Default 30000. */
  pingInterval?: number;
  /** A seq missing (a higher one arrived) for this long starts a sync that fetches it, ms. Default 1000. */
  holeSyncDelay?: number;
  reconnect?: ReconnectPolicy;
  /** A WebSocket class (default: the global one, else the `ws` package). */
  WebSocket?: unknown;
  /** A fetch function (default: the global one). */
  fetch?: typeof fetch;
}

export const DEFAULTS: Readonly<Required<Omit<ClientOptions, "url" | "authKey" | "WebSocket" | "fetch" | "reconnect">> & {
  reconnect: Readonly<Required<ReconnectPolicy>>;
}>;

export interface ReadyDetail {
  hello: Hello;
  serverId: string;
  /** False on the first connection, true on every later one. */
  reconnected: boolean;
}

export interface DisconnectedDetail {
  /** The WebSocket close code (1001: the server drains; 4009: replaced, 4011: revoked, neither reconnects). */
  code: number;
  reason: string;
  willReconnect: boolean;
  /** The pre-connection URL a draining server named, or null. */
  movingTo: string | null;
}

export interface ReconnectingDetail {
  /** Failed attempts in a row (0 for the pause after a dropped connection). */
  attempt: number;
  /** The pause before the next attempt, ms. */
  delay: number;
  error: Error | null;
}

export interface GapDetail {
  after: number;
  upto: number;
  session_id?: string;
}

export interface PresenceFrame {
  op: "presence_changed" | "presence";
  session_id?: string;
  /** presence_changed: the member's name in the session. */
  name?: string;
  /** presence_changed: boolean; presence answer: the names online (or for node_id, a boolean). */
  online?: boolean | string[];
  [field: string]: unknown;
}

export interface ClientEvents {
  ready: ReadyDetail;
  message: Message;
  session_message: Message;
  presence: PresenceFrame;
  session_event: Frame;
  disconnected: DisconnectedDetail;
  reconnecting: ReconnectingDetail;
  gap: GapDetail;
  error: Error;
  /** Any other frame from the server that answers nothing. */
  event: Frame;
}

export interface Stats {
  /** Messages handed to the app. */
  received: number;
  /** Copies dropped because their seq/session_seq was handed over already. */
  duplicates: number;
  acksSent: number;
  /** Connections made after the first one. */
  reconnections: number;
  /** Syncs started to fill a hole in the seqs. */
  holeSyncs: number;
  lastCloseCode: number | null;
}

/** The server answered with an error frame. */
export class AllsparkError extends Error {
  readonly code: string;
  readonly frame: Frame;
  constructor(frame: Frame);
}

/** Pre-connection was refused. */
export class PreConnectionError extends Error {
  readonly status: number;
  /** The body's `error`, or "http_<status>". */
  readonly code: string;
  readonly body: unknown;
  /** The auth key itself was refused (401 missing_key, malformed_key, bad_signature, expired_key, bad_claims). */
  readonly keyRefused: boolean;
}

/** No answer in time. */
export class TimeoutError extends Error {
  readonly code: "timeout";
  /** The request's id, when it had one: a message sent again with it is kept once. */
  readonly id: string | null;
}

/** The connection (or the client) closed before the answer. */
export class ConnectionClosedError extends Error {
  readonly code: "connection_closed";
  readonly closeCode: number | null;
  readonly reason: string;
}

/** De-duplication state of one seq stream. */
export class SeqStream {
  watermark: number;
  seen: Set<number>;
  acked: number;
  constructor(watermark?: number);
  accept(seq: number): boolean;
  skipTo(upto: number): void;
}

export class AllsparkClient extends EventTarget {
  constructor(options: ClientOptions);
  readonly options: ClientOptions;
  readonly state: "idle" | "connecting" | "syncing" | "ready" | "closed";
  readonly hello: Hello | null;
  readonly nodeId: string | null;
  readonly clientId: string | null;
  readonly serverId: string | null;
  readonly ready: boolean;
  /** The inbox seq up to which everything was handed over (keep it, give it back as inboxAfter). */
  readonly inboxSeq: number;
  /** The pre-connection URLs tried in turn: the configured ones, then those draining servers named. */
  readonly urls: string[];
  readonly stats: Stats;

  /** Connect (and keep reconnecting); resolves with hello once connected and synced. */
  connect(): Promise<Hello>;
  /** The next "ready" (at once when ready). */
  whenReady(): Promise<Hello>;
  /** Send the batched acks (autoAck), close with 1000, reject what is pending; no reconnect after it. */
  close(): Promise<void>;

  on<K extends keyof ClientEvents>(type: K, listener: (detail: ClientEvents[K], event: CustomEvent<ClientEvents[K]>) => void): () => void;
  off<K extends keyof ClientEvents>(type: K, listener: (detail: ClientEvents[K], event: CustomEvent<ClientEvents[K]>) => void): void;
  once<K extends keyof ClientEvents>(type: K, listener: (detail: ClientEvents[K], event: CustomEvent<ClientEvents[K]>) => void): () => void;

  /** Send a message; resolves with `accepted`. Waits for "ready"; survives reconnects (same id). */
  send(message: OutgoingMessage, options?: { timeout?: number }): Promise<Accepted>;
  /** Any control frame (an `op`); resolves with its answer frame. */
  request(frame: Frame & { op: string }, options?: { timeout?: number }): Promise<Frame>;
  ping(): Promise<Frame>;
  /** Sync now (done by itself on every connect); how many new messages were handed over. */
  sync(sessionId?: string | null): Promise<number>;
  ack(upto: number, sessionId?: string | null): Promise<Frame>;
  /** Send the batched acks now; resolves once answered. */
  flushAcks(): Promise<void>;

  createSession(options?: { session_id?: string; anonymous?: boolean; anyone_can_join?: boolean; session_type?: "group" | "game" }): Promise<Frame>;
  joinSession(sessionId: string, options?: { anonymous?: boolean; node_id?: string }): Promise<Frame>;
  unjoinSession(sessionId: string, options?: { node_id?: string; alias?: string }): Promise<Frame>;
  sessionInfo(sessionId: string, page?: { after?: string; limit?: number }): Promise<Frame>;
  sessionMembers(sessionId: string, limit?: number): Promise<Frame[]>;
  revealAnonymity(sessionId: string): Promise<Frame>;
  setMaster(sessionId: string, member: { node_id?: string; alias?: string }): Promise<Frame>;
  mySessions(limit?: number): Promise<Frame[]>;
  presence(query: { session_id?: string; client_id?: string; node_id?: string; after?: string; limit?: number }): Promise<Frame>;
  /** Resolves with the members online now; "presence" events follow; renewed after every reconnect. */
  subscribePresence(sessionId: string): Promise<Frame>;
  unsubscribePresence(sessionId: string): Promise<Frame>;
  /** Whether a message is a copy of what this user sent from another of its devices. */
  isOwnCopy(message: Message): boolean;
}

/** Ask a server where to connect (the pre-connection answer). */
export function preConnection(
  baseUrl: string,
  authKey: string,
  options?: { needProxy?: boolean; form?: "v1" | "seed"; timeout?: number; fetch?: typeof fetch },
): Promise<{ validation_token: string; expires_in: number; node: { node_id: string; host: string; port: number; proxy_address: string | null; ws_url: string } }>;

/** The pause before a reconnect attempt: uniform in [0, min(maxDelay, initialDelay * factor^attempt)). */
export function backoffDelay(attempt: number, policy: Required<Omit<ReconnectPolicy, "maxAttempts">>, random?: () => number): number;

/** A new client, connected and synced. */
export function connect(options: ClientOptions): Promise<AllsparkClient>;

export default AllsparkClient;
