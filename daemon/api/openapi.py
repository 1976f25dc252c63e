"""The OpenAPI 3.1 document of `/api/v1` (served at `/api/v1/openapi.json`, no token needed). A test compares its
paths and methods with the application's routes, so the two cannot drift apart."""

from __future__ import annotations

from typing import Any

_PROBLEM = {"description": "a problem (RFC 9457)",
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}}
_ERRORS = {"401": _PROBLEM, "403": _PROBLEM, "404": _PROBLEM}
_JOB_ID = {"name": "id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}


def _json(ref: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": ref}}}}


def _query(name: str, description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "description": description,
            "schema": schema or {"type": "string"}}


def document() -> dict[str, Any]:
    job = "#/components/schemas/Job"
    return {
        "openapi": "3.1.0",
        "info": {"title": "imputationd", "version": "1",
                 "description": "Genotype-imputation jobs on remote imputation servers, per owner."},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Problem": {"type": "object", "required": ["status", "title", "detail"],
                            "properties": {"type": {"type": "string"}, "title": {"type": "string"},
                                           "status": {"type": "integer"}, "detail": {"type": "string"},
                                           "errors": {"type": "array", "items": {"type": "string"}}}},
                "Job": {"type": "object", "description": "a job as `imputationd show --json` prints it",
                        "required": ["id", "group_id", "service", "owner", "state"],
                        "properties": {"id": {"type": "string", "format": "uuid"},
                                       "group_id": {"type": "string", "format": "uuid"},
                                       "service": {"type": "string"}, "owner": {"type": "string"},
                                       "state": {"type": "string"}, "inputs": {"type": "array"},
                                       "outputs": {"type": "array"}, "events": {"type": "array"}},
                        "additionalProperties": True},
                "Event": {"type": "object", "properties": {
                    "id": {"type": "integer"}, "at": {"type": "string", "format": "date-time"},
                    "from": {"type": ["string", "null"]}, "to": {"type": "string"},
                    "reason": {"type": ["string", "null"]}}},
            },
        },
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/jobs": {
                "post": {
                    "summary": "Create a job (one per service named) from uploaded VCF files",
                    "parameters": [{"name": "Idempotency-Key", "in": "header", "required": False,
                                    "schema": {"type": "string", "maxLength": 255}}],
                    "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                        "type": "object", "required": ["service", "panel", "build", "file"],
                        "properties": {
                            "service": {"type": "array", "items": {"type": "string"}},
                            "panel": {"type": "string"}, "build": {"type": "string", "enum": ["hg19", "hg38"]},
                            "population": {"type": "string"}, "phasing": {"type": "string"},
                            "r2_filter": {"type": "string"}, "mode": {"type": "string"},
                            "name": {"type": "string"}, "password": {"type": "string"},
                            "owner": {"type": "string", "description": "admin only"},
                            "file": {"type": "array", "items": {"type": "string", "format": "binary"}}}}}}},
                    "responses": {"201": _json(job, "the job, or the group with its jobs"), **_ERRORS,
                                  "409": _PROBLEM, "413": _PROBLEM, "422": _PROBLEM},
                },
                "get": {
                    "summary": "The caller's jobs (admin: anyone's), newest first",
                    "parameters": [_query("state", "comma-separated states"), _query("service", "a service"),
                                   _query("owner", "an owner (admin, or the caller's own)"),
                                   _query("group", "a group id"),
                                   _query("limit", "at most this many (1-500, default 100)",
                                          {"type": "integer", "minimum": 1, "maximum": 500}),
                                   _query("cursor", "next_cursor of the previous page")],
                    "responses": {"200": {"description": "a page of jobs", "content": {"application/json": {
                        "schema": {"type": "object", "properties": {
                            "jobs": {"type": "array", "items": {"$ref": job}},
                            "next_cursor": {"type": ["string", "null"]}}}}}}, **_ERRORS, "422": _PROBLEM},
                },
            },
            "/api/v1/jobs/{id}": {"get": {"summary": "One job with its inputs, outputs and history",
                                          "parameters": [_JOB_ID], "responses": {"200": _json(job, "the job"),
                                                                                 **_ERRORS}}},
            "/api/v1/jobs/{id}/events": {"get": {
                "summary": "The job's state changes after a cursor",
                "parameters": [_JOB_ID, _query("after", "next_cursor of an earlier answer; none: from the start")],
                "responses": {"200": {"description": "events", "content": {"application/json": {"schema": {
                    "type": "object", "properties": {
                        "events": {"type": "array", "items": {"$ref": "#/components/schemas/Event"}},
                        "next_cursor": {"type": "string"}}}}}}, **_ERRORS, "422": _PROBLEM}}},
            "/api/v1/jobs/{id}/cancel": {"post": {"summary": "Cancel the job", "parameters": [_JOB_ID],
                                                  "responses": {"202": _json(job, "the job, cancelling"),
                                                                **_ERRORS, "409": _PROBLEM}}},
            "/api/v1/jobs/{id}/retry": {"post": {"summary": "Submit a failed job again", "parameters": [_JOB_ID],
                                                 "responses": {"200": _json(job, "the job, pending again"),
                                                               **_ERRORS, "409": _PROBLEM}}},
            "/api/v1/jobs/{id}/files/{name}": {"get": {
                "summary": "A verified result file; Range supported; ETag is its SHA-256",
                "parameters": [_JOB_ID, {"name": "name", "in": "path", "required": True,
                                         "description": "the file's path in the job's folder (may contain /)",
                                         "schema": {"type": "string"}}],
                "responses": {"200": {"description": "the file", "content": {"application/octet-stream": {}}},
                              "206": {"description": "the range asked for"}, "304": {"description": "unchanged"},
                              "416": {"description": "range not satisfiable"}, **_ERRORS}}},
            "/api/v1/services": {"get": {
                "summary": "Services with their health for the caller's owner",
                "parameters": [_query("owner", "admin: another owner")],
                "responses": {"200": {"description": "services", "content": {"application/json": {}}}, **_ERRORS}}},
            "/api/v1/openapi.json": {"get": {"summary": "This document", "security": [],
                                              "responses": {"200": {"description": "OpenAPI 3.1"}}}},
        },
    }
