#!/usr/bin/env python3
"""Checks the compose files without Docker (Docker cannot run on the CI machine).

- every file parses as YAML (PyYAML, merge keys included);
- every environment variable given to a provisioner service (built from this
  repository) or set by the Dockerfile's ENV is one the service reads: a variable of
  src/config/source.rs (ENV_KEYS, ENV_INTEGER_KEYS) or one read with env::var in
  src/ — and is documented in README's configuration table, so a misspelt name
  cannot silently fall back to a default;
- every service that keeps running has an enabled health check; `depends_on` names
  services that exist (in the file, or in compose.yaml for an override file) with a
  condition compose knows, and a provisioner service waits for `migrate`;
- the image defaults to production (the Dockerfile's ENV sets
  PROVISIONER_ENV=production), every provisioner service of compose.yaml says which
  environment it runs in, and one that runs in development (with the development
  secrets) publishes its ports on 127.0.0.1 only.

Usage: .ci/compose-check.py [FILE...]   (default: compose.yaml compose.cluster.yaml)
"""

import pathlib
import re
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
CONDITIONS = {"service_started", "service_healthy", "service_completed_successfully"}


def variables_read():
    """Environment variables the service reads, from its source."""
    names = set()
    source = (ROOT / "src/config/source.rs").read_text()
    for block in re.findall(r"const ENV_(?:INTEGER_)?KEYS[^=]*=\s*\[(.*?)\];", source, re.S):
        names.update(re.findall(r'\(\s*"([A-Z][A-Z0-9_]*)"\s*,', block))
    for path in (ROOT / "src").rglob("*.rs"):
        if "src/bin/" in path.as_posix():
            continue  # the load tools, not the service
        names.update(re.findall(r'env::var(?:_os)?\(\s*"([A-Z][A-Z0-9_]*)"\s*\)', path.read_text()))
    if len(names) < 5:
        sys.exit(f"compose-check: found only {sorted(names)} in src/: has the config moved?")
    return names


def documented():
    readme = (ROOT / "README.md").read_text()
    return set(re.findall(r"`([A-Z][A-Z0-9_]{2,})`", readme))


def is_provisioner(service):
    return "build" in service or str(service.get("image", "")).startswith("callmine-provisioner")


def env_names(environment):
    if isinstance(environment, dict):
        return set(environment)
    return {item.split("=", 1)[0] for item in environment or []}


def main(files):
    errors = []
    read, docs = variables_read(), documented()

    def check_vars(where, names):
        for name in sorted(names):
            if name not in read:
                errors.append(f"{where}: {name} is not a variable the service reads")
            elif name not in docs:
                errors.append(f"{where}: {name} is not in README's configuration table")

    dockerfile = (ROOT / "Dockerfile").read_text()
    env_lines = re.findall(r"^ENV\s+((?:.*\\\n)*.*)$", dockerfile, re.M)
    check_vars("Dockerfile ENV", {m for line in env_lines for m in re.findall(r"([A-Z][A-Z0-9_]*)=", line)})

    image_env = {m[0]: m[1] for line in env_lines for m in re.findall(r"([A-Z][A-Z0-9_]*)=(\S+)", line)}
    if image_env.get("PROVISIONER_ENV") != "production":
        errors.append("Dockerfile ENV: PROVISIONER_ENV must default to production")

    base = yaml.safe_load((ROOT / "compose.yaml").read_text())["services"]
    for name, service in base.items():
        if not is_provisioner(service):
            continue
        environment = service.get("environment") or {}
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment if "=" in item)
        if "PROVISIONER_ENV" not in environment:
            errors.append(f"compose.yaml: service {name}: set PROVISIONER_ENV (the image defaults to production)")
        elif environment["PROVISIONER_ENV"] == "development":
            for port in service.get("ports") or []:
                if not str(port).startswith("127.0.0.1:"):
                    errors.append(f"compose.yaml: service {name}: development secrets on a port open beyond 127.0.0.1 ({port})")
    for file in files:
        doc = yaml.safe_load((ROOT / file).read_text())
        services = doc.get("services") or {}
        known = set(services) | set(base)
        for name, service in services.items():
            where = f"{file}: service {name}"
            merged = {**base.get(name, {}), **service}
            if is_provisioner(merged):
                check_vars(where, env_names(service.get("environment")))
            one_shot = merged.get("restart") == "no"
            health = merged.get("healthcheck") or {}
            if not one_shot and (not health.get("test") or health.get("disable")):
                errors.append(f"{where}: keeps running but has no health check")
            depends = service.get("depends_on") or {}
            for dep, spec in (depends.items() if isinstance(depends, dict) else []):
                if dep not in known:
                    errors.append(f"{where}: depends on unknown service {dep}")
                if (spec or {}).get("condition") not in CONDITIONS:
                    errors.append(f"{where}: depends_on {dep} without a known condition")
            if name in base and is_provisioner(merged) and name != "migrate" and pathlib.Path(file).name == "compose.yaml":
                if (merged.get("depends_on") or {}).get("migrate", {}).get("condition") != "service_completed_successfully":
                    errors.append(f"{where}: does not wait for migrate to complete")
    for error in errors:
        print(f"compose-check: {error}", file=sys.stderr)
    if errors:
        sys.exit(1)
    print(f"compose files ok: {', '.join(files)} ({len(read)} variables read by the service)")


if __name__ == "__main__":
    main(sys.argv[1:] or ["compose.yaml", "compose.cluster.yaml"])
