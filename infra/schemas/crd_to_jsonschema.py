"""Convert a CustomResourceDefinition's ``openAPIV3Schema`` into a JSON Schema file that
``check-jsonschema`` validates manifests against, offline.

    python infra/schemas/crd_to_jsonschema.py ray.io_rayjobs.yaml v1 infra/schemas/rayjob-ray.io-v1.json

What changes, and why:
- ``description`` keys are dropped (about 70% of the bytes; validation never reads them).
- An object schema with ``properties`` and no ``x-kubernetes-preserve-unknown-fields`` gets
  ``additionalProperties: false``: the API server (kubectl's default strict field validation) rejects
  unknown fields, so a misspelt key must fail here too instead of being silently ignored.
- ``nullable: true`` becomes a ``"null"`` alternative of the type; ``x-kubernetes-int-or-string``
  without an ``anyOf`` becomes ``anyOf: [integer, string]``.
- The top level's ``apiVersion`` and ``kind`` are pinned to the CRD's group/version and kind, so a
  manifest of another kind fails.
- Other ``x-kubernetes-*`` keys are dropped. Their rules (CEL ``x-kubernetes-validations``, list-map
  keys) are not checked: only a real API server evaluates them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

SCHEMA_DIALECT = "http://json-schema.org/draft-07/schema#"


def convert_schema(node: dict) -> dict:
    """One OpenAPI v3 (Kubernetes structural) schema node as JSON Schema draft 7."""
    out: dict = {}
    for key, value in node.items():
        if key == "description" or key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: convert_schema(sub) for name, sub in value.items()}
        elif key in ("items", "not") or (key == "additionalProperties" and isinstance(value, dict)):
            out[key] = convert_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [convert_schema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
    if node.get("x-kubernetes-int-or-string") and "anyOf" not in out:
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if ("properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def crd_to_jsonschema(crd: dict, version: str) -> dict:
    """The JSON Schema of ``version`` of the CRD ``crd`` (a parsed CustomResourceDefinition)."""
    if crd.get("kind") != "CustomResourceDefinition":
        raise ValueError(f"not a CustomResourceDefinition: kind {crd.get('kind')!r}")
    spec = crd["spec"]
    found = [v for v in spec["versions"] if v["name"] == version]
    if not found:
        raise ValueError(f"{spec['names']['kind']}: no version {version!r} "
                         f"(has {[v['name'] for v in spec['versions']]})")
    schema = convert_schema(found[0]["schema"]["openAPIV3Schema"])
    schema["properties"]["apiVersion"] = {"const": f"{spec['group']}/{version}"}
    schema["properties"]["kind"] = {"const": spec["names"]["kind"]}
    schema["required"] = sorted(set(schema.get("required", [])) | {"apiVersion", "kind"})
    return {"$schema": SCHEMA_DIALECT, "title": f"{spec['names']['kind']} {spec['group']}/{version}", **schema}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__, file=sys.stderr)
        return 2
    crd_path, version, out = argv
    schema = crd_to_jsonschema(yaml.safe_load(Path(crd_path).read_text()), version)
    Path(out).write_text(json.dumps(schema, indent=None, sort_keys=True, separators=(",", ":")) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
