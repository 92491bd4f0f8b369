#!/usr/bin/env python3
"""Runs a real Pod object (read from the API server) as a podman container, doing what the
kubelet, CoreDNS and the Service machinery would do for it in a cluster:

- container name <namespace>_<pod>, hostname = spec.hostname or the pod name;
- DNS (aardvark, on a network the caller created): <hostname>.<subdomain>,
  <hostname>.<subdomain>.<ns>.svc.<domain>, and every Service whose selector matches the pod
  (<svc>, <svc>.<ns>, <svc>.<ns>.svc, <svc>.<ns>.svc.<domain>); the cluster search path;
- env: literal values, downward-API fieldRefs (metadata.name/namespace/uid/labels/annotations,
  spec.serviceAccountName/nodeName), configMapKeyRef, $(VAR) expansion in env and args, and
  KUBERNETES_SERVICE_HOST/PORT;
- volumes: configMap and secret (keys or items), emptyDir (tmpfs with its sizeLimit), persistentVolumeClaim
  (the claim must exist and not be terminating; a host directory per claim object that
  outlives the pod) and projected
  (serviceAccountToken from the TokenRequest API bound to this pod, configMap, downwardAPI) —
  i.e. the kube-api-access volume the ServiceAccount admission plugin adds;
- security context: runAsUser/runAsGroup/fsGroup, runAsNonRoot (checked), readOnlyRootFilesystem,
  capabilities, allowPrivilegeEscalation=false, privileged (refused); memory/CPU limits.

Anything else in the pod spec is refused with an error naming the field, so the test cannot
silently run something other than what the chart asked for.

Usage: kubelet.py run POD_JSON --network NET --state DIR --kube-service HOST:PORT
                    [--cluster-domain cluster.local] [--kubectl kubectl]
Prints the container name. KUBECONFIG must name admin credentials (kubectl is used to read
ConfigMaps and Services and to request the service-account token).
"""

import argparse
import base64
import json
import os
import re
import subprocess
import sys


class PodError(Exception):
    pass


def kubectl(args, kubectl_bin):
    proc = subprocess.run([kubectl_bin, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise PodError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
    return proc.stdout


def field_ref(pod, path):
    meta = pod["metadata"]
    simple = {
        "metadata.name": meta.get("name"),
        "metadata.namespace": meta.get("namespace"),
        "metadata.uid": meta.get("uid"),
        "spec.serviceAccountName": pod["spec"].get("serviceAccountName"),
        "spec.nodeName": pod["spec"].get("nodeName", ""),
    }
    if path in simple:
        return simple[path] or ""
    m = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path)
    if m:
        # A missing label is an empty string, as the kubelet gives it.
        return meta.get(m.group(1), {}).get(m.group(2), "")
    raise PodError(f"pod {meta['name']}: unsupported fieldRef.fieldPath {path!r}")


def expand(value, env):
    """Kubernetes $(VAR) expansion: known variables are replaced, $$ escapes, unknown stay."""

    def sub(m):
        if m.group(0) == "$$":
            return "$"
        name = m.group(1)
        return env[name] if name in env else m.group(0)

    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)", sub, value)


def quantity_bytes(q):
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 10**3, "M": 10**6, "G": 10**9}
    m = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(q))
    if not m or (m.group(2) and m.group(2) not in units):
        raise PodError(f"unsupported memory quantity {q!r}")
    return int(float(m.group(1)) * units.get(m.group(2), 1))


def cpu_cores(q):
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def write_file(path, data, mode, gid):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(data)
    os.chmod(path, mode)
    if gid is not None:
        os.chown(path, 0, gid)


def configmap(ns, name, kubectl_bin, cache):
    key = (ns, name)
    if key not in cache:
        cache[key] = json.loads(kubectl(["-n", ns, "get", "configmap", name, "-o", "json"], kubectl_bin))
    return cache[key].get("data", {})


