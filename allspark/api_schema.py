"""The OpenAPI 3.1 document of the server API (:mod:`allspark.api`), written
by hand and served at ``GET /api/v1/openapi.json``.

``tests/test_api_schema.py`` keeps it true: every route of
:class:`allspark.api.ServerAPI` is here with its method and none more, the
publish body names exactly the client contract's message fields plus
``sender_id``, and the error codes are :data:`allspark.api.ERROR_CODES`.
``tests/e2e/test_api_schemathesis.py`` runs schemathesis with it against a
real server.
"""

from __future__ import annotations

import copy
from typing import Any

from allspark.api import ERROR_CODES, MAX_PRESENCE_IDS, MAX_REASON_CHARS, MAX_REVOKE_UNTIL
from allspark.envelope import MAX_PUSH_TEXT

ID_PATTERN = "^[A-Za-z0-9_.:@-]{1,128}$"


def _id(description: str) -> dict[str, Any]:
    return {"type": "string", "pattern": ID_PATTERN, "description": description}


def _error(description: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


def _json(description: str, schema_name: str) -> dict[str, Any]:
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema_name}"}}}}


#: Answers every authenticated operation may give.
_COMMON_ERRORS = {
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "405": {"$ref": "#/components/responses/MethodNotAllowed"},
    "503": {"$ref": "#/components/responses/Unavailable"},
}
_BAD_REQUEST = {"400": _error("`bad_request`: a parameter or the body breaks the rules above")}
_BODY_ERRORS = {
    **_BAD_REQUEST,
    "413": _error("`too_large`: the body is over 64 KiB, or the message as delivered would be over "
                  "`--max-message-size`"),
    "415": _error("`unsupported_media_type`: a body that is not `application/json`"),
}

