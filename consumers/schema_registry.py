"""Records in the Confluent wire format: a zero magic byte, a 4-byte schema id, then Avro, JSON or Protobuf.

The schema of each id is fetched once from a Schema Registry (any server
with the Confluent API: Confluent, Apicurio's ``/apis/ccompat/v7``, Karapace,
Redpanda) with confluent-kafka's registry client, and kept. Fetching is
separate from decoding, so the job can resolve the ids of a whole poll first
and treat a registry outage as an outage (retry, commit nothing), never as
bad records:

- :meth:`RegistryDecoder.unresolved` lists the ids of a batch not fetched yet;
- :meth:`RegistryDecoder.resolve` fetches them; an id the registry does not
  know is remembered as unknown, anything else that fails raises
  :class:`SchemaRegistryUnavailable`;
- :meth:`RegistryDecoder.decode` turns one value into a Python object, or a
  DecodeError whose kind names the fault: ``no_magic_byte``,
  ``unknown_schema_id``, ``schema_mismatch`` (the payload does not match its
  schema, or the schema is of another format than the input's).

Protobuf schemas may be registered as ``.proto`` text (compiled once per
id with protoc from grpcio-tools) or as a base64 ``FileDescriptorProto`` (what
confluent-kafka's Python serializer registers); the message is picked by the
message indexes that follow the schema id.
"""

from __future__ import annotations

import base64
import io
import json
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from nlpstream.consumers.errors import ConsumerError, DecodeError

REGISTRY_FORMATS = ("avro", "json-schema", "protobuf")
REGISTRY_KINDS = ("no_magic_byte", "unknown_schema_id", "schema_mismatch")
_SCHEMA_TYPES = {"avro": "AVRO", "json-schema": "JSON", "protobuf": "PROTOBUF"}
_HEADER = struct.Struct(">bI")


class SchemaRegistryUnavailable(ConsumerError):
    """The registry cannot be asked right now (down, refusing our credentials, failing); retry later."""

    recoverable = True


def schema_id_of(value: bytes | None) -> int | None:
    """The schema id framed in ``value``, or None when it is not in the Confluent wire format."""
    if value is None or len(value) < 5 or value[0] != 0:
        return None
    return _HEADER.unpack_from(value)[1]


@dataclass(frozen=True, slots=True)
class _Schema:
    decode: Callable[[bytes], Any]  # payload after the 5-byte header -> Python object


def _mismatch(schema_id: int, fmt: str, exc: BaseException | str) -> DecodeError:
    detail = exc if isinstance(exc, str) else f"{type(exc).__name__}: {exc}"
    return DecodeError("schema_mismatch", f"payload does not match {fmt} schema {schema_id}: {detail}")


