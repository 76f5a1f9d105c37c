#!/usr/bin/env python3
"""Offline checks of deploy/ (issue 10): no API server needed.

- `kubectl kustomize` renders deploy/, deploy/overlays/chained/ and the webhooks; every
  rendered object validates with kubernetes-validate --strict against Kubernetes 1.32 and the
  newest schemas it has.
- CRDs are structural (a `type` on every schema node), have exactly one storage version, integer
  bounds and only formats Kubernetes knows.
- deploy/examples/ objects of allot's kinds validate against the CRDs' openAPIV3Schema (Python
  jsonschema), and broken copies of them (maskSize 0, 33, 129, bad CIDRs, unknown fields) are
  rejected; built-in kinds validate with kubernetes-validate.
- RBAC: no "*", no secrets, no escalation verbs, no nonResourceURLs.
- Images: a tag or digest on every one, never `latest`.
- Webhooks: each ValidatingWebhookConfiguration calls a rendered Service port that leads to a
  container port of the pods it selects; failurePolicy and sideEffects are set.
- cert-manager (the renders given after --cert-manager): each webhook configuration's
  inject-ca-from names a rendered Certificate whose issuer is rendered beside it, whose dnsNames
  hold the name the apiserver calls (SERVICE.NAMESPACE.svc) and whose Secret the Service's pods
  mount. cert-manager's kinds have no schema here, so these renders are not schema-validated.

Usage: check_manifests.py DEPLOY_DIR RENDERED.yaml [...] [--cert-manager RENDERED.yaml ...]
Prints one line per check and `N passed, N failed`; exits 1 on any failure.
"""

import copy
import os
import subprocess
import sys

import jsonschema
import kubernetes_validate
import kubernetes_validate.utils
import yaml

OLDEST = "1.32.0"
ALLOT_GROUP = "allot.dev"
# Formats the apiserver understands (k8s.io/kube-openapi's strfmt registry) plus int32/int64/
# float/double; anything else (schemars' uint8, say) is meaningless to Kubernetes.
K8S_FORMATS = {
    "int32", "int64", "float", "double", "byte", "binary", "date", "date-time", "password",
    "bsonobjectid", "uri", "email", "hostname", "ipv4", "ipv6", "cidr", "mac", "uuid", "uuid3",
    "uuid4", "uuid5", "isbn", "isbn10", "isbn13", "creditcard", "ssn", "hexcolor", "rgbcolor",
    "duration", "datetime",
}

passed = 0
failed = []


def check(name, ok, detail=""):
    global passed
    if ok:
        passed += 1
        print(f"ok   {name}")
    else:
        failed.append(name)
        print(f"FAIL {name}: {detail}")


def load_all(path):
    with open(path) as f:
        return [d for d in yaml.safe_load_all(f) if d]


def ident(obj):
    m = obj.get("metadata", {})
    ns = m.get("namespace")
    return f"{obj.get('kind')}/{ns + '/' if ns else ''}{m.get('name')}"


def k8s_validate(obj, version):
    """kubernetes-validate's own check, strict (unknown fields are errors)."""
    try:
        kubernetes_validate.validate(obj, version, strict=True)
        return None
    except kubernetes_validate.ValidationError as e:
        return f"{e.message} at {'.'.join(str(p) for p in e.path)}"
    except Exception as e:  # SchemaNotFoundError, VersionNotSupportedError
        return f"{type(e).__name__}: {e}"


def walk_schema(node, path, problems):
    """Structural schema rules that matter here: a type everywhere (unless the node preserves
    unknown fields or is int-or-string), integer bounds, known formats."""
    if not isinstance(node, dict):
        return
    if "type" not in node and not (node.get("x-kubernetes-int-or-string") or node.get("x-kubernetes-preserve-unknown-fields")):
        problems.append(f"{path}: no type")
    for key in ("minimum", "maximum", "minLength", "maxLength", "minItems", "maxItems"):
        if key in node and not isinstance(node[key], int):
            problems.append(f"{path}: {key} {node[key]!r} is not an integer")
    if "format" in node and node["format"] not in K8S_FORMATS:
        problems.append(f"{path}: format {node['format']!r} is not one Kubernetes knows")
    for k, sub in (node.get("properties") or {}).items():
        walk_schema(sub, f"{path}.{k}", problems)
    if isinstance(node.get("items"), dict):
        walk_schema(node["items"], f"{path}[]", problems)
    if isinstance(node.get("additionalProperties"), dict):
        walk_schema(node["additionalProperties"], f"{path}{{}}", problems)


