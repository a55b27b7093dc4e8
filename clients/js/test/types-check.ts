// Compiled (never run) by types.test.mjs with `tsc --noEmit --strict`: the
// declarations in allspark.d.ts describe the module as an app uses it.

import AllsparkDefault, {
  AllsparkClient, AllsparkError, ConnectionClosedError, DEFAULTS, PreConnectionError, TimeoutError,
  backoffDelay, connect, preConnection,
  type Accepted, type ClientOptions, type Hello, type Message,
} from "../allspark.js";

const options: ClientOptions = {
  url: ["http://127.0.0.1:8080", "http://127.0.0.1:8081"],
  authKey: async () => "key",
  needProxy: false,
  preConnectionForm: "seed",
  reconnect: { initialDelay: 100, maxDelay: 5000 },
  ackDelay: 50,
};

async function app(): Promise<void> {
  const client: AllsparkClient = new AllsparkDefault(options);
  const off = client.on("message", (message: Message) => console.log(message.seq, message.src_id, message.payload));
  off();
  client.on("ready", ({ hello, reconnected }) => console.log(hello.server_id, reconnected));
  client.on("disconnected", ({ code, willReconnect, movingTo }) => console.log(code, willReconnect, movingTo));
  client.on("presence", (frame) => console.log(frame.session_id, frame.name, frame.online));
  client.addEventListener("session_message", (event) => console.log((event as CustomEvent<Message>).detail));
  const hello: Hello = await client.connect();
  console.log(hello.max_message_size, client.nodeId, client.serverId, client.state, client.stats.duplicates);
  const accepted: Accepted = await client.send({ dest_id: "bob", payload: { text: "hi" }, id: "m-1" });
  console.log(accepted.status === "delivered", accepted.session_seq);
  const session = await client.createSession({ anyone_can_join: true, session_type: "group" });
  await client.joinSession(String(session.session_id), { anonymous: true });
  await client.subscribePresence(String(session.session_id));
  await client.sessionMembers(String(session.session_id));
  await client.flushAcks();
  await client.close();
  const other = await connect({ url: "http://127.0.0.1:8080", authKey: "key" });
  await other.ack(3, null);
  const info = await preConnection("http://127.0.0.1:8080", "key", { needProxy: true, form: "v1" });
  console.log(info.node.ws_url, backoffDelay(2, DEFAULTS.reconnect));
}

function explain(error: unknown): string {
  if (error instanceof AllsparkError) return error.code;
  if (error instanceof PreConnectionError) return `${error.status} ${error.code} ${error.keyRefused}`;
  if (error instanceof TimeoutError || error instanceof ConnectionClosedError) return error.code;
  return String(error);
}

void app().catch(explain);