class RegistryDecoder:
    """Decodes one input format's wire-format values with schemas fetched by id (see the module docstring).

    Not thread-safe: the job resolves and decodes on its loop thread.
    """

    def __init__(self, input_format: str, url: str, username: str | None = None, password: str | None = None,
                 ca_file: str | None = None, timeout_s: float = 10.0, client: Any = None) -> None:
        if input_format not in REGISTRY_FORMATS:
            raise ValueError(f"input format {input_format!r} is not one of {', '.join(REGISTRY_FORMATS)}")
        self.input_format = input_format
        self.url = url
        if client is None:
            try:
                from confluent_kafka.schema_registry import SchemaRegistryClient
            except ImportError as exc:
                raise ConsumerError(f"--input-format {input_format} needs the schema registry client: "
                                    "pip install 'nlpstream[registry]' (the container image has it)") from exc
            conf: dict[str, Any] = {"url": url, "timeout": timeout_s, "max.retries": 0}
            if username is not None:
                conf["basic.auth.user.info"] = f"{username}:{password or ''}"
            if ca_file:
                conf["ssl.ca.location"] = ca_file
            client = SchemaRegistryClient(conf)
        self._client = client
        self._schemas: dict[int, _Schema] = {}
        self._unknown: dict[int, str] = {}  # id -> why (the registry said 404, or the schema is unusable)
        self._mismatched: set[int] = set()  # of those: schemas of another format or that cannot be used

    # -- fetching ---------------------------------------------------------------
    def unresolved(self, values: Iterable[bytes | None]) -> set[int]:
        """Schema ids framed in ``values`` that were neither fetched nor found unknown yet."""
        ids = set()
        for value in values:
            if value is not None and len(value) >= 5 and value[0] == 0:
                schema_id = _HEADER.unpack_from(value)[1]
                if schema_id not in self._schemas and schema_id not in self._unknown:
                    ids.add(schema_id)
        return ids

    def resolve(self, ids: Iterable[int]) -> None:
        """Fetch the schemas of ``ids``; raises SchemaRegistryUnavailable (nothing is marked unknown for it)."""
        for schema_id in sorted(set(ids)):
            if schema_id in self._schemas or schema_id in self._unknown:
                continue
            try:
                schema = self._client.get_schema(schema_id)
            except Exception as exc:  # noqa: BLE001 - sorted below
                if _not_found(exc):
                    self._unknown[schema_id] = f"schema id {schema_id} is not in the registry"
                    continue
                raise SchemaRegistryUnavailable(f"schema registry at {self.url} did not answer for schema id "
                                                f"{schema_id}: {_describe(exc)}") from None
            try:
                self._schemas[schema_id] = self._build(schema_id, schema)
            except DecodeError as exc:  # a schema of another format, or one that cannot be used
                self._unknown[schema_id] = str(exc)
                self._mismatched.add(schema_id)

    # -- decoding ----------------------------------------------------------------
    def decode(self, value: bytes | None) -> Any:
        """The Python object in ``value``; DecodeError (``no_magic_byte``, ``unknown_schema_id``, ``schema_mismatch``)."""
        if value is None or len(value) < 5 or value[0] != 0:
            size = 0 if value is None else len(value)
            raise DecodeError("no_magic_byte", "value is not in the Confluent wire format (magic byte 0 and a 4-byte "
                              f"schema id): {'first byte 0x%02x' % value[0] if size else 'empty'}, {size} bytes")
        schema_id = _HEADER.unpack_from(value)[1]
        schema = self._schemas.get(schema_id)
        if schema is None:
            if schema_id in self._mismatched:
                raise DecodeError("schema_mismatch", self._unknown[schema_id])
            if schema_id in self._unknown:
                raise DecodeError("unknown_schema_id", self._unknown[schema_id])
            raise RuntimeError(f"schema id {schema_id} was not resolved before decoding")  # a bug of the caller
        return schema.decode(memoryview(value)[5:])

    # -- building decoders ----------------------------------------------------------
    def _build(self, schema_id: int, schema: Any) -> _Schema:
        schema_type = (getattr(schema, "schema_type", None) or "AVRO").upper()
        expected = _SCHEMA_TYPES[self.input_format]
        if schema_type != expected:
            raise DecodeError("schema_mismatch", f"schema {schema_id} is {schema_type}, but the input format is "
                              f"{self.input_format} ({expected})")
        references = self._references(schema)
        build = {"avro": _avro, "json-schema": _json_schema, "protobuf": _protobuf}[self.input_format]
        return build(schema_id, schema.schema_str, references)

    def _references(self, schema: Any, depth: int = 0) -> list[tuple[str, str]]:
        """(name, schema text) of every schema ``schema`` references, dependencies first."""
        out: list[tuple[str, str]] = []
        for ref in getattr(schema, "references", None) or []:
            try:
                registered = self._client.get_version(ref.subject, ref.version)
            except Exception as exc:  # noqa: BLE001
                if _not_found(exc):
                    raise DecodeError("schema_mismatch", f"referenced schema {ref.subject} v{ref.version} "
                                      "is not in the registry") from None
                raise SchemaRegistryUnavailable(f"schema registry at {self.url} did not answer for "
                                                f"{ref.subject} v{ref.version}: {_describe(exc)}") from None
            if depth < 16:
                out.extend(self._references(registered.schema, depth + 1))
            out.append((ref.name, registered.schema.schema_str))
        return out


def _not_found(exc: BaseException) -> bool:
    return getattr(exc, "http_status_code", None) == 404


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "http_status_code", None)
    if status in (401, 403):
        return f"HTTP {status}: credentials refused (input.schema_registry.username/password)"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


