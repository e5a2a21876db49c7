"""Render kustomize directories and validate Kubernetes manifests offline, for the tests of deploy/.

`render(dir)` resolves the kustomize features deploy/ uses, the way `kubectl kustomize` does:
resources (files and nested kustomizations), configMapGenerator / secretGenerator (files,
literals; behavior create, merge, replace), patches (strategic merge for maps and lists keyed by
name, mountPath, containerPort or port; JSON 6902 add / remove / replace / test), namespace,
labels / commonLabels and images. Anything else in a kustomization (a field, a `$patch`
directive, a generator's name hash) raises KustomizeError instead of being rendered wrongly.
Where `kubectl` is installed, a test checks that both render the same documents.

`errors(doc)` validates one document and returns readable messages, [] when valid: built-in
kinds with kubernetes-validate (strict: unknown fields fail), custom resources against the JSON
Schemas of ../shared/k8s-schemas (closed objects, defaults applied first as the API server does,
list-map duplicates), and metadata names and labels for every kind. A kind neither knows is an
error, never a silent pass.
"""

from __future__ import annotations

import base64
import copy
import functools
import json
import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import yaml
from jsonschema import Draft202012Validator

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = ROOT.parent / "shared" / "k8s-schemas"
K8S_VERSION = "1.33"

# groups whose kinds are custom resources (validated against SCHEMAS, never kubernetes-validate)
CRD_GROUPS = ("istio.io", "gateway.envoyproxy.io", "gateway.networking.k8s.io")
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "CustomResourceDefinition",
                  "PersistentVolume", "StorageClass", "PriorityClass", "GatewayClass",
                  "ValidatingWebhookConfiguration", "MutatingWebhookConfiguration", "IngressClass"}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"}


class KustomizeError(Exception):
    """A kustomization this renderer cannot resolve (or that kustomize itself would refuse)."""


class SchemasUnavailable(Exception):
    """../shared/k8s-schemas is not there (e.g. a clone of this repository alone)."""


class K8sLoader(yaml.SafeLoader):
    """YAML as kubectl reads it: an unquoted timestamp stays a string."""


K8sLoader.add_constructor("tag:yaml.org,2002:timestamp", yaml.SafeLoader.construct_yaml_str)


def load_docs(path: Path) -> list[dict]:
    with path.open() as f:
        return [d for d in yaml.load_all(f, Loader=K8sLoader) if d]  # noqa: S506 - a SafeLoader


# --- rendering ---------------------------------------------------------------------------------

_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "configMapGenerator",
                         "secretGenerator", "generatorOptions", "namespace", "labels", "commonLabels",
                         "images"}
_GENERATOR_FIELDS = {"name", "namespace", "files", "literals", "behavior", "options", "type"}


def identity(doc: dict) -> tuple[str, str, str, str]:
    meta = doc.get("metadata") or {}
    return doc.get("apiVersion", ""), doc.get("kind", ""), meta.get("namespace", ""), meta.get("name", "")


def render(directory: Path) -> list[dict]:
    """The documents `kubectl kustomize DIRECTORY` prints (in no particular order)."""
    directory = directory.resolve()
    kfile = next((directory / n for n in ("kustomization.yaml", "kustomization.yml", "Kustomization")
                  if (directory / n).exists()), None)
    if kfile is None:
        raise KustomizeError(f"{directory}: no kustomization.yaml")
    k = yaml.safe_load(kfile.read_text()) or {}
    unknown = set(k) - _KUSTOMIZATION_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: fields not supported by this renderer: {sorted(unknown)}")

    docs: list[dict] = []
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        docs.extend(render(path) if path.is_dir() else load_docs(_inside(path, directory, kfile, entry)))
    _check_unique(docs, kfile)

    options = k.get("generatorOptions") or {}
    for kind, field in (("ConfigMap", "configMapGenerator"), ("Secret", "secretGenerator")):
        for gen in k.get(field, []):
            _generate(docs, kind, gen, options, directory, kfile)

    for i, patch in enumerate(k.get("patches", [])):
        _patch(docs, patch, directory, kfile, i)
    if "namespace" in k:
        _set_namespace(docs, k["namespace"], kfile)
    for spec in k.get("labels", []):
        _add_labels(docs, spec.get("pairs", {}), selectors=spec.get("includeSelectors", False),
                    templates=spec.get("includeTemplates", False))
    if k.get("commonLabels"):
        _add_labels(docs, k["commonLabels"], selectors=True, templates=True)
    for image in k.get("images", []):
        _set_image(docs, image)
    _check_unique(docs, kfile)
    return docs


