// The Allspark demo chat: sign in as a name, see who is online, chat one to one and in sessions
// (anonymous ones too), and find what was sent while the tab was closed when it comes back.
//
// It uses the JavaScript client (allspark.js) as any app would. The only demo-specific part is
// where the auth key comes from: POST /demo/key, which a server answers only with --demo. A real
// app's backend mints keys after its own login.
//
// Who is who: the user's name is the client_id; each browser gets a device id per name (kept in
// localStorage, so a reopened tab is the same device and syncs what it missed); the node_id is
// "name@device". Everyone joins the session "demo-lobby", whose presence says who is online.
// Conversations are kept in localStorage per node (the server deletes messages once acked).

import { AllsparkClient, AllsparkError } from "./allspark.js";

const LOBBY = "demo-lobby";
const HISTORY_LIMIT = 200;
const STORE = "allspark-demo";

const $ = (id) => document.getElementById(id);

const state = {
  client: null,
  name: null,
  nodeId: null,
  onlineNodes: new Set(), // node_ids online in the lobby
  people: new Set(), // names: lobby members and conversation partners
  sessions: new Map(), // session_id -> {anonymous, alias} (filled when opened)
  history: {}, // conversation key ("user:NAME" or "session:ID") -> [entry]
  unread: {}, // conversation key -> count
  active: null, // the open conversation's key
};

// -- storage ---------------------------------------------------------------------------------------

function randomId(length = 12) {
  const bytes = new Uint8Array(length);
  crypto.getRandomValues(bytes);
  return Array.from(bytes, (b) => "abcdefghijklmnopqrstuvwxyz0123456789"[b % 36]).join("");
}

function deviceFor(name) {
  const key = `${STORE}.device.${name}`;
  let device = localStorage.getItem(key);
  if (!device) {
    device = randomId();
    localStorage.setItem(key, device);
  }
  return device;
}

function savedName() {
  return sessionStorage.getItem(`${STORE}.name`) ?? localStorage.getItem(`${STORE}.name`);
}

function loadConversations() {
  try {
    const saved = JSON.parse(localStorage.getItem(`${STORE}.history.${state.nodeId}`) ?? "{}");
    state.history = saved.history ?? {};
    state.active = saved.active ?? null;
  } catch {
    state.history = {};
    state.active = null;
  }
  for (const key of Object.keys(state.history)) {
    if (key.startsWith("user:")) state.people.add(key.slice(5));
    if (key.startsWith("session:")) addSession(key.slice(8));
  }
}

function saveConversations() {
  const data = JSON.stringify({ history: state.history, active: state.active });
  localStorage.setItem(`${STORE}.history.${state.nodeId}`, data);
}

// -- the server ------------------------------------------------------------------------------------

async function mintKey(name, device) {
  const response = await fetch("/demo/key", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ name, device }),
  });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) throw new Error(body.message ?? `the server answered ${response.status}`);
  return body;
}

async function signIn(name) {
  const device = deviceFor(name);
  const minted = await mintKey(name, device);
  state.name = name;
  state.nodeId = minted.node_id;
  sessionStorage.setItem(`${STORE}.name`, name);
  localStorage.setItem(`${STORE}.name`, name);
  loadConversations();
  showChat();

  const client = new AllsparkClient({
    url: location.origin,
    // the first key is the one just minted; later connections mint a fresh one
    authKey: async () => {
      if (minted.auth_key) {
        const key = minted.auth_key;
        minted.auth_key = null;
        return key;
      }
      return (await mintKey(name, device)).auth_key;
    },
  });
  state.client = client;
  client.on("message", onDirectMessage);
  client.on("session_message", onSessionMessage);
  client.on("presence", onPresence);
  client.on("session_event", onSessionEvent);
  client.on("ready", () => {
    setStatus("ready");
    refreshSessions().catch(showError);
  });
  client.on("reconnecting", () => setStatus("connecting"));
  client.on("disconnected", (d) => setStatus(d.willReconnect ? "connecting" : "offline"));
  client.on("error", (error) => console.warn("allspark:", error));

  setStatus("connecting");
  await client.connect(); // connected, and everything missed is synced (the events above fired)
  await enterLobby();
}

async function enterLobby() {
  const client = state.client;
  try {
    await client.joinSession(LOBBY);
  } catch (error) {
    if (!(error instanceof AllsparkError) || error.code !== "no_such_session") throw error;
    try {
      await client.createSession({ session_id: LOBBY, anyone_can_join: true });
    } catch (again) {
      // another tab created it meanwhile
      if (!(again instanceof AllsparkError) || again.code !== "session_exists") throw again;
      await client.joinSession(LOBBY);
    }
  }
  for (const member of await client.sessionMembers(LOBBY, 1000)) addPerson(userOf(member.name));
  const answer = await client.subscribePresence(LOBBY);
  setOnline(answer.online);
  $("chat").dataset.lobby = "joined"; // who is online is known from here on
}