# -- Avro ------------------------------------------------------------------------------
def _avro(schema_id: int, text: str, references: list[tuple[str, str]]) -> _Schema:
    import fastavro

    named: dict[str, Any] = {}
    try:
        for _name, ref_text in references:
            fastavro.parse_schema(json.loads(ref_text), named_schemas=named)
        parsed = fastavro.parse_schema(json.loads(text), named_schemas=named)
    except (ValueError, TypeError, KeyError, fastavro.schema.SchemaParseException) as exc:
        raise DecodeError("schema_mismatch", f"Avro schema {schema_id} cannot be parsed: {exc}") from None
    reader = fastavro.schemaless_reader

    def decode(payload: memoryview) -> Any:
        buf = io.BytesIO(payload)
        try:
            obj = reader(buf, parsed, None)
        except Exception as exc:  # noqa: BLE001 - any reader failure means the bytes do not fit the schema
            raise _mismatch(schema_id, "Avro", exc) from None
        if buf.tell() != len(payload):
            raise _mismatch(schema_id, "Avro", f"{len(payload) - buf.tell()} bytes left after the record")
        return obj

    return _Schema(decode)


# -- JSON Schema ----------------------------------------------------------------------------
def _json_schema(schema_id: int, text: str, references: list[tuple[str, str]]) -> _Schema:
    """Validates each record; drafts 4, 6 and 7 without references are compiled to code by fastjsonschema
    (about 5x jsonschema's rate here, see ``nlpstream bench --pipeline``), the rest go through jsonschema."""
    try:
        schema = json.loads(text)
    except ValueError as exc:
        raise DecodeError("schema_mismatch", f"JSON schema {schema_id} is not JSON: {exc}") from None
    validate = _fast_validator(schema) if not references else None
    if validate is None:
        validate = _jsonschema_validator(schema_id, schema, references)

    def decode(payload: memoryview) -> Any:
        try:
            obj = json.loads(bytes(payload))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _mismatch(schema_id, "JSON", f"not JSON: {exc}") from None
        problem = validate(obj)
        if problem is not None:
            raise _mismatch(schema_id, "JSON", problem)
        return obj

    return _Schema(decode)


_FAST_DRAFTS = ("http://json-schema.org/draft-04/schema", "http://json-schema.org/draft-06/schema",
                "http://json-schema.org/draft-07/schema")


def _fast_validator(schema: Any) -> Callable[[Any], str | None] | None:
    """A fastjsonschema validator returning the problem (or None), when the schema's draft allows one."""
    if not isinstance(schema, dict):
        return None
    draft = schema.get("$schema")
    if draft is not None and str(draft).rstrip("#") not in _FAST_DRAFTS:
        return None  # 2019-09, 2020-12: jsonschema
    try:
        import fastjsonschema

        check = fastjsonschema.compile(schema)
    except Exception:  # noqa: BLE001 - not installed, or a schema it cannot compile: jsonschema decides
        return None
    invalid = fastjsonschema.JsonSchemaValueException

    def validate(obj: Any) -> str | None:
        try:
            check(obj)
        except invalid as exc:
            return str(exc.message)
        return None

    return validate


def _jsonschema_validator(schema_id: int, schema: Any, references: list[tuple[str, str]]) -> Callable[[Any], str | None]:
    from jsonschema import validators
    from referencing import Registry, Resource

    try:
        resources = [(name, Resource.from_contents(json.loads(ref))) for name, ref in references]
        cls = validators.validator_for(schema)
        cls.check_schema(schema)
        validator = cls(schema, registry=Registry().with_resources(resources))
    except Exception as exc:  # noqa: BLE001 - an unusable schema
        raise DecodeError("schema_mismatch", f"JSON schema {schema_id} cannot be used: {exc}") from None

    def validate(obj: Any) -> str | None:
        error = next(validator.iter_errors(obj), None)
        if error is None:
            return None
        where = "/".join(str(p) for p in error.absolute_path) or "(root)"
        return f"at {where}: {error.message}"

    return validate