def project_configmap(src, ns, root, default_mode, gid, kubectl_bin, cache, pod_name):
    data = configmap(ns, src["name"], kubectl_bin, cache)
    items = src.get("items") or [{"key": k, "path": k} for k in data]
    for item in items:
        if item["key"] not in data:
            raise PodError(f"pod {pod_name}: ConfigMap {src['name']} has no key {item['key']!r}")
        write_file(os.path.join(root, item["path"]), data[item["key"]], item.get("mode", default_mode), gid)


def volumes(pod, state, args, gid):
    """Returns {volume name: podman mount spec builder}."""
    ns = pod["metadata"]["namespace"]
    name = pod["metadata"]["name"]
    cache = {}
    result = {}
    for vol in pod["spec"].get("volumes", []):
        vname = vol["name"]
        root = os.path.join(state, "volumes", vname)
        if "configMap" in vol:
            src = vol["configMap"]
            project_configmap(src, ns, root, src.get("defaultMode", 0o644), gid, args.kubectl, cache, name)
            result[vname] = ("bind", root)
        elif "secret" in vol:
            src = vol["secret"]
            secret = json.loads(kubectl(["-n", ns, "get", "secret", src["secretName"], "-o", "json"], args.kubectl))
            data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
            items = src.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                if item["key"] not in data:
                    raise PodError(f"pod {name}: Secret {src['secretName']} has no key {item['key']!r}")
                write_file(os.path.join(root, item["path"]), data[item["key"]],
                           item.get("mode", src.get("defaultMode", 0o644)), gid)
            result[vname] = ("bind", root)
        elif "emptyDir" in vol:
            ed = vol["emptyDir"]
            if ed.get("medium") not in (None, "", "Memory"):
                raise PodError(f"pod {name}: emptyDir {vname}: unsupported medium {ed['medium']!r}")
            size = quantity_bytes(ed["sizeLimit"]) if ed.get("sizeLimit") else None
            result[vname] = ("tmpfs", size)
        elif "projected" in vol:
            proj = vol["projected"]
            mode = proj.get("defaultMode", 0o644)
            for src in proj.get("sources", []):
                if "serviceAccountToken" in src:
                    sat = src["serviceAccountToken"]
                    cmd = ["-n", ns, "create", "token", pod["spec"]["serviceAccountName"],
                           "--bound-object-kind", "Pod", "--bound-object-name", name,
                           "--bound-object-uid", pod["metadata"]["uid"],
                           "--duration", f"{sat.get('expirationSeconds', 3600)}s"]
                    if sat.get("audience"):
                        cmd += ["--audience", sat["audience"]]
                    token = kubectl(cmd, args.kubectl).strip()
                    # Readable by the pod's fsGroup only, as the kubelet does with fsGroup set.
                    write_file(os.path.join(root, sat["path"]), token, 0o640 if gid is not None else 0o600, gid)
                elif "configMap" in src:
                    project_configmap(src["configMap"], ns, root, mode, gid, args.kubectl, cache, name)
                elif "downwardAPI" in src:
                    for item in src["downwardAPI"].get("items", []):
                        if "fieldRef" not in item:
                            raise PodError(f"pod {name}: volume {vname}: only fieldRef downwardAPI items are supported")
                        value = field_ref(pod, item["fieldRef"]["fieldPath"])
                        write_file(os.path.join(root, item["path"]), value, item.get("mode", mode), gid)
                else:
                    raise PodError(f"pod {name}: volume {vname}: unsupported projected source {sorted(src)}")
            result[vname] = ("bind", root)
        elif "persistentVolumeClaim" in vol:
            # The claim must exist (the StatefulSet controller creates it from
            # volumeClaimTemplates); its "volume" is a host directory per claim object (name and
            # uid) that outlives the pod: a pod recreated under the same name gets its data
            # back, and a claim deleted and made again is a new, empty volume, as a
            # provisioner's new PersistentVolume would be.
            claim = vol["persistentVolumeClaim"]["claimName"]
            meta = json.loads(kubectl(["-n", ns, "get", "persistentvolumeclaim", claim, "-o", "json"], args.kubectl))["metadata"]
            if meta.get("deletionTimestamp"):
                # The kubelet does not start a pod on a claim being deleted (the pod stays Pending).
                raise PodError(f"pod {name}: volume {vname}: claim {claim} is being deleted")
            path = os.path.join(os.path.dirname(state), "..", "claims", f"{ns}_{claim}_{meta['uid']}")
            path = os.path.normpath(path)
            os.makedirs(path, exist_ok=True)
            if gid is not None:
                # What the kubelet does for fsGroup: group-owned, group-writable, setgid.
                os.chown(path, 0, gid)
                os.chmod(path, 0o2775)
            result[vname] = ("bind", path)
        else:
            raise PodError(f"pod {name}: volume {vname}: unsupported volume type {sorted(vol)}")
    return result


