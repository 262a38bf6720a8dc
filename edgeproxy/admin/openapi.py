"""The OpenAPI 3.1 document of the admin API, served at /v1/openapi.json.

tests/integration/test_admin.py checks it against the running implementation: every route
is documented, every documented operation exists, and real responses match the schemas.
"""

from __future__ import annotations

from typing import Any

_STATUS = [
    "awaiting_certificate",
    "validating",
    "preparing",
    "active",
    "invalid",
    "expiring",
    "expired",
]

_ERROR = {
    "type": "object",
    "required": ["error", "message"],
    "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
}

_DOMAIN = {
    "type": "object",
    "required": [
        "domain",
        "status",
        "not_after",
        "days_left",
        "certificate_sha256",
        "public_key_sha256",
        "errors",
        "warnings",
        "validated_at",
        "updated_at",
    ],
    "additionalProperties": False,
    "properties": {
        "domain": {"type": "string", "examples": ["t.example.com"]},
        "status": {"type": "string", "enum": _STATUS},
        "not_after": {"type": ["string", "null"], "format": "date-time"},
        "days_left": {"type": ["number", "null"]},
        "certificate_sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
        "public_key_sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
        "errors": {"type": "array", "items": {"type": "string"}},
        "warnings": {"type": "array", "items": {"type": "string"}},
        "validated_at": {"type": ["string", "null"], "format": "date-time"},
        "updated_at": {"type": ["string", "null"], "format": "date-time"},
    },
}

_REJECTED = {
    "type": "object",
    "required": ["domain", "errors"],
    "properties": {
        "domain": {"type": "string"},
        "errors": {"type": "array", "items": {"type": "string"}, "minItems": 1},
        "hints": {"type": "array", "items": {"type": "string"}},
    },
}

_FINDING = {
    "type": "object",
    "required": ["check", "level", "message"],
    "properties": {
        "check": {"type": "string", "enum": ["dns", "tls", "routes", "itp"]},
        "level": {"type": "string", "enum": ["ok", "info", "warning", "error"]},
        "message": {"type": "string"},
        "fix": {"type": ["string", "null"]},
    },
}

_CHECK = {
    "type": "object",
    "required": ["domain", "ok", "findings"],
    "properties": {
        "domain": {"type": "string"},
        "ok": {"type": "boolean"},
        "findings": {"type": "array", "items": {"$ref": "#/components/schemas/Finding"}},
    },
}


def _json(schema: str) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}


def _err(description: str) -> dict[str, Any]:
    return {"description": description, **_json("Error")}


_DOMAIN_PARAM = {"name": "domain", "in": "path", "required": True, "schema": {"type": "string"}}

OPENAPI: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "edgeproxy admin API",
        "version": "1",
        "description": "The domain lifecycle: register a customer host, upload its "
        "certificate, follow it to active, check it, remove it.",
    },
    "security": [{"bearer": []}],
    "paths": {
        "/v1/domains": {
            "get": {
                "summary": "Every registered domain with its status",
                "responses": {
                    "200": {"description": "the domains", **_json("DomainList")},
                    "401": _err("no or wrong token"),
                },
            },
            "post": {
                "summary": "Register a domain (it awaits its certificate)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["domain"],
                                "properties": {
                                    "domain": {"type": "string", "examples": ["t.example.com"]}
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "201": {"description": "registered", **_json("Domain")},
                    "400": _err("not JSON"),
                    "401": _err("no or wrong token"),
                    "409": _err("registered already"),
                    "422": _err("not a valid lower-case host name"),
                },
            },
        },
        "/v1/domains/{domain}": {
            "parameters": [_DOMAIN_PARAM],
            "get": {
                "summary": "One domain's status",
                "responses": {
                    "200": {"description": "the domain", **_json("Domain")},
                    "401": _err("no or wrong token"),
                    "404": _err("not registered"),
                },
            },
            "delete": {
                "summary": "Remove a domain; it stops being served within a second",
                "responses": {
                    "204": {"description": "removed"},
                    "401": _err("no or wrong token"),
                    "404": _err("not registered"),
                },
            },
        },
        "/v1/domains/{domain}/certificate": {
            "parameters": [_DOMAIN_PARAM],
            "put": {
                "summary": "Upload the certificate chain and key (validated first)",
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "required": ["fullchain", "privkey"],
                                "properties": {
                                    "fullchain": {"type": "string"},
                                    "privkey": {"type": "string"},
                                },
                            }
                        },
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["fullchain", "privkey"],
                                "properties": {
                                    "fullchain": {"type": "string", "format": "binary"},
                                    "privkey": {"type": "string", "format": "binary"},
                                },
                            }
                        },
                    },
                },
                "responses": {
                    "202": {"description": "accepted; going live", **_json("Domain")},
                    "400": _err("neither JSON nor multipart with both parts"),
                    "401": _err("no or wrong token"),
                    "404": _err("not registered"),
                    "413": {"description": "body over admin.max_body_bytes"},
                    "422": {"description": "every rule the bundle breaks", **_json("Rejected")},
                },
            },
        },
        "/v1/domains/{domain}/check": {
            "parameters": [_DOMAIN_PARAM],
            "get": {
                "summary": "Diagnose DNS, TLS and routes for a domain",
                "responses": {
                    "200": {"description": "findings", **_json("Check")},
                    "401": _err("no or wrong token"),
                    "404": _err("not registered"),
                },
            },
        },
        "/v1/openapi.json": {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1"}},
            },
        },
    },
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": _ERROR,
            "Domain": _DOMAIN,
            "DomainList": {
                "type": "object",
                "required": ["domains"],
                "properties": {
                    "domains": {"type": "array", "items": {"$ref": "#/components/schemas/Domain"}}
                },
            },
            "Rejected": _REJECTED,
            "Finding": _FINDING,
            "Check": _CHECK,
        },
    },
}