def _inside(path: Path, directory: Path, kfile: Path, entry: str) -> Path:
    # kustomize's load restrictor: a kustomization reads files in its own directory tree only
    if not path.is_relative_to(directory):
        raise KustomizeError(f"{kfile}: {entry!r} is outside {directory} (kustomize's load restrictor "
                             "refuses it: copy the file in, or make its directory a kustomization)")
    if not path.is_file():
        raise KustomizeError(f"{kfile}: {entry!r} does not exist")
    return path


def _check_unique(docs: list[dict], kfile: Path) -> None:
    seen = set()
    for d in docs:
        ident = identity(d)
        if ident in seen:
            raise KustomizeError(f"{kfile}: two resources are {ident[1]}/{ident[3]} in namespace {ident[2]!r}")
        seen.add(ident)


def _generate(docs: list[dict], kind: str, gen: dict, options: dict, directory: Path, kfile: Path) -> None:
    unknown = set(gen) - _GENERATOR_FIELDS
    if unknown:
        raise KustomizeError(f"{kfile}: generator {gen.get('name')!r}: fields not supported: {sorted(unknown)}")
    opts = {**options, **(gen.get("options") or {})}
    if not opts.get("disableNameSuffixHash"):
        raise KustomizeError(f"{kfile}: generator {gen['name']!r}: name suffix hashes are not rendered here; "
                             "set generatorOptions.disableNameSuffixHash: true")
    data: dict[str, str] = {}
    for entry in gen.get("files", []):
        key, sep, rel = entry.partition("=")
        rel = rel if sep else key
        key = key if sep else Path(rel).name
        data[key] = _inside((directory / rel).resolve(), directory, kfile, rel).read_text()
    for entry in gen.get("literals", []):
        key, sep, value = entry.partition("=")
        if not sep:
            raise KustomizeError(f"{kfile}: generator {gen['name']!r}: literal {entry!r} is not key=value")
        data[key] = value
    meta: dict[str, Any] = {"name": gen["name"]}
    if gen.get("namespace"):
        meta["namespace"] = gen["namespace"]
    for field in ("labels", "annotations"):
        if opts.get(field):
            meta[field] = dict(opts[field])
    doc: dict[str, Any] = {"apiVersion": "v1", "kind": kind, "metadata": meta}
    if kind == "Secret":
        doc["type"] = gen.get("type", "Opaque")
        doc["data"] = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    else:
        doc["data"] = data

    behavior = gen.get("behavior", "create")
    existing = [d for d in docs if d.get("kind") == kind and d["metadata"].get("name") == gen["name"]
                and (not gen.get("namespace") or d["metadata"].get("namespace") == gen["namespace"])]
    if behavior == "create":
        if existing:
            raise KustomizeError(f"{kfile}: {kind} {gen['name']!r} already exists: use behavior merge or replace")
        docs.append(doc)
        return
    if behavior not in ("merge", "replace"):
        raise KustomizeError(f"{kfile}: generator {gen['name']!r}: behavior {behavior!r} is not create, merge or replace")
    if len(existing) != 1:
        raise KustomizeError(f"{kfile}: generator {gen['name']!r} ({behavior}): no {kind} of that name to {behavior}")
    old = existing[0]
    # kustomize keeps the existing object's identity and metadata; merge adds keys, replace swaps data
    old["data"] = {**old.get("data", {}), **doc["data"]} if behavior == "merge" else doc["data"]
    for field in ("labels", "annotations"):
        if field in meta:
            old["metadata"].setdefault(field, {}).update(meta[field])