# -- Protobuf -----------------------------------------------------------------------------------
def _protobuf(schema_id: int, text: str, references: list[tuple[str, str]]) -> _Schema:
    from google.protobuf import descriptor_pool, json_format, message_factory

    files = _descriptor_protos(schema_id, text, references)
    pool = descriptor_pool.DescriptorPool()
    try:
        for proto in _well_known_missing(files) + files:
            pool.Add(proto)
    except Exception as exc:  # noqa: BLE001
        raise DecodeError("schema_mismatch", f"Protobuf schema {schema_id} cannot be loaded: {exc}") from None
    own = files[-1]
    classes: dict[tuple[int, ...], Any] = {}

    def message_class(indexes: tuple[int, ...]) -> Any:
        cls = classes.get(indexes)
        if cls is None:
            try:
                msg = own.message_type[indexes[0]]
                name = msg.name
                for i in indexes[1:]:
                    msg = msg.nested_type[i]
                    name += "." + msg.name
            except IndexError:
                raise _mismatch(schema_id, "Protobuf", f"no message at indexes {list(indexes)}") from None
            desc = pool.FindMessageTypeByName(f"{own.package}.{name}" if own.package else name)
            cls = classes[indexes] = message_factory.GetMessageClass(desc)
        return cls

    def decode(payload: memoryview) -> Any:
        data = bytes(payload)
        try:
            indexes, start = _message_indexes(data)
            msg = message_class(indexes).FromString(data[start:])
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - truncated varints, wire-type errors
            raise _mismatch(schema_id, "Protobuf", exc) from None
        return json_format.MessageToDict(msg, preserving_proto_field_name=True)

    return _Schema(decode)


def _well_known_missing(files: list[Any]) -> list[Any]:
    """Descriptors of google/protobuf/*.proto files imported but not given (serializers skip them as references)."""
    import importlib

    from google.protobuf import descriptor_pb2

    given = {f.name for f in files}
    out = []
    for name in dict.fromkeys(dep for f in files for dep in f.dependency):
        if name in given or not name.startswith("google/protobuf/"):
            continue
        module = importlib.import_module(name[:-len(".proto")].replace("/", ".") + "_pb2")
        out.append(descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb))
        given.add(name)
    return out


def _zigzag_varint(data: bytes, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if pos >= len(data):
            raise ValueError("truncated message indexes")
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return (result >> 1) ^ -(result & 1), pos
        shift += 7
        if shift > 63:
            raise ValueError("message index varint too long")


def _message_indexes(data: bytes) -> tuple[tuple[int, ...], int]:
    """The message indexes after the schema id (count, then each; a single 0 means the first message)."""
    count, pos = _zigzag_varint(data, 0)
    if count == 0:
        return (0,), pos
    if count < 0 or count > 64:
        raise ValueError(f"implausible message index count {count}")
    indexes = []
    for _ in range(count):
        value, pos = _zigzag_varint(data, pos)
        if value < 0:
            raise ValueError(f"negative message index {value}")
        indexes.append(value)
    return tuple(indexes), pos


def _descriptor_protos(schema_id: int, text: str, references: list[tuple[str, str]]) -> list[Any]:
    """FileDescriptorProtos for a schema and its references, dependencies first, the schema's own last."""
    from google.protobuf import descriptor_pb2

    serialized = [_from_base64(name, ref) for name, ref in references] + [_from_base64(f"schema-{schema_id}.proto", text)]
    if all(p is not None for p in serialized):
        return serialized  # type: ignore[return-value]
    return _compile(schema_id, text, references, descriptor_pb2)


def _from_base64(name: str, text: str) -> Any:
    from google.protobuf import descriptor_pb2

    stripped = text.strip()
    if not stripped or any(c.isspace() for c in stripped) or "{" in stripped:
        return None
    try:
        proto = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(stripped, validate=True))
    except Exception:  # noqa: BLE001 - not a serialized descriptor: .proto text
        return None
    if not proto.message_type:
        return None
    if not proto.name:
        proto.name = name
    return proto


def _compile(schema_id: int, text: str, references: list[tuple[str, str]], descriptor_pb2: Any) -> list[Any]:
    """Compile ``.proto`` text (and referenced files, by their names) with protoc from grpcio-tools."""
    try:
        from importlib import resources

        import grpc_tools

        include = str(resources.files(grpc_tools) / "_proto")
    except ImportError as exc:
        raise DecodeError("schema_mismatch", "Protobuf schemas given as .proto text need grpcio-tools (protoc): "
                          "pip install 'nlpstream[registry]'") from exc
    with tempfile.TemporaryDirectory(prefix="nlpstream-proto-") as tmp:
        root = Path(tmp)
        for name, ref in references:
            path = root / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(ref)
        main = f"nlpstream_schema_{schema_id}.proto"
        (root / main).write_text(text)
        out = root / "set.pb"
        proc = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"-I{include}", "--include_imports",
             f"--descriptor_set_out={out}", main], capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise DecodeError("schema_mismatch", f"Protobuf schema {schema_id} does not compile: "
                              f"{proc.stderr.strip()[-500:]}")
        files = list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)
    return files  # protoc lists dependencies first and the schema's own file last
