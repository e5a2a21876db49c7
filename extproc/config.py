"""extproc.yaml: one closed, typed model; load, validate, compile.

Unknown keys are errors (a typo must never be silently dropped), every error names the file,
the line and key path, and what was expected. Loading also compiles what the hot path needs
(providers' settings, policy lookups) so requests only read. `extproc check-config` and
`serve` use this same loader; a reload that fails keeps the previous config.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A config that cannot be used; the message is for the operator, one problem per line."""


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TLS(_Closed):
    cert_file: Path
    key_file: Path
    client_ca_file: Path | None = None   # set: clients must present a certificate (mTLS)


class Server(_Closed):
    listen: str = "127.0.0.1:50051"       # host:port, or unix:/path/to.sock
    workers: Annotated[int, Field(ge=1, le=64)] = 1
    max_in_flight: Annotated[int, Field(ge=1, le=100_000)] = 512
    shutdown_grace_seconds: Annotated[float, Field(ge=0, le=300)] = 10.0
    # after SIGTERM, keep serving while health says NOT_SERVING so Envoy's health checks move
    # traffic away before the server stops accepting (interval 1 s x unhealthy_threshold 2)
    drain_delay_seconds: Annotated[float, Field(ge=0, le=120)] = 2.5
    max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 65536
    tls: TLS | None = None

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        if v.startswith("unix:"):
            if len(v) <= 5:
                raise ValueError("unix: needs a socket path, e.g. unix:/run/extproc.sock")
            return v
        host, port = _split_host_port(v)
        if not 0 < port < 65536 - 64:
            raise ValueError("port must be between 1 and 65471 (workers take port + i)")
        return v

    @model_validator(mode="after")
    def _beyond_loopback_needs_tls(self) -> Server:
        if not self.listen.startswith("unix:") and self.tls is None:
            host, _ = _split_host_port(self.listen)
            if not _is_loopback(host):
                raise ValueError(
                    f"listen {self.listen} is beyond loopback: set server.tls (cert_file, key_file, "
                    "optionally client_ca_file) or listen on 127.0.0.1 / a unix socket")
        return self

    def worker_listen(self, index: int) -> str:
        """Worker i listens on base port + i, or on `<path>.<i>` for a unix socket."""
        if self.listen.startswith("unix:"):
            return self.listen if self.workers == 1 else f"{self.listen}.{index}"
        host, port = _split_host_port(self.listen)
        return f"{host}:{port + index}" if ":" not in host else f"[{host}]:{port + index}"


class Admin(_Closed):
    listen: str = "127.0.0.1:9902"
    token_file: Path | None = None
    token_env: str | None = "EXTPROC_ADMIN_TOKEN"
    allow_remote: bool = False

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: str) -> str:
        _split_host_port(v)
        return v

    @model_validator(mode="after")
    def _loopback(self) -> Admin:
        host, _ = _split_host_port(self.listen)
        if not _is_loopback(host) and not self.allow_remote:
            raise ValueError(f"admin.listen {self.listen} is beyond loopback: set admin.allow_remote: true "
                             "to mean it (mutating endpoints still need the bearer token)")
        return self


class MemoryStoreConfig(_Closed):
    max_keys: Annotated[int, Field(ge=1, le=50_000_000)] = 100_000


class RedisStoreConfig(_Closed):
    url: str
    cluster: bool = False
    password_file: Path | None = None
    password_env: str | None = None
    timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 50
    connect_timeout_ms: Annotated[int, Field(ge=1, le=60_000)] = 500
    max_connections: Annotated[int, Field(ge=1, le=10_000)] = 64

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://host:port/db, rediss://… or unix://path")
        if "@" in v.split("//", 1)[1].split("/", 1)[0]:
            raise ValueError("no credentials inline in the url: use password_file or password_env")
        return v


class StoreConfig(_Closed):
    memory: MemoryStoreConfig | None = None
    redis: RedisStoreConfig | None = None

    @model_validator(mode="after")
    def _one(self) -> StoreConfig:
        if self.memory is not None and self.redis is not None:
            raise ValueError("choose one store: memory or redis, not both")
        return self

    @property
    def kind(self) -> str:
        return "redis" if self.redis is not None else "memory"