async function refreshSessions() {
  for (const session of await state.client.mySessions(1000)) {
    if (session.session_id !== LOBBY) addSession(session.session_id);
  }
  renderSessions();
}

// -- what arrives ----------------------------------------------------------------------------------

function userOf(nodeId) {
  return String(nodeId).split("@")[0];
}

function textOf(message) {
  const payload = message.payload;
  if (payload && typeof payload === "object" && typeof payload.text === "string") return payload.text;
  return JSON.stringify(payload ?? null);
}

function onDirectMessage(message) {
  const own = state.client.isOwnCopy(message); // sent by this user from another device
  const peer = own ? message.dest_client_id : message.src_client_id ?? userOf(message.src_id);
  if (!peer) return;
  addPerson(peer);
  record(`user:${peer}`, {
    key: `${own ? "out" : "in"}:${message.src_id}:${message.id}`,
    from: own ? state.name : peer,
    text: textOf(message),
    ts: message.timestamp,
    mine: own,
  });
}

function onSessionMessage(message) {
  const sessionId = message.dest_session_id;
  if (sessionId === LOBBY) return;
  addSession(sessionId);
  const from = message.src_client_id ?? message.src_id; // an anonymous member: its alias
  record(`session:${sessionId}`, {
    key: `in:${message.src_id}:${message.id}`,
    from: message.seq !== undefined ? `${from} (to you only)` : from,
    text: textOf(message),
    ts: message.timestamp,
    mine: false,
  });
}

function onPresence(frame) {
  if (frame.session_id !== LOBBY) return;
  if (frame.op === "presence") {
    setOnline(frame.online); // the subscription renewed after a reconnect
    return;
  }
  if (frame.online) state.onlineNodes.add(frame.name);
  else state.onlineNodes.delete(frame.name);
  addPerson(userOf(frame.name));
  renderPeople();
}

function onSessionEvent(frame) {
  if (frame.session_id === LOBBY && frame.op === "member_joined" && frame.member?.name) {
    addPerson(userOf(frame.member.name));
  }
  // a member came or went: the open session's member count is read again
  if (frame.session_id !== LOBBY && state.active === `session:${frame.session_id}`) {
    openConversation(state.active);
  }
}

function setOnline(names) {
  state.onlineNodes = new Set(Array.isArray(names) ? names : []);
  for (const nodeId of state.onlineNodes) addPerson(userOf(nodeId));
  renderPeople();
}

function addPerson(name) {
  if (!name || name === state.name || state.people.has(name)) return;
  state.people.add(name);
  renderPeople();
}

function addSession(sessionId) {
  if (!sessionId || state.sessions.has(sessionId)) return;
  state.sessions.set(sessionId, {});
  renderSessions();
}

/** Add an entry to a conversation once (entries are keyed by sender and message id). */
function record(conversation, entry) {
  const entries = (state.history[conversation] ??= []);
  const existing = entries.find((e) => e.key === entry.key);
  if (existing) return existing;
  entries.push(entry);
  entries.sort((a, b) => a.ts - b.ts);
  if (entries.length > HISTORY_LIMIT) entries.splice(0, entries.length - HISTORY_LIMIT);
  if (conversation !== state.active && !entry.mine) {
    state.unread[conversation] = (state.unread[conversation] ?? 0) + 1;
  }
  saveConversations();
  renderPeople();
  renderSessions();
  if (conversation === state.active) renderConversation();
  return entry;
}

// -- what the user does ----------------------------------------------------------------------------

async function sendText(text) {
  const conversation = state.active;
  const id = randomId(20);
  const destination = conversation.startsWith("user:")
    ? { dest_client_id: conversation.slice(5) }
    : { dest_session_id: conversation.slice(8) };
  const entry = record(conversation, {
    key: `out:${state.nodeId}:${id}`, from: "you", text, ts: Date.now(), mine: true, status: "sending",
  });
  renderConversation();
  try {
    const accepted = await state.client.send({ ...destination, id, payload: { text } });
    entry.status = accepted.status; // delivered (someone online got it) or stored (for later)
  } catch (error) {
    entry.status = `not sent: ${error.code ?? error.message}`;
    showError(error);
  }
  saveConversations();
  renderConversation();
}

async function openConversation(conversation) {
  state.active = conversation;
  delete state.unread[conversation];
  saveConversations();
  renderPeople();
  renderSessions();
  renderConversation();
  if (conversation.startsWith("session:")) {
    const sessionId = conversation.slice(8);
    try {
      const info = await state.client.sessionInfo(sessionId);
      state.sessions.set(sessionId, { anonymous: info.you?.anonymous, alias: info.you?.alias, count: info.member_count });
      renderConversation();
    } catch (error) {
      showError(error);
    }
  }
}