def service_aliases(pod, domain, kubectl_bin):
    ns = pod["metadata"]["namespace"]
    labels = pod["metadata"].get("labels", {})
    services = json.loads(kubectl(["-n", ns, "get", "services", "-o", "json"], kubectl_bin))["items"]
    aliases = []
    for svc in services:
        selector = svc["spec"].get("selector") or {}
        if selector and all(labels.get(k) == v for k, v in selector.items()):
            s = svc["metadata"]["name"]
            aliases += [s, f"{s}.{ns}", f"{s}.{ns}.svc", f"{s}.{ns}.svc.{domain}"]
    return aliases


def run(args):
    with open(args.pod) as f:
        pod = json.load(f)
    meta, spec = pod["metadata"], pod["spec"]
    name, ns = meta["name"], meta["namespace"]
    if spec.get("initContainers"):
        raise PodError(f"pod {name}: initContainers are not supported")
    if len(spec["containers"]) != 1:
        raise PodError(f"pod {name}: exactly one container is supported, found {len(spec['containers'])}")
    c = spec["containers"][0]
    psc = spec.get("securityContext", {})
    csc = c.get("securityContext", {})
    sc = {**psc, **csc}
    uid, gid, fs_group = sc.get("runAsUser"), sc.get("runAsGroup"), psc.get("fsGroup")
    if sc.get("runAsNonRoot") and (uid is None or uid == 0):
        raise PodError(f"pod {name}: runAsNonRoot with runAsUser {uid!r}: the kubelet would refuse to start it")
    if sc.get("privileged"):
        raise PodError(f"pod {name}: privileged containers are refused here")

    state = os.path.join(args.state, f"{ns}_{name}")
    subprocess.run(["rm", "-rf", state], check=True)
    os.makedirs(state)
    vols = volumes(pod, state, args, fs_group)

    host, port = args.kube_service.rsplit(":", 1)
    # The kubelet always sets these (even with enableServiceLinks: false).
    env = {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": port, "KUBERNETES_SERVICE_PORT_HTTPS": port}
    order = list(env)
    for e in c.get("env", []):
        if "value" in e:
            value = expand(e["value"], env)
        elif "fieldRef" in e.get("valueFrom", {}):
            value = field_ref(pod, e["valueFrom"]["fieldRef"]["fieldPath"])
        elif "configMapKeyRef" in e.get("valueFrom", {}):
            ref = e["valueFrom"]["configMapKeyRef"]
            value = configmap(ns, ref["name"], args.kubectl, {}).get(ref["key"])
            if value is None:
                raise PodError(f"pod {name}: env {e['name']}: ConfigMap {ref['name']} has no key {ref['key']!r}")
        elif "valueFrom" not in e:
            value = ""
        else:
            raise PodError(f"pod {name}: env {e['name']}: unsupported valueFrom {sorted(e['valueFrom'])}")
        if e["name"] not in env:
            order.append(e["name"])
        env[e["name"]] = value
    if c.get("envFrom"):
        raise PodError(f"pod {name}: envFrom is not supported")

    cname = f"{ns}_{name}"
    hostname = spec.get("hostname", name)
    cmd = ["podman", "run", "-d", "--name", cname, "--hostname", hostname, "--network", args.network,
           "--pull", "never", "--label", f"distbank-e2e={ns}",
           "--stop-timeout", str(spec.get("terminationGracePeriodSeconds", 30)),
           "--dns-search", f"{ns}.svc.{args.cluster_domain}", "--dns-search", f"svc.{args.cluster_domain}",
           "--dns-search", args.cluster_domain, "--dns-option", "ndots:5"]
    aliases = []
    if spec.get("subdomain"):
        sub = spec["subdomain"]
        aliases += [f"{hostname}.{sub}", f"{hostname}.{sub}.{ns}", f"{hostname}.{sub}.{ns}.svc",
                    f"{hostname}.{sub}.{ns}.svc.{args.cluster_domain}"]
    aliases += service_aliases(pod, args.cluster_domain, args.kubectl)
    for a in aliases:
        cmd += ["--network-alias", a]
    if uid is not None:
        cmd += ["--user", f"{uid}:{gid if gid is not None else uid}"]
    if fs_group is not None:
        cmd += ["--group-add", str(fs_group)]
    if sc.get("readOnlyRootFilesystem"):
        cmd += ["--read-only", "--read-only-tmpfs=false"]
    caps = sc.get("capabilities", {})
    for cap in caps.get("drop", []):
        cmd += ["--cap-drop", cap.lower() if cap == "ALL" else cap]
    for cap in caps.get("add", []):
        cmd += ["--cap-add", cap]
    if sc.get("allowPrivilegeEscalation") is False:
        cmd += ["--security-opt", "no-new-privileges"]
    limits = c.get("resources", {}).get("limits", {})
    if "memory" in limits and not args.no_limits:
        cmd += ["--memory", str(quantity_bytes(limits["memory"]))]
    if "cpu" in limits and not args.no_limits:
        cmd += ["--cpus", f"{cpu_cores(limits['cpu']):g}"]
    for m in c.get("volumeMounts", []):
        if m["name"] not in vols:
            raise PodError(f"pod {name}: volumeMount {m['name']} names no volume")
        if m.get("subPath"):
            raise PodError(f"pod {name}: volumeMount {m['name']}: subPath is not supported")
        kind, src = vols[m["name"]]
        if kind == "bind":
            cmd += ["-v", f"{src}:{m['mountPath']}:{'ro' if m.get('readOnly') else 'rw'}"]
        else:
            opts = f"type=tmpfs,destination={m['mountPath']},tmpfs-mode=1777"
            if src:
                opts += f",tmpfs-size={src}"
            cmd += ["--mount", opts]
    for k in order:
        cmd += ["-e", f"{k}={env[k]}"]
    if c.get("command"):
        cmd += ["--entrypoint", json.dumps([expand(x, env) for x in c["command"]])]
    cmd.append(c["image"])
    cmd += [expand(a, env) for a in c.get("args", [])]
    with open(os.path.join(state, "podman-run.json"), "w") as f:
        json.dump(cmd, f, indent=1)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise PodError(f"pod {name}: podman run failed: {proc.stderr.strip()}")
    print(cname)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("pod")
    r.add_argument("--network", required=True)
    r.add_argument("--state", required=True)
    r.add_argument("--kube-service", required=True)
    r.add_argument("--cluster-domain", default="cluster.local")
    r.add_argument("--kubectl", default="kubectl")
    r.add_argument("--no-limits", action="store_true", help="do not apply memory/CPU limits")
    args = p.parse_args()
    try:
        run(args)
    except PodError as e:
        print(f"kubelet.py: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