# A JSON value as the server carries it: integers from -2^63 to 2^64-1 (larger
# ones could not arrive exactly), nesting at most 128 levels.
_JSON_VALUE: dict[str, Any] = {
    "description": "any JSON value; integers from -2^63 to 2^64-1, nested at most 128 levels",
    "anyOf": [
        {"type": "string"},
        {"type": "boolean"},
        {"type": "null"},
        {"type": "integer", "minimum": -(2**63), "maximum": 2**64 - 1},
        {"type": "number", "minimum": -9.2e18, "maximum": 1.8e19},
        {"type": "array", "items": {"$ref": "#/components/schemas/JSONValue"}},
        {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/JSONValue"}},
    ],
}

_DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Allspark server API",
        "version": "1.0.0",
        "description": (
            "What the application's backend asks of an Allspark cluster: publish messages, query presence, "
            "disconnect and revoke nodes, read inbox depth, list and drain servers. Every request is "
            "authenticated with `Authorization: Bearer <API key>` (an API key of its own, configured with "
            "--api-key-file or $ALLSPARK_API_KEYS; without one the API answers 503 `api_disabled`). Every "
            "answer is JSON; every error is `{\"error\": code, \"message\": text}`. See docs/api.md."
        ),
    },
    "security": [{"apiKey": []}],
    "paths": {
        "/api/v1/publish": {
            "post": {
                "operationId": "publish",
                "summary": "Send a message as the app, on the same path as a client's message",
                "description": (
                    "Stored in every recipient's inbox (or the session's stream) before the answer, delivered "
                    "live to recipients online anywhere in the cluster, synced by the others. A retry with the "
                    "same `sender_id` and `id` within 10 minutes stores nothing more and gets the first answer."
                ),
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {
                        "schema": {"$ref": "#/components/schemas/Publish"},
                        "examples": {
                            "node": {"value": {"dest_id": "alice", "id": "order-1234-shipped",
                                               "payload": {"text": "your order has shipped"}}},
                            "client": {"value": {"dest_client_id": "alice-account", "payload": "hello",
                                                 "type": 3}},
                        },
                    }},
                },
                "responses": {
                    "200": _json("`accepted`: stored (and delivered to those online)", "Accepted"),
                    **_BODY_ERRORS,
                    "403": _error("`sender_not_allowed`: `sender_id` is not one of --api-sender-id; "
                                  "`not_allowed`: the destination refuses it"),
                    "404": _error("`unknown_destination`: no such node, client or session"),
                    "429": _error("`inbox_full` / `session_full`: a quota is reached; nothing was stored"),
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v1/presence": {
            "get": {
                "operationId": "presence",
                "summary": "Whether nodes, and which nodes of clients, are online anywhere in the cluster",
                "parameters": [
                    {"name": "node_id", "in": "query", "required": False, "style": "form", "explode": True,
                     "description": "a node to ask about (repeatable)",
                     "schema": {"type": "array", "maxItems": MAX_PRESENCE_IDS, "items": _id("a node_id")}},
                    {"name": "client_id", "in": "query", "required": False, "style": "form", "explode": True,
                     "description": "a client whose online nodes to list (repeatable)",
                     "schema": {"type": "array", "maxItems": MAX_PRESENCE_IDS, "items": _id("a client_id")}},
                ],
                "responses": {
                    "200": _json("who is online", "Presence"),
                    **_BAD_REQUEST,
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v1/nodes/{node_id}/disconnect": {
            "post": {
                "operationId": "disconnectNode",
                "summary": "Close a node's connections on every server; optionally revoke its keys until a time",
                "description": (
                    "Closes the node's connections on this server and, over the peer links, on every other "
                    "(close code 4010 `disconnected: <reason>`, or 4011 `revoked: <reason>` while revoked). "
                    "With `revoke_until` the revocation is stored first: pre-connection and handshakes of the "
                    "node are refused with 401 `revoked` until then. `revoke_until` 0 (or a time passed) lifts it."
                ),
                "parameters": [{"name": "node_id", "in": "path", "required": True, "schema": _id("the node")}],
                "requestBody": {
                    "required": False,
                    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Disconnect"}}},
                },
                "responses": {
                    "200": _json("closed here, and the servers told", "Disconnected"),
                    **_BODY_ERRORS,
                    "501": _error("`not_supported`: this server's store keeps no revocations"),
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v1/nodes/{node_id}/inbox": {
            "get": {
                "operationId": "inboxDepth",
                "summary": "How many messages a node has not acked, and its seqs",
                "parameters": [{"name": "node_id", "in": "path", "required": True, "schema": _id("the node"),
                                "example": "alice"}],
                "responses": {
                    "200": _json("the inbox's depth", "InboxDepth"),
                    **_BAD_REQUEST,
                    "404": _error("`unknown_node`: the node never connected"),
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v1/servers": {
            "get": {
                "operationId": "listServers",
                "summary": "The cluster: every server record, its state and load",
                "responses": {
                    "200": _json("the cluster view", "Servers"),
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v1/servers/{server_id}/drain": {
            "post": {
                "operationId": "drainServer",
                "summary": "Drain a server of the cluster (as SIGTERM does), through its peer link",
                "parameters": [{"name": "server_id", "in": "path", "required": True,
                                "schema": _id("the server (its --server-id)")}],
                "responses": {
                    "202": _json("the server was asked to drain", "Draining"),
                    **_BAD_REQUEST,
                    "404": _error("`unknown_server`: no live server of that id"),
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v1/drain": {
            "post": {
                "operationId": "drainThisServer",
                "summary": "Drain the server answering (as SIGTERM does): clients are told to reconnect elsewhere",
                "responses": {
                    "202": _json("this server drains once the answer is written", "Draining"),
                    **_COMMON_ERRORS,
                },
            },
        },
        "/api/v1/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document (no key needed)",
                "security": [],
                "responses": {
                    "200": {"description": "the OpenAPI document",
                            "content": {"application/json": {"schema": {"type": "object"}}}},
                    "405": {"$ref": "#/components/responses/MethodNotAllowed"},
                },
            },
        },
    },
    "components": {
        "securitySchemes": {
            "apiKey": {"type": "http", "scheme": "bearer",
                       "description": "an API key from --api-key-file or $ALLSPARK_API_KEYS"},
        },
        "responses": {
            "Unauthorized": {
                **_error("`missing_api_key` or `bad_api_key`"),
                "headers": {"WWW-Authenticate": {"schema": {"type": "string"}}},
            },
            "MethodNotAllowed": {
                **_error("`method_not_allowed`; `Allow` names the methods"),
                "headers": {"Allow": {"schema": {"type": "string"}}},
            },
            "Unavailable": _error("`api_disabled`: no API key is configured; `unreachable`: no peer link to "
                                  "the server named; `unavailable`: this server cannot do it now"),
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {
                    "error": {"type": "string", "enum": list(ERROR_CODES)},
                    "message": {"type": "string"},
                },
            },
            "JSONValue": _JSON_VALUE,
            "Publish": {
                "type": "object",
                "additionalProperties": False,
                "oneOf": [{"required": ["dest_id"]}, {"required": ["dest_client_id"]},
                          {"required": ["dest_session_id"]}],
                "properties": {
                    "dest_id": _id("one node"),
                    "dest_client_id": _id("every node of a client"),
                    "dest_session_id": _id("every member of a session (the app needs no membership)"),
                    "id": {"type": "string", "minLength": 1, "maxLength": 64,
                           "description": "de-duplication: a retry with the same id is not a second message"},
                    "sender_id": _id("the app node id the message comes from (src_id for recipients): one of "
                                     "--api-sender-id, default the first (`app`)"),
                    "ephemeral": {"type": "boolean", "description": "not stored: only live recipients get it"},
                    "type": {"type": "integer", "exclusiveMinimum": -(2**53), "exclusiveMaximum": 2**53},
                    "payload": {"$ref": "#/components/schemas/JSONValue"},
                    "payload1": {"$ref": "#/components/schemas/JSONValue"},
                    "payload2": {"$ref": "#/components/schemas/JSONValue"},
                    "push": {"type": "boolean",
                             "description": "false: this message schedules no push notification (docs/push.md)"},
                    "push_text": {"type": "string", "maxLength": MAX_PUSH_TEXT,
                                  "description": "a short text a push notification may show"},
                },
            },
            "Accepted": {
                "type": "object",
                "required": ["op", "status", "recipients", "live"],
                "properties": {
                    "op": {"const": "accepted"},
                    "id": {"type": "string"},
                    "status": {"enum": ["delivered", "stored", "dropped"]},
                    "recipients": {"type": "integer", "minimum": 0},
                    "live": {"type": "integer", "minimum": 0},
                    "session_seq": {"type": "integer", "minimum": 1},
                },
            },
            "Presence": {
                "type": "object",
                "required": ["nodes", "clients"],
                "properties": {
                    "nodes": {"type": "object", "additionalProperties": {"type": "boolean"},
                              "description": "node_id -> online"},
                    "clients": {"type": "object", "additionalProperties": {"type": "array",
                                                                           "items": {"type": "string"}},
                                "description": "client_id -> its online node_ids"},
                },
            },
            "Disconnect": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "revoke_until": {"type": "number", "minimum": 0, "maximum": MAX_REVOKE_UNTIL,
                                     "description": "Unix time (s): refuse the node's keys until then; 0 lifts"},
                    "reason": {"type": "string", "maxLength": MAX_REASON_CHARS,
                               "description": "said in the close frame's reason"},
                },
            },
            "Disconnected": {
                "type": "object",
                "required": ["node_id", "closed", "servers_told", "unreachable", "revoked_until"],
                "properties": {
                    "node_id": {"type": "string"},
                    "closed": {"type": "integer", "minimum": 0, "description": "connections closed here"},
                    "servers_told": {"type": "array", "items": {"type": "string"},
                                     "description": "peers sent the disconnect over their link"},
                    "unreachable": {"type": "array", "items": {"type": "string"},
                                    "description": "live servers without a link up: not told"},
                    "revoked_until": {"type": ["integer", "null"]},
                },
            },
            "InboxDepth": {
                "type": "object",
                "required": ["node_id", "unacked", "last_seq", "acked_upto", "purged_upto", "oldest_stored_ms"],
                "properties": {
                    "node_id": {"type": "string"},
                    "unacked": {"type": "integer", "minimum": 0},
                    "last_seq": {"type": "integer", "minimum": 0},
                    "acked_upto": {"type": "integer", "minimum": 0},
                    "purged_upto": {"type": "integer", "minimum": 0},
                    "oldest_stored_ms": {"type": ["integer", "null"]},
                },
            },
            "Servers": {
                "type": "object",
                "required": ["server_id", "servers"],
                "properties": {
                    "server_id": {"type": "string", "description": "the server answering"},
                    "servers": {"type": "array", "items": {
                        "type": "object",
                        "required": ["server_id", "host", "port", "state", "connections", "capacity"],
                        "properties": {
                            "server_id": {"type": "string"},
                            "host": {"type": "string"},
                            "port": {"type": "integer"},
                            "scheme": {"type": "string"},
                            "proxy_address": {"type": ["string", "null"]},
                            "state": {"enum": ["live", "draining", "dead"]},
                            "connections": {"type": "integer"},
                            "capacity": {"type": "integer"},
                            "heartbeat_age_ms": {"type": "integer"},
                            "started_ms": {"type": "integer"},
                        },
                    }},
                },
            },
            "Draining": {
                "type": "object",
                "required": ["server_id", "state"],
                "properties": {"server_id": {"type": "string"}, "state": {"const": "draining"}},
            },
        },
    },
}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI document (a copy: callers may change it)."""
    return copy.deepcopy(_DOCUMENT)