def _patch(docs: list[dict], patch: dict, directory: Path, kfile: Path, index: int) -> None:
    unknown = set(patch) - {"path", "patch", "target", "options"}
    if unknown or patch.get("options"):
        raise KustomizeError(f"{kfile}: patches[{index}]: not supported: {sorted(unknown | set(patch.get('options') or {}))}")
    if "path" in patch:
        text = _inside((directory / patch["path"]).resolve(), directory, kfile, patch["path"]).read_text()
        where = f"{kfile.parent / patch['path']}"
    elif "patch" in patch:
        text, where = patch["patch"], f"{kfile}: patches[{index}]"
    else:
        raise KustomizeError(f"{kfile}: patches[{index}]: needs path or patch")
    bodies = [b for b in yaml.load_all(text, Loader=K8sLoader) if b is not None]  # noqa: S506
    target = patch.get("target")
    if target is not None:
        unknown = set(target) - {"group", "version", "kind", "name", "namespace"}
        if unknown:
            raise KustomizeError(f"{where}: target selectors not supported: {sorted(unknown)}")
    for body in bodies:
        if isinstance(body, list):                       # JSON 6902
            if target is None:
                raise KustomizeError(f"{where}: a JSON 6902 patch needs a target")
            matched = [d for d in docs if _matches(d, target)]
            if not matched:
                raise KustomizeError(f"{where}: no resource matches target {target}")
            for d in matched:
                _json6902(d, body, where)
            continue
        if not isinstance(body, dict):
            raise KustomizeError(f"{where}: a patch is a mapping (strategic merge) or a list (JSON 6902)")
        sel = target or {"kind": body.get("kind"), "name": (body.get("metadata") or {}).get("name")}
        if target is None:
            group, _, version = (body.get("apiVersion") or "").rpartition("/")
            sel = {**sel, "group": group, "version": version}
            if (body.get("metadata") or {}).get("namespace"):
                sel["namespace"] = body["metadata"]["namespace"]
        matched = [d for d in docs if _matches(d, sel)]
        if not matched:
            raise KustomizeError(f"{where}: no resource matches {sel.get('kind')}/{sel.get('name')}")
        if target is not None:      # the target names the resources: the patch's own identity is ignored
            body = {k: v for k, v in body.items() if k not in ("apiVersion", "kind")}
            if isinstance(body.get("metadata"), dict):
                body["metadata"] = {k: v for k, v in body["metadata"].items() if k not in ("name", "namespace")}
        for d in matched:
            merged = _merge(d, body, where, ())
            d.clear()
            d.update(merged)


def _matches(doc: dict, sel: dict) -> bool:
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    meta = doc.get("metadata") or {}
    checks = {"group": group, "version": version, "kind": doc.get("kind"), "name": meta.get("name"),
              "namespace": meta.get("namespace", "")}
    return all(sel.get(k) in (None, checks[k]) for k in checks)


def _merge_key(items: list) -> str | None:
    if not items or not all(isinstance(i, dict) for i in items):
        return None
    for key in ("name", "mountPath", "containerPort", "port"):
        if all(key in i for i in items):
            return key
    return None


def _merge(base: Any, patch: Any, where: str, path: tuple) -> Any:
    """Strategic merge for the cases deploy/ uses: maps merge, null deletes, lists of maps merge
    by their key (name, mountPath, containerPort, port), other lists are replaced."""
    if isinstance(patch, dict):
        if any(k.startswith("$") for k in patch):
            raise KustomizeError(f"{where}: {'/'.join(map(str, path)) or '<root>'}: strategic-merge directives "
                                 f"({', '.join(k for k in patch if k.startswith('$'))}) are not supported here")
        out = dict(base) if isinstance(base, dict) else {}
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = _merge(out.get(k), v, where, (*path, k))
        return out
    if isinstance(patch, list) and isinstance(base, list):
        key = _merge_key(patch)
        if key is not None and _merge_key(base) == key:
            # as kustomize (kyaml) orders them: the patch's items first, merged into their
            # originals, then the originals the patch does not name
            named = {item[key] for item in patch}
            out = []
            for item in patch:
                original = next((b for b in base if b.get(key) == item[key]), None)
                out.append(copy.deepcopy(item) if original is None
                           else _merge(original, item, where, (*path, item[key])))
            return out + [copy.deepcopy(b) for b in base if b.get(key) not in named]
    return copy.deepcopy(patch)


