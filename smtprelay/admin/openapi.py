"""The OpenAPI 3 description of the admin API, served at ``GET /api/openapi.json``.

Built as a Python dict so that shared pieces (the error shape, the delivery,
the status) are written once.  ``tests/test_admin_openapi.py`` checks that
every Klein route is described here with its methods, and nothing else is.
"""

from __future__ import annotations

from typing import Any

from smtprelay import __version__

# a piece of the JSON document
Schema = dict[str, Any]


def _ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> Schema:
    return _json(_ref("Error"), description)


_UNAUTHORIZED = {"401": _error('missing or wrong bearer token: {"error": "unauthorized"}')}
_ID = {"name": "id", "in": "path", "required": True,
       "description": "the delivery's id (26 characters, time-ordered)",
       "schema": {"type": "string", "pattern": "^[0-9A-HJKMNP-TV-Z]{26}$"}}
_TIME = {"type": "string", "format": "date-time", "example": "2026-11-23T22:40:00Z"}
_NTIME = {"type": "string", "format": "date-time", "nullable": True}


def _schemas() -> Schema:
    return {
        "Error": {
            "type": "object", "required": ["error"],
            "properties": {
                "error": {"type": "string", "description": "one sentence"},
                "fields": {"type": "object", "additionalProperties": {"type": "string"},
                           "description": "dotted key -> problem (validation errors only)"},
            },
        },
        "Status": {
            "type": "object",
            "required": ["state", "version", "started_at", "uptime_seconds", "listen",
                         "provider", "warnings"],
            "properties": {
                "state": {"type": "string", "enum": ["running", "stopped"],
                          "description": "whether SMTP is accepting connections"},
                "version": {"type": "string"},
                "started_at": _TIME,
                "uptime_seconds": {"type": "integer"},
                "listen": {"type": "array", "items": {"type": "string"},
                           "description": "SMTP listeners (bound addresses while running)"},
                "admin_listen": {"type": "string", "nullable": True},
                "smtp_sessions": {"type": "integer"},
                "delivery_mode": {"type": "string", "enum": ["queue", "direct"]},
                "provider": {
                    "type": "object",
                    "required": ["type", "sender_default", "credential_expires",
                                 "credential_days_left"],
                    "properties": {
                        "type": {"type": "string", "enum": ["m365", "gmail", "smtp", "outbox"]},
                        "sender_default": {"type": "string"},
                        "credential_expires": {"type": "string", "format": "date",
                                               "nullable": True},
                        "credential_days_left": {"type": "integer", "nullable": True},
                    },
                },
                "warnings": {"type": "array", "items": {"type": "string"}},
                "warning_codes": {"type": "array", "items": {"type": "string"}},
                "instance": {"type": "object", "properties": {"id": {"type": "string"}}},
                "instances": {"type": "array", "items": _ref("Instance")},
            },
        },
        "Instance": {
            "type": "object",
            "properties": {
                "id": {"type": "string"}, "hostname": {"type": "string"},
                "pid": {"type": "integer"}, "started_at": _TIME, "heartbeat_at": _TIME,
                "state": {"type": "string"}, "version": {"type": "string"},
                "this": {"type": "boolean"},
            },
        },
        "Stats": {
            "type": "object",
            "required": ["uptime_seconds", "received", "sent", "failed", "queued", "deferred",
                         "error_rate", "last_error"],
            "properties": {
                "uptime_seconds": {"type": "integer", "description": "of this process"},
                "received": {"type": "integer", "description": "every message in the "
                             "database (all instances): sent + failed + queued + deferred"},
                "sent": {"type": "integer"},
                "failed": {"type": "integer"},
                "queued": {"type": "integer", "description": "includes those in flight"},
                "deferred": {"type": "integer"},
                "in_flight": {"type": "integer"},
                "error_rate": {"type": "number", "description": "failed / (sent + failed)"},
                "last_error": {
                    "type": "object", "nullable": True,
                    "properties": {"message": {"type": "string"}, "at": _TIME,
                                   "delivery_id": {"type": "string"}},
                },
                "oldest_pending_at": _NTIME,
            },
        },
        "Delivery": {
            "type": "object",
            "required": ["id", "received_at", "finished_at", "status", "sender", "recipients",
                         "header_from", "subject", "message_id", "size", "provider",
                         "attempts_count", "next_attempt_at", "error", "client_address",
                         "auth_user"],
            "properties": {
                "id": {"type": "string"},
                "received_at": _TIME,
                "finished_at": _NTIME,
                "status": {"type": "string", "enum": ["queued", "deferred", "sent", "failed"]},
                "state": {"type": "string", "description": "as stored: also \"active\" "
                          "while an attempt is in flight"},
                "sender": {"type": "string"},
                "original_sender": {"type": "string"},
                "mailbox": {"type": "string"},
                "recipients": {"type": "array", "items": {"type": "string"}},
                "recipient_status": {"type": "array", "items": {
                    "type": "object", "properties": {
                        "address": {"type": "string"}, "status": {"type": "string"},
                        "detail": {"type": "string", "nullable": True}}}},
                "header_from": {"type": "string"},
                "subject": {"type": "string"},
                "message_id": {"type": "string"},
                "size": {"type": "integer"},
                "provider": {"type": "string"},
                "attempts_count": {"type": "integer"},
                "next_attempt_at": _NTIME,
                "error": {"type": "string", "nullable": True},
                "client_address": {"type": "string"},
                "auth_user": {"type": "string", "nullable": True},
                "provider_id": {"type": "string", "nullable": True},
                "mode": {"type": "string", "enum": ["queue", "direct"]},
                "helo": {"type": "string"},
            },
        },
        "DeliveryWithAttempts": {
            "allOf": [_ref("Delivery"), {
                "type": "object", "required": ["attempts"],
                "properties": {"attempts": {"type": "array", "items": _ref("Attempt")}},
            }],
        },
        "Attempt": {
            "type": "object", "required": ["at", "outcome", "detail", "duration_ms"],
            "properties": {
                "at": _TIME,
                "outcome": {"type": "string", "description": "sent, temporary, ambiguous (the "
                            "provider may have taken it: it may arrive twice), permanent, "
                            "partial, expired, cancelled, requeued"},
                "detail": {"type": "string"},
                "duration_ms": {"type": "integer"},
                "instance": {"type": "string"},
            },
        },
        "Configuration": {
            "type": "object", "additionalProperties": True,
            "description": "the configuration, same shape as relay.toml (tables smtp, "
                           "sender, provider, delivery, database, admin, monitoring); every "
                           "secret appears as {\"set\": true|false}.  In a PUT, a secret is "
                           "a string, {\"env\": NAME}, {\"file\": PATH}, or {\"set\": true} "
                           "to keep the current value",
        },
        "CheckResult": {
            "type": "object", "required": ["ok", "steps"],
            "properties": {
                "ok": {"type": "boolean"},
                "steps": {"type": "array", "items": {
                    "type": "object", "required": ["name", "ok", "detail"],
                    "properties": {"name": {"type": "string"}, "ok": {"type": "boolean"},
                                   "detail": {"type": "string"}}}},
            },
        },
    }