async function createSession() {
  const sessionId = $("session-id").value.trim();
  const answer = await state.client.createSession({
    ...(sessionId ? { session_id: sessionId } : {}),
    anonymous: $("session-anonymous").checked,
    anyone_can_join: true,
  });
  addSession(answer.session_id);
  $("session-id").value = "";
  await openConversation(`session:${answer.session_id}`);
}

async function joinSession() {
  const sessionId = $("session-id").value.trim();
  if (!sessionId) throw new Error("type the id of the session to join");
  await state.client.joinSession(sessionId, { anonymous: $("session-anonymous").checked });
  addSession(sessionId);
  $("session-id").value = "";
  await openConversation(`session:${sessionId}`);
}

async function signOut() {
  sessionStorage.removeItem(`${STORE}.name`);
  localStorage.removeItem(`${STORE}.name`);
  if (state.client) await state.client.close();
  location.reload();
}

// -- rendering -------------------------------------------------------------------------------------

function element(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (name === "class") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child); // text is added as text, never as HTML
  return node;
}

function setStatus(status) {
  $("status").dataset.state = status;
  $("status").textContent = status;
}

function showError(error) {
  const text = error instanceof Error ? error.message : String(error);
  $("error").textContent = text;
  $("error").hidden = false;
}

function showChat() {
  $("sign-in").hidden = true;
  $("chat").hidden = false;
  $("sign-out").hidden = false;
  $("me").textContent = `${state.name} (${state.nodeId})`;
  renderPeople();
  renderSessions();
  renderConversation();
}

function listItem(conversation, label, extra = {}) {
  const unread = state.unread[conversation] ?? 0;
  const item = element("li", extra, element("span", { class: "dot" }), element("span", { class: "label" }, label));
  if (unread) item.append(element("span", { class: "unread", "data-test": "unread" }, String(unread)));
  if (conversation === state.active) item.classList.add("active");
  item.addEventListener("click", () => openConversation(conversation));
  return item;
}

function renderPeople() {
  const online = new Set([...state.onlineNodes].map(userOf));
  const items = [...state.people].sort().map((name) =>
    listItem(`user:${name}`, name, { "data-test": "person", "data-name": name, "data-online": String(online.has(name)) }),
  );
  $("people").replaceChildren(...items);
}

function renderSessions() {
  const items = [...state.sessions.keys()].sort().map((sessionId) =>
    listItem(`session:${sessionId}`, sessionId, { "data-test": "session", "data-session": sessionId }),
  );
  $("sessions").replaceChildren(...items);
}

function renderConversation() {
  const conversation = state.active;
  $("compose").hidden = !conversation;
  if (!conversation) return;
  let note = "";
  if (conversation.startsWith("user:")) {
    $("conversation-title").textContent = `Chat with ${conversation.slice(5)}`;
    note = "Messages reach every device of that user, and wait for the ones offline.";
  } else {
    const sessionId = conversation.slice(8);
    const session = state.sessions.get(sessionId) ?? {};
    $("conversation-title").textContent = `Session ${sessionId}`;
    if (session.alias) {
      note = session.anonymous
        ? `You are anonymous here: the others see you as ${session.alias}.`
        : `Members: ${session.count}. Others see you as ${state.nodeId}.`;
    }
  }
  $("conversation-note").textContent = note;
  const items = (state.history[conversation] ?? []).map((entry) => {
    const time = new Date(entry.ts).toLocaleTimeString();
    return element(
      "li",
      { "data-test": "message", "data-key": entry.key, "data-from": entry.from, class: entry.mine ? "mine" : "" },
      element("span", { class: "from" }, entry.mine ? "you" : entry.from),
      element("span", { class: "text", "data-test": "message-text" }, entry.text),
      element("span", { class: "meta" }, entry.status ? `${time} · ${entry.status}` : time),
    );
  });
  $("messages").replaceChildren(...items);
  $("messages").scrollTop = $("messages").scrollHeight;
}

// -- wiring ----------------------------------------------------------------------------------------

function guarded(action) {
  return (event) => {
    event?.preventDefault();
    $("error").hidden = true;
    Promise.resolve().then(action).catch(showError);
  };
}

$("sign-in").addEventListener("submit", guarded(() => signIn($("name").value.trim())));
$("compose").addEventListener("submit", guarded(() => {
  const text = $("text").value.trim();
  if (!text) return undefined;
  $("text").value = "";
  return sendText(text);
}));
$("create-session").addEventListener("click", guarded(createSession));
$("join-session").addEventListener("click", guarded(joinSession));
$("sign-out").addEventListener("click", guarded(signOut));

const remembered = savedName();
if (remembered) guarded(() => signIn(remembered))();