def crd_schemas(crds):
    """(apiVersion, kind) -> openAPIV3Schema of the served versions."""
    out = {}
    for crd in crds:
        spec = crd["spec"]
        for v in spec["versions"]:
            if v.get("served"):
                out[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = v["schema"]["openAPIV3Schema"]
    return out


def schema_errors(schema, obj):
    # The CRD schema covers spec/status; metadata is the apiserver's own.
    body = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata")}
    s = copy.deepcopy(schema)
    s.get("properties", {}).pop("apiVersion", None)
    s.get("properties", {}).pop("kind", None)
    s.get("properties", {}).pop("metadata", None)
    s = strict_schema(s)
    return sorted(e.message for e in jsonschema.Draft7Validator(s).iter_errors(body))


def strict_schema(node):
    """The apiserver prunes unknown fields, kubectl --validate=strict refuses them: refuse them
    here too (additionalProperties false where properties are listed)."""
    if isinstance(node, dict):
        node = {k: strict_schema(v) for k, v in node.items() if not k.startswith("x-kubernetes-")}
        if "properties" in node and "additionalProperties" not in node:
            node["additionalProperties"] = False
        return node
    if isinstance(node, list):
        return [strict_schema(v) for v in node]
    return node


def containers(obj):
    spec = obj.get("spec", {})
    if obj.get("kind") in ("Deployment", "DaemonSet", "StatefulSet", "ReplicaSet", "Job"):
        spec = spec.get("template", {}).get("spec", {})
    elif obj.get("kind") != "Pod":
        return []
    return list(spec.get("initContainers", [])) + list(spec.get("containers", []))


def selected_workloads(objs, svc):
    """The Deployments and DaemonSets whose pods a Service selects."""
    selector = svc["spec"]["selector"].items()
    return [w for w in objs if w.get("kind") in ("Deployment", "DaemonSet")
            and w["metadata"].get("namespace") == svc["metadata"].get("namespace")
            and selector <= w["spec"]["template"]["metadata"].get("labels", {}).items()]


def check_cert_manager(path):
    objs = load_all(path)
    base = os.path.basename(path)
    by_kind = lambda kind: {(o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in objs if o.get("kind") == kind}
    certs, services = by_kind("Certificate"), by_kind("Service")
    issuers = {("Issuer",) + k for k in by_kind("Issuer")} | {("ClusterIssuer", None, n) for _, n in by_kind("ClusterIssuer")}
    hooks = [o for o in objs if o.get("kind") == "ValidatingWebhookConfiguration"]
    check(f"{base}: renders a ValidatingWebhookConfiguration", bool(hooks), "none")
    for obj in hooks:
        ref = obj["metadata"].get("annotations", {}).get("cert-manager.io/inject-ca-from", "")
        ns, _, name = ref.partition("/")
        cert = certs.get((ns, name))
        check(f"{base}: {ident(obj)} inject-ca-from {ref!r} is a rendered Certificate", cert is not None, sorted(certs))
        if cert is None:
            continue
        issuer = cert["spec"].get("issuerRef", {})
        kind = issuer.get("kind", "Issuer")
        key = (kind, ns if kind == "Issuer" else None, issuer.get("name"))
        check(f"{base}: Certificate {ref} issuer {kind}/{issuer.get('name')} rendered", key in issuers, sorted(issuers, key=str))
        dns = cert["spec"].get("dnsNames", [])
        for hook in obj.get("webhooks", []):
            svc_ref = hook["clientConfig"].get("service") or {}
            host = f"{svc_ref.get('name')}.{svc_ref.get('namespace')}.svc"
            check(f"{base}: Certificate {ref} is valid for {host}, which the apiserver calls", host in dns, dns)
            svc = services.get((svc_ref.get("namespace"), svc_ref.get("name")))
            if svc is None:
                check(f"{base}: Service {host} rendered", False, sorted(services))
                continue
            secret = cert["spec"].get("secretName")
            serving = selected_workloads(objs, svc)
            check(f"{base}: Service {host} selects a workload", bool(serving), "none")
            for w in serving:
                mounted = [v["secret"]["secretName"] for v in w["spec"]["template"]["spec"].get("volumes", []) if "secret" in v]
                check(f"{base}: {ident(w)} mounts the Certificate's Secret {secret}",
                      w["metadata"].get("namespace") == ns and secret in mounted, mounted)


def main():
    args = sys.argv[1:]
    cert_manager = []
    if "--cert-manager" in args:
        i = args.index("--cert-manager")
        args, cert_manager = args[:i], args[i + 1:]
    deploy, rendered = args[0], args[1:]
    newest = kubernetes_validate.utils.latest_version()
    versions = [OLDEST, newest]
    print(f"kubernetes-validate {kubernetes_validate.__version__ if hasattr(kubernetes_validate, '__version__') else ''}: Kubernetes {OLDEST} and {newest}")

    all_objs = []
    for path in rendered:
        objs = load_all(path)
        check(f"{os.path.basename(path)} renders objects", len(objs) > 0, "nothing rendered")
        for obj in objs:
            for v in versions:
                err = k8s_validate(obj, v)
                check(f"{os.path.basename(path)}: {ident(obj)} valid for Kubernetes {v}", err is None, err)
        all_objs += objs

    # CRDs: what deploy/ renders.
    crds = [o for o in all_objs if o.get("kind") == "CustomResourceDefinition"]
    names = sorted({c["spec"]["names"]["kind"] for c in crds})
    check("CRDs rendered: AllotNode, IPBlock, IPPool, Migration", names == ["AllotNode", "IPBlock", "IPPool", "Migration"], names)
    # kustomize re-serializes (32.0 becomes 32): check the committed file as written too.
    raw = load_all(os.path.join(deploy, "crds", "allot.dev.yaml"))
    for src, crd in [("rendered", c) for c in {c["metadata"]["name"]: c for c in crds}.values()] + [("committed", c) for c in raw]:
        name = f"{crd['metadata']['name']} ({src})"
        storage = [v["name"] for v in crd["spec"]["versions"] if v.get("storage")]
        check(f"CRD {name}: exactly one storage version", len(storage) == 1, storage)
        problems = []
        for v in crd["spec"]["versions"]:
            walk_schema(v["schema"]["openAPIV3Schema"], f"{v['name']}", problems)
        check(f"CRD {name}: structural schema (types, integer bounds, known formats)", not problems, "; ".join(problems))
    schemas = crd_schemas(crds)

    # RBAC.
    for obj in all_objs:
        if obj.get("kind") not in ("Role", "ClusterRole"):
            continue
        bad = []
        for rule in obj.get("rules", []):
            for key in ("apiGroups", "resources", "verbs", "resourceNames"):
                if "*" in rule.get(key, []):
                    bad.append(f"'*' in {key}")
            if "secrets" in rule.get("resources", []):
                bad.append("secrets")
            if set(rule.get("verbs", [])) & {"escalate", "bind", "impersonate"}:
                bad.append(f"verbs {rule['verbs']}")
            if rule.get("nonResourceURLs"):
                bad.append("nonResourceURLs")
        check(f"RBAC {ident(obj)}: no '*', no secrets, no escalation", not bad, bad)
    sa = {o["metadata"]["name"] for o in all_objs if o.get("kind") == "ServiceAccount"}
    for obj in all_objs:
        if obj.get("kind") in ("Deployment", "DaemonSet"):
            want = obj["spec"]["template"]["spec"].get("serviceAccountName")
            check(f"{ident(obj)} runs as its own ServiceAccount", want in sa, f"{want!r} not among {sorted(sa)}")

    # Webhooks: each configuration calls a rendered Service on one of its ports, and that port
    # leads to a container port of the pods the Service selects.
    services = {(o["metadata"].get("namespace"), o["metadata"]["name"]): o for o in all_objs if o.get("kind") == "Service"}
    workloads = [o for o in all_objs if o.get("kind") in ("Deployment", "DaemonSet")]
    for obj in all_objs:
        if obj.get("kind") != "ValidatingWebhookConfiguration":
            continue
        for hook in obj.get("webhooks", []):
            ref = hook["clientConfig"].get("service")
            name = f"{ident(obj)} webhook {hook['name']}"
            if ref is None:
                check(f"{name}: calls a Service", False, "clientConfig has no service")
                continue
            svc = services.get((ref["namespace"], ref["name"]))
            check(f"{name}: Service {ref['namespace']}/{ref['name']} rendered beside it", svc is not None, sorted(services))
            if svc is None:
                continue
            port = next((p for p in svc["spec"]["ports"] if p["port"] == ref.get("port", 443)), None)
            check(f"{name}: Service port {ref.get('port', 443)}", port is not None, svc["spec"]["ports"])
            if port is None:
                continue
            target = port.get("targetPort", port["port"])
            pods = selected_workloads(workloads, svc)
            served = [c for w in pods for c in containers(w)
                      if any(target in (cp.get("name"), cp["containerPort"]) for cp in c.get("ports", []))]
            check(f"{name}: targetPort {target} is a container port of the selected pods", bool(served), [ident(w) for w in pods])
            check(f"{name}: failurePolicy and sideEffects set", "failurePolicy" in hook and "sideEffects" in hook, hook)

    for path in cert_manager:
        check_cert_manager(path)

    # Images.
    for obj in all_objs + load_examples(deploy):
        for c in containers(obj):
            image = c.get("image", "")
            last = image.rsplit("/", 1)[-1]
            ok = "@sha256:" in image or (":" in last and not last.endswith(":latest"))
            check(f"{ident(obj)} container {c['name']}: image {image} pinned (tag, not latest)", ok, image)

    # Examples: allot kinds against the CRD schemas, built-in kinds with kubernetes-validate.
    examples = load_examples(deploy)
    check("deploy/examples/ has IPPools", any(o.get("kind") == "IPPool" for o in examples), "none")
    for obj in examples:
        key = (obj.get("apiVersion"), obj.get("kind"))
        if obj.get("apiVersion", "").startswith(ALLOT_GROUP + "/"):
            check(f"example {ident(obj)}: a kind the CRDs define", key in schemas, key)
            if key in schemas:
                errs = schema_errors(schemas[key], obj)
                check(f"example {ident(obj)} valid against the CRD schema", not errs, errs)
        else:
            for v in versions:
                err = k8s_validate(obj, v)
                check(f"example {ident(obj)} valid for Kubernetes {v}", err is None, err)

    # Broken pools the schema must refuse (what a platform engineer might mistype).
    pool = schemas[("allot.dev/v1", "IPPool")]
    good = {"spec": {"ipv4": {"cidrs": ["10.20.0.0/16"], "maskSize": 24}, "ipv6": {"cidrs": ["fd00::/104"], "maskSize": 120}}}
    check("negative-case base pool is accepted", not schema_errors(pool, good), schema_errors(pool, good))
    edge = {"spec": {"ipv4": {"cidrs": ["0.0.0.0/0"], "maskSize": 32}, "ipv6": {"cidrs": ["::/0"], "maskSize": 128}}}
    check("pool with maskSize 32 (v4) and 128 (v6) is accepted", not schema_errors(pool, edge), schema_errors(pool, edge))

    def broken(mutate):
        o = copy.deepcopy(good)
        mutate(o["spec"])
        return o

    negatives = {
        "maskSize 0 (v4)": broken(lambda s: s["ipv4"].update(maskSize=0)),
        "maskSize 33 (v4)": broken(lambda s: s["ipv4"].update(maskSize=33)),
        "maskSize 129 (v6)": broken(lambda s: s["ipv6"].update(maskSize=129)),
        "maskSize 0 (v6)": broken(lambda s: s["ipv6"].update(maskSize=0)),
        "maskSize as a string": broken(lambda s: s["ipv4"].update(maskSize="24")),
        "CIDR 10.0.0.0/33": broken(lambda s: s["ipv4"].update(cidrs=["10.0.0.0/33"])),
        "CIDR 300.0.0.0/8": broken(lambda s: s["ipv4"].update(cidrs=["300.0.0.0/8"])),
        "CIDR without a prefix": broken(lambda s: s["ipv4"].update(cidrs=["10.0.0.0"])),
        "IPv6 CIDR in ipv4": broken(lambda s: s["ipv4"].update(cidrs=["fd00::/104"])),
        "IPv4 CIDR in ipv6": broken(lambda s: s["ipv6"].update(cidrs=["10.0.0.0/8"])),
        "IPv6 prefix /129": broken(lambda s: s["ipv6"].update(cidrs=["fd00::/129"])),
        "empty cidrs": broken(lambda s: s["ipv4"].update(cidrs=[])),
        "no maskSize": broken(lambda s: s["ipv4"].pop("maskSize")),
        "unknown field (maskSie)": broken(lambda s: s["ipv4"].update(maskSie=24)),
    }
    for what, obj in negatives.items():
        check(f"IPPool with {what} is rejected by the CRD schema", bool(schema_errors(pool, obj)), "accepted")

    print(f"check-manifests: {passed} passed, {len(failed)} failed")
    if failed:
        print("failed: " + "; ".join(failed), file=sys.stderr)
        sys.exit(1)


def load_examples(deploy):
    d = os.path.join(deploy, "examples")
    out = []
    for name in sorted(os.listdir(d)):
        if name.endswith((".yaml", ".yml")):
            out += load_all(os.path.join(d, name))
    return out


if __name__ == "__main__":
    main()