ASYMMETRIC_ALGS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


class Provider(_Closed):
    issuer: str
    audiences: list[str] = Field(default_factory=list)
    algorithms: Annotated[list[Literal[ASYMMETRIC_ALGS]], Field(min_length=1)] = ["RS256"]  # type: ignore[valid-type]
    jwks_uri: str | None = None
    jwks_file: Path | None = None
    leeway_seconds: Annotated[float, Field(ge=0, le=600)] = 30.0
    required_claims: list[str] = Field(default_factory=lambda: ["exp"])
    fetch_timeout_ms: Annotated[int, Field(ge=10, le=30_000)] = 1000
    refresh_interval_seconds: Annotated[float, Field(gt=0, le=86_400)] = 300.0
    retry_interval_seconds: Annotated[float, Field(gt=0, le=3_600)] = 5.0
    forward_claims_header: str | None = None   # e.g. x-jwt-sub: the subject passed upstream

    @model_validator(mode="after")
    def _keys(self) -> Provider:
        if (self.jwks_uri is None) == (self.jwks_file is None):
            raise ValueError("set exactly one of jwks_uri or jwks_file")
        if self.jwks_uri is not None and not self.jwks_uri.startswith(("http://", "https://")):
            raise ValueError("jwks_uri must be an http(s) URL")
        return self


class AuthNone(_Closed):
    pass


class AuthJwt(_Closed):
    providers: Annotated[list[str], Field(min_length=1)]


class Policy(_Closed):
    mode: Literal["enforce", "shadow"] = "enforce"
    auth: Literal["none"] | AuthJwt = "none"

    @field_validator("auth", mode="before")
    @classmethod
    def _auth_shape(cls, v: Any) -> Any:
        if v == "none" or isinstance(v, dict | AuthJwt):
            return v
        raise ValueError("expected 'none' or a mapping such as {providers: [demo]}")


class Config(_Closed):
    server: Server = Field(default_factory=Server)
    admin: Admin = Field(default_factory=Admin)
    store: StoreConfig = Field(default_factory=StoreConfig)
    providers: dict[str, Provider] = Field(default_factory=dict)
    policies: dict[str, Policy] = Field(default_factory=dict)
    default_policy: str | None = None
    unknown_policy: Literal["deny", "allow"] = "deny"

    def problems(self) -> list[tuple[tuple[str, ...], str]]:
        """Checks across sections, as (key path, message): run after the field checks so each
        message can still name its line."""
        out: list[tuple[tuple[str, ...], str]] = []
        for name, pol in self.policies.items():
            if isinstance(pol.auth, AuthJwt):
                for i, p in enumerate(pol.auth.providers):
                    if p not in self.providers:
                        out.append((("policies", name, "auth", "providers", str(i)),
                                    f"unknown provider {p!r} (defined: {sorted(self.providers) or 'none'})"))
        if self.default_policy is not None and self.default_policy not in self.policies:
            out.append((("default_policy",), f"{self.default_policy!r} is not a defined policy "
                                             f"(defined: {sorted(self.policies) or 'none'})"))
        if self.server.workers > 1 and self.store.kind == "memory":
            out.append((("server", "workers"),
                        f"{self.server.workers} workers need a shared store, but the store is in-memory, which "
                        "is per process: limits and breaker state would split across workers. Configure "
                        "store.redis, or run one worker"))
        return out


# ---------------------------------------------------------------------------------------------

def _split_host_port(v: str) -> tuple[str, int]:
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected host:port, got {v!r}")
    host = host.strip("[]")
    return host, int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _line_index(text: str) -> dict[tuple[str, ...], int]:
    """Map each key path in the YAML document to its 1-based line."""
    lines: dict[tuple[str, ...], int] = {}
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return lines

    def walk(node: Any, path: tuple[str, ...]) -> None:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                p = (*path, str(k.value))
                lines[p] = k.start_mark.line + 1
                walk(v, p)
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                p = (*path, str(i))
                lines[p] = v.start_mark.line + 1
                walk(v, p)

    if root is not None:
        walk(root, ())
    return lines