def _pointer(path: str, where: str) -> list[str]:
    if not path.startswith("/"):
        raise KustomizeError(f"{where}: JSON pointer {path!r} must start with /")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _json6902(doc: dict, ops: list, where: str) -> None:
    for op in ops:
        name = op.get("op")
        if name not in ("add", "remove", "replace", "test"):
            raise KustomizeError(f"{where}: JSON 6902 op {name!r} is not supported (add, remove, replace, test)")
        parts = _pointer(op["path"], where)
        parent: Any = doc
        try:
            for p in parts[:-1]:
                parent = parent[int(p)] if isinstance(parent, list) else parent[p]
            last = parts[-1]
            if isinstance(parent, list):
                idx = len(parent) if last == "-" else int(last)
                if name == "add":
                    parent.insert(idx, copy.deepcopy(op["value"]))
                elif name == "remove":
                    del parent[idx]
                elif name == "replace":
                    parent[idx] = copy.deepcopy(op["value"])
                elif parent[idx] != op["value"]:
                    raise KustomizeError(f"{where}: JSON 6902 test failed at {op['path']}")
            else:
                if name in ("remove", "replace", "test") and last not in parent:
                    raise KeyError(last)
                if name in ("add", "replace"):
                    parent[last] = copy.deepcopy(op["value"])
                elif name == "remove":
                    del parent[last]
                elif parent[last] != op["value"]:
                    raise KustomizeError(f"{where}: JSON 6902 test failed at {op['path']}")
        except (KeyError, IndexError, ValueError, TypeError):
            raise KustomizeError(f"{where}: JSON 6902 {name} {op['path']}: no such path in "
                                 f"{doc.get('kind')}/{doc.get('metadata', {}).get('name')}") from None


def _set_namespace(docs: list[dict], namespace: str, kfile: Path) -> None:
    for d in docs:
        if d.get("kind") in ("RoleBinding", "ClusterRoleBinding"):
            raise KustomizeError(f"{kfile}: namespace with {d['kind']} subjects is not rendered here")
        if d.get("kind") not in CLUSTER_SCOPED:
            d.setdefault("metadata", {})["namespace"] = namespace


def _pod_templates(doc: dict) -> list[dict]:
    kind, spec = doc.get("kind"), doc.get("spec") or {}
    if kind in WORKLOADS:
        return [spec.setdefault("template", {})]
    if kind == "CronJob":
        return [spec.setdefault("jobTemplate", {}).setdefault("spec", {}).setdefault("template", {})]
    return []


