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
import re
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
        self.url = redact(url)  # for messages; the client gets the real one
        if input_format == "protobuf":
            try:
                import grpc_tools  # noqa: F401 - protoc, for schemas registered as .proto text
            except ImportError as exc:
                raise ConsumerError("--input-format protobuf needs grpcio-tools (protoc): "
                                    "pip install 'nlpstream[registry]' (the container image has it)") from exc
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
                if _not_found(exc, "schema"):
                    self._unknown[schema_id] = f"schema id {schema_id} is not in the registry"
                    continue
                raise SchemaRegistryUnavailable(f"schema registry at {self.url} did not answer for schema id "
                                                f"{schema_id}: {_describe(exc)}") from None
            try:
                self._schemas[schema_id] = self._build(schema_id, schema)
            except SchemaRegistryUnavailable:
                raise
            except DecodeError as exc:  # a schema of another format, or one that cannot be used
                self._unknown[schema_id] = str(exc)
                self._mismatched.add(schema_id)
            except Exception as exc:  # noqa: BLE001 - a parser or protoc failure: the schema cannot be used
                self._unknown[schema_id] = f"schema {schema_id} cannot be used: {type(exc).__name__}: {exc}"
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
        try:
            return schema.decode(memoryview(value)[5:])
        except DecodeError:
            raise
        except Exception as exc:  # noqa: BLE001 - a record no decoder expected: still the record's fault
            raise _mismatch(schema_id, self.input_format, exc) from None

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
                registered = self._client.get_version(ref.subject, ref.version, True)  # soft-deleted too
            except Exception as exc:  # noqa: BLE001
                if _not_found(exc, "reference"):
                    raise DecodeError("schema_mismatch", f"referenced schema {ref.subject} v{ref.version} "
                                      "is not in the registry") from None
                raise SchemaRegistryUnavailable(f"schema registry at {self.url} did not answer for "
                                                f"{ref.subject} v{ref.version}: {_describe(exc)}") from None
            if depth < 16:
                out.extend(self._references(registered.schema, depth + 1))
            out.append((ref.name, registered.schema.schema_str))
        return out


# Confluent API error codes of a 404 that really means "no such schema": 40401 subject, 40402 version,
# 40403 schema id. Any other 404 (a wrong base path, a proxy or ingress answering) is the registry not answering.
_NOT_FOUND_CODES = {"schema": (40403,), "reference": (40401, 40402, 40403)}


def _not_found(exc: BaseException, what: str) -> bool:
    return getattr(exc, "http_status_code", None) == 404 and getattr(exc, "error_code", None) in _NOT_FOUND_CODES[what]


def redact(url: str) -> str:
    """``url`` without a user:password part."""
    return re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^@/]*(?:/[^@]*)?@", r"\1***@", url) if "@" in url else url


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "http_status_code", None)
    if status in (401, 403):
        return f"HTTP {status}: credentials refused (input.schema_registry.username/password)"
    if status == 404:
        return (f"HTTP 404 without a 'schema not found' code ({getattr(exc, 'error_code', None)}): is the URL the "
                "Confluent-compatible API (Apicurio: .../apis/ccompat/v7)?")
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

        check = fastjsonschema.compile(schema, handlers={"http": _no_remote, "https": _no_remote},
                                       use_default=False, use_formats=False)  # as the jsonschema path: no defaults
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


def _no_remote(uri: str) -> Any:
    raise ValueError(f"remote $ref {uri} is not fetched")


def _jsonschema_validator(schema_id: int, schema: Any, references: list[tuple[str, str]]) -> Callable[[Any], str | None]:
    from jsonschema import validators
    from referencing import Registry, Resource

    try:
        from referencing.jsonschema import specification_with

        cls = validators.validator_for(schema)
        spec = specification_with(cls.META_SCHEMA.get("$schema", ""), default=None) if hasattr(cls, "META_SCHEMA") else None
        resources = [(name, Resource.from_contents(json.loads(ref), default_specification=spec)
                      if spec is not None else Resource.from_contents(json.loads(ref)))
                     for name, ref in references]
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
        try:
            return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                             always_print_fields_with_no_presence=True)
        except TypeError:  # protobuf older than 5.26
            return json_format.MessageToDict(msg, preserving_proto_field_name=True,
                                             including_default_value_fields=True)

    return _Schema(decode)