def _format_errors(source: str, err: ValidationError, lines: dict[tuple[str, ...], int]) -> str:
    out = []
    for e in err.errors():
        # pydantic names union branches in loc ("AuthJwt", "literal['none']"): keep real keys only
        loc = tuple(str(p) for p in e["loc"] if not _is_branch_name(str(p)))
        path = ".".join(loc) or "(top level)"
        line = None
        for i in range(len(loc), 0, -1):
            line = lines.get(loc[:i])
            if line:
                break
        where = f"{source}:{line}" if line else source
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not part of extproc.yaml; check the spelling)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        elif msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        out.append(f"{where}: {path}: {msg}")
    return "\n".join(dict.fromkeys(out))


def _is_branch_name(part: str) -> bool:
    return part[:1].isupper() or "[" in part or part.startswith("function-")


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys (plain PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first on line {seen[key]})", key_node.start_mark)
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _check(cfg: Config, source: str, lines: dict[tuple[str, ...], int]) -> Config:
    problems = cfg.problems()
    if problems:
        out = []
        for loc, msg in problems:
            line = next((lines[loc[:i]] for i in range(len(loc), 0, -1) if loc[:i] in lines), None)
            out.append(f"{source}:{line}: {'.'.join(loc)}: {msg}" if line else f"{source}: {'.'.join(loc)}: {msg}")
        raise ConfigError("\n".join(out))
    return cfg


def parse(text: str, source: str = "<config>") -> Config:
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: YAML syntax error: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    lines = _line_index(text)
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(source, err, lines)) from None
    return _check(cfg, source, lines)


def override_workers(cfg: Config, workers: int, source: str) -> Config:
    """`serve --workers N`: the same validation as the file (e.g. N > 1 needs Redis)."""
    data = cfg.model_dump()
    data["server"]["workers"] = workers
    where = f"{source} with --workers {workers}"
    try:
        cfg = Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_errors(where, err, {})) from None
    return _check(cfg, where, {})


def load(path: str | os.PathLike[str]) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(f"{p}: cannot read: {exc.strerror or exc}") from None
    cfg = parse(text, str(p))
    return _resolve_paths(cfg, p.parent)


def _resolve_paths(cfg: Config, base: Path) -> Config:
    """Relative file paths in the config are relative to the config file."""
    def fix(p: Path | None) -> Path | None:
        return p if p is None or p.is_absolute() else (base / p)

    providers = {n: pr.model_copy(update={"jwks_file": fix(pr.jwks_file)}) for n, pr in cfg.providers.items()}
    server = cfg.server
    if server.tls is not None:
        server = server.model_copy(update={"tls": server.tls.model_copy(update={
            "cert_file": fix(server.tls.cert_file), "key_file": fix(server.tls.key_file),
            "client_ca_file": fix(server.tls.client_ca_file)})})
    admin = cfg.admin.model_copy(update={"token_file": fix(cfg.admin.token_file)})
    store = cfg.store
    if store.redis is not None:
        store = store.model_copy(update={"redis": store.redis.model_copy(
            update={"password_file": fix(store.redis.password_file)})})
    return cfg.model_copy(update={"providers": providers, "server": server, "admin": admin, "store": store})


def read_secret(file: Path | None, env: str | None, what: str) -> str | None:
    """A secret from a file (first line, stripped) or an environment variable; never inline."""
    if file is not None:
        try:
            return file.read_text().strip()
        except OSError as exc:
            raise ConfigError(f"{what}: cannot read {file}: {exc.strerror or exc}") from None
    if env:
        return os.environ.get(env) or None
    return None


_SECRET_KEYS = {"password_file", "password_env", "token_file", "token_env", "key_file"}


def redacted(cfg: Config) -> dict[str, Any]:
    """The config as served by the admin API: where secrets come from is hidden too."""
    def scrub(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: ("<redacted>" if k in _SECRET_KEYS and v is not None else scrub(v)) for k, v in obj.items()}
        if isinstance(obj, list):
            return [scrub(v) for v in obj]
        return obj
    return scrub(cfg.model_dump(mode="json"))