def _paths() -> Schema:
    status_ok = {"200": _json(_ref("Status"), "the status"), **_UNAUTHORIZED}
    return {
        "/": {"get": {
            "summary": "the web page", "security": [],
            "responses": {"200": {"description": "HTML",
                                  "content": {"text/html": {"schema": {"type": "string"}}}}},
        }},
        "/static/{name}": {"get": {
            "summary": "a file of the web page (script, style)", "security": [],
            "parameters": [{"name": "name", "in": "path", "required": True,
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "the file"}, "404": _error("no such file")},
        }},
        "/healthz": {"get": {
            "summary": "for load balancers and watchdogs (no token)", "security": [],
            "responses": {
                "200": _json({"type": "object", "properties": {
                    "status": {"type": "string", "enum": ["ok"]}}},
                    "SMTP is listening and the database answers"),
                "503": _json({"type": "object", "properties": {
                    "status": {"type": "string", "enum": ["unavailable"]},
                    "error": {"type": "string"}}}, "not healthy, with the reason"),
            },
        }},
        "/metrics": {"get": {
            "summary": "Prometheus metrics (text format)",
            "responses": {"200": {"description": "text/plain; version=0.0.4",
                                  "content": {"text/plain": {"schema": {"type": "string"}}}},
                          **_UNAUTHORIZED},
        }},
        "/api/openapi.json": {"get": {
            "summary": "this document",
            "responses": {"200": _json({"type": "object"}, "OpenAPI 3"), **_UNAUTHORIZED},
        }},
        "/api/status": {"get": {"summary": "state, version, provider, warnings",
                                "responses": status_ok}},
        "/api/stats": {"get": {
            "summary": "statistics of the whole database (all instances)",
            "responses": {"200": _json(_ref("Stats"), "the statistics"), **_UNAUTHORIZED},
        }},
        "/api/deliveries": {"get": {
            "summary": "the delivery log, newest first",
            "parameters": [
                {"name": "status", "in": "query", "schema": {
                    "type": "string", "enum": ["queued", "deferred", "sent", "failed"]}},
                {"name": "sender", "in": "query", "schema": {"type": "string"},
                 "description": "envelope sender contains (case-insensitive)"},
                {"name": "recipient", "in": "query", "schema": {"type": "string"},
                 "description": "a recipient contains"},
                {"name": "q", "in": "query", "schema": {"type": "string"},
                 "description": "subject or Message-ID contains"},
                {"name": "since", "in": "query", "schema": _TIME,
                 "description": "received at or after (RFC 3339)"},
                {"name": "until", "in": "query", "schema": _TIME,
                 "description": "received before (RFC 3339)"},
                {"name": "limit", "in": "query",
                 "schema": {"type": "integer", "minimum": 1, "maximum": 500, "default": 50}},
                {"name": "cursor", "in": "query", "schema": {"type": "string"},
                 "description": "the `next` of the previous page"},
            ],
            "responses": {
                "200": _json({"type": "object", "required": ["items", "next"], "properties": {
                    "items": {"type": "array", "items": _ref("Delivery")},
                    "next": {"type": "string", "nullable": True}}}, "one page"),
                "400": _error("a parameter is invalid (named in fields)"),
                **_UNAUTHORIZED,
            },
        }},
        "/api/deliveries/{id}": {
            "get": {
                "summary": "one delivery with its attempts", "parameters": [_ID],
                "responses": {"200": _json(_ref("DeliveryWithAttempts"), "the delivery"),
                              "404": _error("no delivery with this id"), **_UNAUTHORIZED},
            },
            "delete": {
                "summary": "drop a queued or deferred delivery (it fails: cancelled by admin)",
                "parameters": [_ID],
                "responses": {"204": {"description": "cancelled"},
                              "404": _error("no delivery with this id"),
                              "409": _error("sent, failed or in flight: cannot be cancelled"),
                              **_UNAUTHORIZED},
            },
        },
        "/api/deliveries/{id}/retry": {"post": {
            "summary": "a failed, deferred or queued delivery is due now",
            "parameters": [_ID],
            "responses": {
                "202": _json(_ref("Delivery"), "queued again (with previous_status)"),
                "404": _error("no delivery with this id"),
                "409": _error("sent or in flight: cannot be retried"),
                **_UNAUTHORIZED,
            },
        }},
        "/api/config": {
            "get": {
                "summary": "the effective configuration, secrets redacted",
                "responses": {"200": _json(_ref("Configuration"), "the configuration"),
                              **_UNAUTHORIZED},
            },
            "put": {
                "summary": "replace the configuration: validated, written to the file "
                           "(comments kept), applied without a restart",
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": _ref("Configuration")}}},
                "responses": {
                    "200": _json(_ref("Configuration"), "applied; the new configuration"),
                    "400": _error("invalid (fields name the dotted keys), or a listener "
                                  "cannot be bound; the old configuration keeps running"),
                    "409": _error("cannot be applied (provider, file); the old configuration "
                                  "keeps running"),
                    "413": _error("the body is larger than 1 MB"),
                    **_UNAUTHORIZED,
                },
            },
        },
        "/api/users/hash-password": {"post": {
            "summary": "a password hash for [smtp.auth] users (as `smtprelay hash-password`)",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["password"],
                "properties": {"password": {"type": "string"}}}}}},
            "responses": {
                "200": _json({"type": "object", "properties": {"hash": {"type": "string"}}},
                             "the hash"),
                "400": _error("no password"), **_UNAUTHORIZED,
            },
        }},
        "/api/provider/test": {"post": {
            "summary": "check the provider without sending",
            "responses": {"200": _json(_ref("CheckResult"), "the steps"), **_UNAUTHORIZED},
        }},
        "/api/test-mail": {"post": {
            "summary": "send a test message from sender.default and wait for the outcome",
            "requestBody": {"required": True, "content": {"application/json": {"schema": {
                "type": "object", "required": ["to"],
                "properties": {"to": {"type": "string", "format": "email"},
                               "subject": {"type": "string", "maxLength": 200}}}}}},
            "responses": {
                "200": _json({"type": "object", "required": ["ok", "delivery_id", "detail"],
                              "properties": {"ok": {"type": "boolean"},
                                             "delivery_id": {"type": "string"},
                                             "status": {"type": "string"},
                                             "detail": {"type": "string"}}},
                             "the outcome (also in the delivery log)"),
                "400": _error("invalid request (fields)"),
                "409": _error("sender.default is not set"),
                **_UNAUTHORIZED,
            },
        }},
        "/api/smtp/start": {"post": {
            "summary": "start accepting SMTP",
            "responses": {**status_ok, "409": _error("a listener cannot be bound")},
        }},
        "/api/smtp/stop": {"post": {
            "summary": "stop accepting SMTP; sessions in progress finish, the queue keeps "
                       "delivering",
            "responses": status_ok,
        }},
    }


def document() -> Schema:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "smtprelay admin API",
            "version": __version__,
            "description": "Configure, test, start, stop and watch an smtprelay. JSON in and "
                           "out; times are RFC 3339 in UTC. Errors: {\"error\", \"fields\"}. "
                           "Unknown path 404, wrong method 405, body over 1 MB 413.",
        },
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer",
                                          "description": "[admin] token"}},
            "schemas": _schemas(),
        },
        "security": [{"token": []}],
        "paths": _paths(),
    }