_BUILTIN_MODULES = (("google/protobuf/", "google.protobuf."), ("google/type/", "google.type."),
                    ("confluent/", "confluent_kafka.schema_registry.confluent."))


def _builtin_file(name: str) -> Any:
    """The descriptor of a file producers import without registering it (google/protobuf, google/type,
    confluent/meta and confluent's types, as Confluent's serializers skip them as references), or None."""
    import importlib

    from google.protobuf import descriptor_pb2

    for prefix, package in _BUILTIN_MODULES:
        if name.startswith(prefix) and name.endswith(".proto"):
            module_name = package + name[len(prefix):-len(".proto")].replace("/", ".") + "_pb2"
            try:
                module = importlib.import_module(module_name)
            except ImportError:
                return None
            return descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb)
    return None


def _builtins_for(names: Iterable[str], given: set[str]) -> list[Any]:
    """Built-in files among ``names`` not in ``given``, with their own dependencies, dependencies first."""
    out: list[Any] = []
    seen = set(given)

    def visit(name: str) -> None:
        if name in seen:
            return
        seen.add(name)
        proto = _builtin_file(name)
        if proto is None:
            return
        for dep in proto.dependency:
            visit(dep)
        out.append(proto)

    for name in names:
        visit(name)
    return out


def _well_known_missing(files: list[Any]) -> list[Any]:
    """Built-in files the given descriptors import but that were not given."""
    return _builtins_for((dep for f in files for dep in f.dependency), {f.name for f in files})


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
    """FileDescriptorProtos for a schema and its references, dependencies first, the schema's own last.

    The schema's own text decides the form: a serialized descriptor (base64, what confluent-kafka's Python
    serializer and Confluent's ``format=serialized`` give), then its references are too; else ``.proto`` text.
    """
    from google.protobuf import descriptor_pb2

    own = _from_base64(f"schema-{schema_id}.proto", text)
    if own is None:
        return _compile(schema_id, text, references, descriptor_pb2)
    refs = []
    for name, ref in references:
        proto = _from_base64(name, ref)
        if proto is None:
            raise DecodeError("schema_mismatch", f"Protobuf schema {schema_id} is a serialized descriptor but its "
                              f"reference {name} is not")
        proto.name = name  # the importing file names it so
        refs.append(proto)
    return refs + [own]


def _from_base64(name: str, text: str) -> Any:
    """The FileDescriptorProto serialized in base64 ``text``, or None when it is ``.proto`` text."""
    from google.protobuf import descriptor_pb2

    stripped = text.strip()
    if not stripped or any(c.isspace() or c in '{;"' for c in stripped):
        return None
    try:
        proto = descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(stripped, validate=True))
    except Exception:  # noqa: BLE001 - not a serialized descriptor: .proto text
        return None
    if not proto.name:
        proto.name = name
    return proto


_IMPORT = re.compile(r'^\s*import\s+(?:public\s+|weak\s+)?"([^"]+)"\s*;', re.M)


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
        imports = [m for source in [text, *(ref for _, ref in references)] for m in _IMPORT.findall(source)]
        builtins = _builtins_for(imports, {name for name, _ in references})
        extra = []
        if builtins:  # google/type, confluent/meta: imported by producers, registered by nobody
            given = root / "builtins.pb"
            given.write_bytes(descriptor_pb2.FileDescriptorSet(file=builtins).SerializeToString())
            extra = [f"--descriptor_set_in={given}"]
        proc = subprocess.run(
            [sys.executable, "-m", "grpc_tools.protoc", f"-I{root}", f"-I{include}", *extra, "--include_imports",
             f"--descriptor_set_out={out}", main], capture_output=True, text=True, timeout=60, check=False)
        if proc.returncode != 0:
            raise DecodeError("schema_mismatch", f"Protobuf schema {schema_id} does not compile: "
                              f"{proc.stderr.strip()[-500:]}")
        files = list(descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file)
    return files  # protoc lists dependencies first and the schema's own file last
