"""The OpenAPI document (allspark/api_schema.py) stays true to the server API
(allspark/api.py): the same operations, the message fields of the client
contract, the error codes, and a valid OpenAPI 3.1 document."""

from __future__ import annotations

from typing import Any

from twisted.trial.unittest import TestCase

from allspark.api import ERROR_CODES, PUBLISH_FIELDS, ApiConfig, ServerAPI
from allspark.api_schema import openapi_document
from allspark.envelope import MESSAGE_FIELDS


def documented_operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, item in doc["paths"].items() for method in item}


class DocumentMatchesTheAPI(TestCase):
    def setUp(self) -> None:
        self.doc = openapi_document()

    def test_every_route_is_documented_and_nothing_else(self) -> None:
        api = ServerAPI(None, ApiConfig())  # type: ignore[arg-type]  # routes only
        routes = {("/api/" + "/".join(pattern), method.decode()) for pattern, method, _ in api.routes}
        routes.add(("/api/v1/openapi.json", "GET"))
        self.assertEqual(documented_operations(self.doc), routes)

    def test_publish_body_is_the_client_message_plus_sender_id(self) -> None:
        publish = self.doc["components"]["schemas"]["Publish"]
        self.assertEqual(set(publish["properties"]), set(PUBLISH_FIELDS))
        self.assertEqual(set(PUBLISH_FIELDS), set(MESSAGE_FIELDS) | {"sender_id"})
        self.assertIs(publish["additionalProperties"], False)

    def test_error_codes(self) -> None:
        self.assertEqual(self.doc["components"]["schemas"]["Error"]["properties"]["error"]["enum"],
                         list(ERROR_CODES))

    def test_every_operation_answers_its_errors_and_needs_the_key(self) -> None:
        for path, item in self.doc["paths"].items():
            for method, operation in item.items():
                responses = operation["responses"]
                self.assertIn("405", responses, (path, method))
                if path.endswith("openapi.json"):
                    self.assertEqual(operation["security"], [])
                    continue
                self.assertNotIn("security", operation)  # the document's: the bearer key
                for status in ("401", "503"):
                    self.assertIn(status, responses, (path, method))
                for name in (p["name"] for p in operation.get("parameters", []) if p["in"] == "path"):
                    self.assertIn("{" + name + "}", path)
        self.assertEqual(self.doc["security"], [{"apiKey": []}])
        self.assertEqual(self.doc["components"]["securitySchemes"]["apiKey"]["scheme"], "bearer")

    def test_a_valid_openapi_document(self) -> None:
        import schemathesis

        schema = schemathesis.openapi.from_dict(self.doc)  # validates it as OpenAPI 3.1
        labels = {operation.ok().label for operation in schema.get_all_operations()}
        self.assertEqual(len(labels), len(documented_operations(self.doc)))