def _add_labels(docs: list[dict], pairs: dict, *, selectors: bool, templates: bool) -> None:
    for d in docs:
        d.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if templates or selectors:
            for t in _pod_templates(d):
                t.setdefault("metadata", {}).setdefault("labels", {}).update(pairs)
        if not selectors or not isinstance(d.get("spec"), dict):
            continue
        kind, spec = d.get("kind"), d["spec"]
        if kind == "Service":
            spec.setdefault("selector", {}).update(pairs)
        elif kind in WORKLOADS or kind == "PodDisruptionBudget":
            spec.setdefault("selector", {}).setdefault("matchLabels", {}).update(pairs)
        elif kind == "NetworkPolicy":
            spec.setdefault("podSelector", {}).setdefault("matchLabels", {}).update(pairs)
            for rule, peers in (("ingress", "from"), ("egress", "to")):
                for r in spec.get(rule, []):
                    for peer in r.get(peers, []):
                        if "podSelector" in peer:
                            peer["podSelector"].setdefault("matchLabels", {}).update(pairs)


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(name, tag, digest) of an image reference."""
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    tag = None
    if colon > slash:
        name, tag = name[:colon], name[colon + 1:]
    return name, tag, digest or None


def _set_image(docs: list[dict], spec: dict) -> None:
    for d in docs:
        for t in _pod_templates(d) + ([d] if d.get("kind") == "Pod" else []):
            pod = t.get("spec") or {}
            for c in pod.get("containers", []) + pod.get("initContainers", []):
                name, tag, digest = split_image(c.get("image", ""))
                if name != spec["name"]:
                    continue
                name = spec.get("newName", name)
                if spec.get("digest"):
                    c["image"] = f"{name}@{spec['digest']}"
                elif spec.get("newTag"):
                    c["image"] = f"{name}:{spec['newTag']}"
                else:
                    c["image"] = name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


# --- validation --------------------------------------------------------------------------------

_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

# Kinds deploy/ uses that ../shared/k8s-schemas does not carry yet: a schema transcribed from the
# CRD (kubernetes-sigs/gateway-api 4564255ac2c35d582249b3cdf261bdf51c8bca32, the snapshot the
# shared schemas come from, config/crd/standard/gateway.networking.k8s.io_backendtlspolicies.yaml,
# version v1; CEL rules left out). A file of that name in SCHEMAS takes precedence.
_REF = {"type": "object", "required": ["group", "kind", "name"], "properties": {
    "group": {"type": "string", "maxLength": 253,
              "pattern": r"^$|^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"},
    "kind": {"type": "string", "minLength": 1, "maxLength": 63, "pattern": r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"},
    "name": {"type": "string", "minLength": 1, "maxLength": 253}}}
_HOSTNAME = {"type": "string", "minLength": 1, "maxLength": 253,
             "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"}
TRANSCRIBED_SCHEMAS: dict[str, dict] = {
    "gateway.networking.k8s.io_backendtlspolicy_v1.json": {
        "type": "object", "properties": {
            "apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": {"type": "object"},
            "spec": {"type": "object", "required": ["targetRefs", "validation"], "properties": {
                "targetRefs": {"type": "array", "minItems": 1, "maxItems": 16, "items": {
                    **_REF, "properties": {**_REF["properties"], "sectionName": _HOSTNAME}}},
                "validation": {"type": "object", "required": ["hostname"], "properties": {
                    "caCertificateRefs": {"type": "array", "maxItems": 8, "items": _REF},
                    "wellKnownCACertificates": {"type": "string", "minLength": 1, "maxLength": 253},
                    "hostname": _HOSTNAME,
                    "subjectAltNames": {"type": "array", "maxItems": 5, "items": {
                        "type": "object", "required": ["type"], "properties": {
                            "type": {"enum": ["Hostname", "URI"]}, "hostname": {"type": "string"},
                            "uri": {"type": "string"}}}}}},
                "options": {"type": "object", "maxProperties": 16,
                            "additionalProperties": {"type": "string", "maxLength": 4096}}}},
            "status": {"type": "object"}}},
}


def is_custom(doc: dict) -> bool:
    group = doc.get("apiVersion", "").rpartition("/")[0]
    return any(group == g or group.endswith("." + g) for g in CRD_GROUPS)


def schema_name(doc: dict) -> str:
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    return f"{group}_{doc.get('kind', '').lower()}_{version}.json"


def _close(s: Any) -> Any:
    """Unknown fields fail (as `kubectl apply`'s strict validation): every object that lists its
    properties gets additionalProperties false, unless it preserves unknown fields."""
    if isinstance(s, dict):
        if "properties" in s and "additionalProperties" not in s and not s.get("x-kubernetes-preserve-unknown-fields"):
            s["additionalProperties"] = False
        for sub in [*s.get("properties", {}).values(), s.get("items"), s.get("additionalProperties")]:
            _close(sub)
    return s


def _defaults(s: Any, o: Any) -> Any:
    """What the API server does before validating: drop non-nullable nulls, fill defaults."""
    if isinstance(o, dict) and isinstance(s, dict):
        props = s.get("properties", {})
        for k in [k for k, v in o.items() if v is None and not props.get(k, {}).get("nullable")]:
            del o[k]
        for k, p in props.items():
            if k not in o and "default" in p:
                o[k] = copy.deepcopy(p["default"])
        for k, v in o.items():
            _defaults(props[k] if k in props else s.get("additionalProperties"), v)
    elif isinstance(o, list) and isinstance(s, dict):
        for v in o:
            _defaults(s.get("items"), v)
    return o


def _list_errors(s: Any, o: Any, path: str = "") -> list[str]:
    """x-kubernetes-list-type map / set: duplicate entries, which the API server rejects."""
    errs: list[str] = []
    if isinstance(s, dict) and isinstance(o, list):
        lt, keys = s.get("x-kubernetes-list-type"), s.get("x-kubernetes-list-map-keys", [])
        if lt in ("map", "set"):
            seen = [json.dumps([x.get(k) for k in keys] if lt == "map" else x, sort_keys=True)
                    for x in o if lt == "set" or isinstance(x, dict)]
            errs += [f"{path}: duplicate {'/'.join(keys) or 'item'} {d}"
                     for d in sorted({d for d in seen if seen.count(d) > 1})]
        for i, x in enumerate(o):
            errs += _list_errors(s.get("items"), x, f"{path}/{i}")
    elif isinstance(s, dict) and isinstance(o, dict):
        props = s.get("properties", {})
        for k, v in o.items():
            errs += _list_errors(props.get(k, s.get("additionalProperties")), v, f"{path}/{k}".lstrip("/"))
    return errs


@functools.cache
def _schema(name: str) -> tuple[dict, Draft202012Validator]:
    path = SCHEMAS / name
    if path.exists():
        schema = json.loads(path.read_text())
    elif name in TRANSCRIBED_SCHEMAS:
        schema = copy.deepcopy(TRANSCRIBED_SCHEMAS[name])
    else:
        raise FileNotFoundError(name)
    return schema, Draft202012Validator(_close(copy.deepcopy(schema)))


_RESOURCE_NAME = re.compile(r"^(cpu|memory|ephemeral-storage|hugepages-[0-9]+[KMG]i|[a-z0-9.-]+/[-a-z0-9_.]+)$")


def _resource_errors(doc: dict) -> list[str]:
    """Resource names in requests and limits: schemas take any key, the API server does not
    (a `memroy` limit would pass both validators above)."""
    errs = []
    for t in _pod_templates(copy.deepcopy(doc)) + ([doc] if doc.get("kind") == "Pod" else []):
        pod = t.get("spec") or {}
        for group in ("containers", "initContainers"):
            for i, c in enumerate(pod.get(group) or []):
                for field in ("requests", "limits"):
                    for key in (c.get("resources") or {}).get(field) or {}:
                        if not _RESOURCE_NAME.match(str(key)):
                            errs.append(f"{group}/{i}/resources/{field}: {key!r} is not a resource name "
                                        "(cpu, memory, ephemeral-storage, hugepages-<size>, or domain/name)")
    return errs


def _metadata_errors(doc: dict) -> list[str]:
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):
        return ["metadata/name: required"]
    errs = []
    name = str(meta["name"])
    if len(name) > 253 or not _DNS_SUBDOMAIN.match(name):
        errs.append(f"metadata/name: {name!r} is not a lower-case DNS-1123 name")
    ns = meta.get("namespace")
    if ns is not None and (len(ns) > 63 or not _DNS_LABEL.match(ns)):
        errs.append(f"metadata/namespace: {ns!r} is not a DNS-1123 label")
    labels = dict(meta.get("labels") or {})
    for t in _pod_templates(copy.deepcopy(doc)):
        labels.update((t.get("metadata") or {}).get("labels") or {})
    for key, value in labels.items():
        prefix, _, label = str(key).rpartition("/")
        if (prefix and not _DNS_SUBDOMAIN.match(prefix)) or len(label) > 63 or not _LABEL_NAME.match(label):
            errs.append(f"metadata/labels: {key!r} is not a valid label name")
        if not isinstance(value, str) or len(value) > 63 or not _LABEL_VALUE.match(value):
            errs.append(f"metadata/labels/{key}: {value!r} is not a valid label value (a string, 63 characters at most)")
    return errs


def errors(doc: dict, where: str = "") -> list[str]:
    """Every problem with one manifest, each naming where, the object and the field path."""
    label = f"{where}: " if where else ""
    label += f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    if not doc.get("apiVersion") or not doc.get("kind"):
        return [f"{label}: apiVersion and kind are required"]
    errs = _metadata_errors(doc) + _resource_errors(doc)
    if is_custom(doc):
        name = schema_name(doc)
        if not SCHEMAS.is_dir() and name not in TRANSCRIBED_SCHEMAS:
            raise SchemasUnavailable(f"{SCHEMAS} is not there: custom resources cannot be validated offline")
        try:
            schema, validator = _schema(name)
        except FileNotFoundError:
            return [f"{label}: no schema {name} in {SCHEMAS} (unknown kind or apiVersion)"]
        obj = _defaults(schema, copy.deepcopy(doc))
        errs += [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                 for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path)))]
        errs += _list_errors(schema, obj)
    else:
        try:
            kubernetes_validate.validate(copy.deepcopy(doc), K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            errs.append(f"{'/'.join(map(str, e.path)) or '<root>'}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            errs.append(f"no Kubernetes {K8S_VERSION} schema: {e}")
    return [f"{label}: {e}" for e in errs]
