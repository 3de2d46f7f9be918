"""deploy/ checked by machines, not by eye (no network, no Ray cluster, a few seconds):

* deploy/cluster.yaml against the cluster-launcher JSON schema of the installed Ray
  (ray/autoscaler/ray-schema.json, the schema `ray up` itself validates with);
* deploy/rayjob.yaml against KubeRay's RayJob CRD schema (served version v1), vendored in
  tests/schemas/ (see tests/schemas/README.md), turned from OpenAPI v3 into JSON Schema here;
* every `ray job` command in deploy/README.md, deploy/submit_examples.sh and the comments of
  deploy/cluster.yaml sets RAY_AUTH_MODE=token; every one that runs the orchestrator puts the
  experiment in `store.uri`; and every `python -m orchestrator ...` / `datamodels ...` there
  and in rayjob.yaml's entrypoint parses with Hydra's own argument parser and composes
  against conf/ (each point of a -m sweep), so a misspelled key or group fails here;
* deploy/Dockerfile.dockerignore: the build context it implies (Docker's matching rules,
  implemented here) holds what the Dockerfile copies and no run outputs at any depth;
* constraints.txt (the lock) is what the Makefile and the Dockerfile install from, and
  pyproject.toml's lower bounds are its versions; every apt-get waits for apt's lock;
* `make test`, .ci/run and the tests leave PYTHONPATH alone: the entry points are tested as
  installed, not through the repository on the import path.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import re
import shutil
import subprocess
import tomllib

import jsonschema
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEPLOY = os.path.join(REPO, "deploy")
CONF = os.path.join(REPO, "conf")
RAYJOB_CRD_SCHEMA = os.path.join(REPO, "tests", "schemas", "kuberay-rayjob-crd-v1.7.0.json")


def read(name: str) -> str:
    with open(os.path.join(DEPLOY, name), encoding="utf-8") as f:
        return f.read()


# ----------------------------------------------------------------------------- Ray cluster launcher
def ray_cluster_schema() -> dict:
    import ray.autoscaler
    path = os.path.join(os.path.dirname(ray.autoscaler.__file__), "ray-schema.json")
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def schema_errors(schema: dict, doc, check_schema: bool = False) -> list[str]:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    if check_schema:                    # the schema itself is valid JSON Schema (slow for the CRD)
        cls.check_schema(schema)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(cls(schema).iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


def test_cluster_yaml_matches_rays_schema():
    errors = schema_errors(ray_cluster_schema(), yaml.safe_load(read("cluster.yaml")), check_schema=True)
    assert not errors, "deploy/cluster.yaml:\n" + "\n".join(errors)


@pytest.mark.parametrize("path,value", [
    (["max_workers"], "20"),                                          # integer as a string
    (["idle_timeout_minutes"], "ten"),
    (["docker", "run_options"], "--ulimit nofile=65536:65536"),       # a string, not a list
    (["available_node_types", "head", "resources", "CPU"], -1),       # minimum 0
    (["available_node_types", "gpu_g5", "min_worker"], 0),            # unknown key in a node type
    (["setup_commands"], [["pip", "install"]]),                       # list of lists
    (["max_worker"], 20),                                             # unknown key
])
def test_cluster_yaml_schema_rejects_a_broken_copy(path, value):
    doc = yaml.safe_load(read("cluster.yaml"))
    node = doc
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    assert schema_errors(ray_cluster_schema(), doc)


# ----------------------------------------------------------------------------- KubeRay RayJob
def openapi_to_json_schema(node, strict: bool = True):
    """A Kubernetes structural (OpenAPI v3) schema as JSON Schema (draft 7).

    `x-kubernetes-*` keys are dropped (list/map types, CEL rules: the API server's business),
    except `x-kubernetes-int-or-string` (an integer or a string) and
    `x-kubernetes-preserve-unknown-fields` (any field allowed). `nullable: true` adds null to
    the type (and to an enum). `format` (int32, date-time, ...) is left as an annotation.
    With `strict`, an object that lists its `properties` admits no others, as `kubectl
    apply` with its default (strict) field validation rejects unknown fields. Stricter than
    the API server in one way: a null where the schema does not say nullable is an error
    here (the server drops it), which in a hand-written manifest is a mistake anyway."""
    if isinstance(node, list):
        return [openapi_to_json_schema(x, strict) for x in node]
    if not isinstance(node, dict):
        return node
    out = {}
    for key, value in node.items():
        if key.startswith("x-kubernetes-") or key == "nullable":
            continue
        if key == "properties":
            out[key] = {name: openapi_to_json_schema(sub, strict) for name, sub in value.items()}
        elif key in ("enum", "default", "required", "example"):
            out[key] = value
        else:
            out[key] = openapi_to_json_schema(value, strict)
    if node.get("x-kubernetes-int-or-string"):
        out.pop("anyOf", None)
        out["type"] = ["integer", "string"]
    if node.get("nullable"):
        if "type" in out:
            out["type"] = (out["type"] if isinstance(out["type"], list) else [out["type"]]) + ["null"]
        if "enum" in out:
            out["enum"] = list(out["enum"]) + [None]
    if (strict and "properties" in out and "additionalProperties" not in out
            and not node.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=1)
def rayjob_schema() -> dict:
    with open(RAYJOB_CRD_SCHEMA, encoding="utf-8") as f:
        schema = openapi_to_json_schema(json.load(f))
    schema["$schema"] = "http://json-schema.org/draft-07/schema#"
    return schema


def test_openapi_conversion():
    s = openapi_to_json_schema({
        "type": "object",
        "properties": {
            "q": {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True},
            "t": {"type": "string", "nullable": True, "format": "date-time"},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"a": {"type": "integer"}}},
            "m": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "x-kubernetes-validations": [{"rule": "self.q > 0"}],
    })
    assert not schema_errors(s, {"q": 1, "t": None, "free": {"a": 1, "b": 2}, "m": {"k": "v"}}, check_schema=True)
    assert not schema_errors(s, {"q": "500m"})
    assert schema_errors(s, {"q": 1.5})
    assert schema_errors(s, {"m": {"k": 1}})
    assert schema_errors(s, {"qq": 1})                  # unknown field
    assert schema_errors(s, {"free": {"a": "x"}})


def test_rayjob_yaml_matches_kuberay_crd():
    doc = yaml.safe_load(read("rayjob.yaml"))
    assert (doc["apiVersion"], doc["kind"]) == ("ray.io/v1", "RayJob")
    errors = schema_errors(rayjob_schema(), doc, check_schema=True)
    assert not errors, "deploy/rayjob.yaml:\n" + "\n".join(errors)


def _set(doc, path: str, value):
    keys = [int(k) if k.isdigit() else k for k in path.split(".")]
    node = doc
    for key in keys[:-1]:
        node = node[key]
    node[keys[-1]] = value


@pytest.mark.parametrize("path,value", [
    ("spec.shutdownAfterJobFinishes", "yes"),                                     # boolean
    ("spec.ttlSecondsAfterFinished", "600"),                                      # integer
    ("spec.rayClusterSpec.authOptions.mode", "tokens"),                           # enum
    ("spec.rayClusterSpec.workerGroupSpecs.0.replicas", "8"),
    ("spec.rayClusterSpec.headGroupSpec.rayStartParams.num-cpus", 0),             # map of strings
    ("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.cpu", [6]),
    ("spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0.imagePullPolice", "Always"),
    ("spec.shutdownAfterJobFinish", True),                                        # unknown field
])
def test_rayjob_schema_rejects_a_broken_copy(path, value):
    doc = yaml.safe_load(read("rayjob.yaml"))
    _set(doc, path, value)
    assert schema_errors(rayjob_schema(), doc)


# ----------------------------------------------------------------------------- commands in the docs
class ShellSyntax(ValueError):
    pass


_VAR = re.compile(r"\$(?:\{([A-Za-z_]\w*)\}|([A-Za-z_]\w*))")


def shell_commands(line: str, env: dict) -> list[list[str]]:
    """The simple commands of one logical shell line as bash would run them: quotes removed,
    $NAME / ${NAME} taken from `env` (an unquoted one split on blanks), a comment dropped,
    split at unquoted ; & | && ||. Anything fancier ($(...), backquotes, an unset
    variable) is ShellSyntax."""
    commands, words = [], []
    word, in_word = "", False
    i, n = 0, len(line)

    def expand(at: int) -> tuple[str, int]:
        m = _VAR.match(line, at)
        if not m:
            if line[at + 1:at + 2] in ("(", "{"):
                raise ShellSyntax(f"unsupported expansion in: {line.strip()}")
            return "$", at + 1
        name = m.group(1) or m.group(2)
        if name not in env:
            raise ShellSyntax(f"${name} is not set before: {line.strip()}")
        return env[name], m.end()

    while i < n:
        c = line[i]
        if c in " \t\n":
            if in_word:
                words.append(word)
            word, in_word = "", False
            i += 1
        elif c == "#" and not in_word:
            break
        elif c in ";&|":
            if in_word:
                words.append(word)
            word, in_word = "", False
            if words:
                commands.append(words)
            words = []
            i += 2 if line[i:i + 2] in ("&&", "||") else 1
        elif c == "\\":
            word, in_word, i = word + line[i + 1:i + 2], True, i + 2
        elif c == "'":
            j = line.find("'", i + 1)
            if j < 0:
                raise ShellSyntax(f"unterminated ' in: {line.strip()}")
            word, in_word, i = word + line[i + 1:j], True, j + 1
        elif c == '"':
            i += 1
            in_word = True
            while True:
                if i >= n:
                    raise ShellSyntax(f'unterminated " in: {line.strip()}')
                c = line[i]
                if c == '"':
                    i += 1
                    break
                if c == "\\" and line[i + 1:i + 2] in ('"', "\\", "$", "`"):
                    word, i = word + line[i + 1], i + 2
                elif c == "$":
                    value, i = expand(i)
                    word += value
                elif c == "`":
                    raise ShellSyntax(f"backquotes in: {line.strip()}")
                else:
                    word, i = word + c, i + 1
        elif c == "$":
            value, i = expand(i)
            parts = value.split()
            if value[:1].isspace() and in_word:
                words.append(word)
                word, in_word = "", False
            for k, part in enumerate(parts):
                if k:
                    words.append(word)
                    word = ""
                word, in_word = word + part, True
            if value[-1:].isspace() and in_word:
                words.append(word)
                word, in_word = "", False
        elif c == "`":
            raise ShellSyntax(f"backquotes in: {line.strip()}")
        else:
            word, in_word, i = word + c, True, i + 1
    if in_word:
        words.append(word)
    if words:
        commands.append(words)
    return commands


ASSIGNMENT = re.compile(r"^[A-Za-z_]\w*=")
RELEVANT = re.compile(r"ray\s+job\b|\borchestrator\b|^\s*(?:[A-Za-z_]\w*=\S*\s+)*datamodels\s")
STARTS_AS_COMMAND = re.compile(r"^\s*(?:[A-Za-z_]\w*=\S*\s+)*(?:ray\s+job\b|python3?\s+-m\s+orchestrator\b"
                               r"|datamodels(?:\s+(?:-\S+|[+~]*[\w.]+=)|\s*$))")


def logical_lines(text: str) -> list[str]:
    return text.replace("\\\n", " ").splitlines()


def commands_in_shell(text: str, where: str, only_line_starts: bool = False) -> list[dict]:
    """Every simple command of a shell text that concerns the orchestrator or `ray job`:
    {"where", "env" (its NAME=value prefixes), "argv"}. Shell variables set in the text
    (NAME=..., export NAME=...) are expanded; nothing comes from the environment."""
    env: dict[str, str] = {}
    found = []
    for line in logical_lines(text):
        if only_line_starts and not STARTS_AS_COMMAND.match(line):
            continue
        try:
            cmds = shell_commands(line, env)
        except ShellSyntax:
            if only_line_starts or RELEVANT.search(line.split("#", 1)[0]):
                raise
            continue
        for words in cmds:
            if words[0] == "export":
                words = words[1:]
            prefix = list(itertools.takewhile(ASSIGNMENT.match, words))
            argv = words[len(prefix):]
            pairs = dict(p.split("=", 1) for p in prefix)
            if not argv:
                env.update(pairs)
                continue
            found.append({"where": f"{where}: {' '.join(words)[:160]}", "env": pairs, "argv": argv})
    return [c for c in found if orchestrator_args(c["argv"]) is not None
            or c["argv"][:2] == ["ray", "job"]]


def orchestrator_args(argv: list[str]) -> list[str] | None:
    """The arguments after `python -m orchestrator` / `datamodels` in argv, or None."""
    if argv and os.path.basename(argv[0]) == "datamodels":
        return argv[1:]
    for k in range(len(argv) - 2):
        python = re.fullmatch(r"python(3(\.\d+)?)?", os.path.basename(argv[k]))
        if python and argv[k + 1:k + 3] == ["-m", "orchestrator"]:
            return argv[k + 3:]
    return None


def markdown_code(text: str) -> str:
    return "\n".join(re.findall(r"^```[\w-]*\n(.*?)^```", text, flags=re.S | re.M))


def yaml_comments(text: str) -> str:
    return "\n".join(ln.strip()[1:] for ln in text.splitlines() if ln.strip().startswith("#"))


def deploy_commands(files: dict[str, str] | None = None) -> list[dict]:
    files = files or {name: read(name) for name in ("README.md", "submit_examples.sh", "cluster.yaml", "rayjob.yaml")}
    cmds = commands_in_shell(markdown_code(files["README.md"]), "deploy/README.md")
    cmds += commands_in_shell(files["submit_examples.sh"], "deploy/submit_examples.sh")
    for name in ("cluster.yaml", "rayjob.yaml"):
        cmds += commands_in_shell(yaml_comments(files[name]), f"deploy/{name} (comment)", only_line_starts=True)
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as f:   # the project README's cluster jobs
        top = commands_in_shell(markdown_code(f.read()), "README.md")
    cmds += [c for c in top if c["argv"][:3] == ["ray", "job", "submit"]]
    entrypoint = yaml.safe_load(files["rayjob.yaml"])["spec"]["entrypoint"]
    cmds += [{"where": f"deploy/rayjob.yaml spec.entrypoint: {entrypoint}", "env": {}, "argv": argv,
              "entrypoint": True} for argv in shell_commands(entrypoint, {})]
    return cmds


@functools.cache
def _compose_errors(args: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(compose_errors(list(args)))


def compose_errors(args: list[str]) -> list[str]:
    """Hydra's parse of the orchestrator's arguments, then every sweep point composed
    against conf/ with interpolations resolved; one message per failure."""
    from hydra import compose, initialize_config_dir
    from hydra._internal.utils import get_args_parser
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    import orchestrator.settings.schema  # noqa: F401  (registers the structured configs)
    try:
        parsed = get_args_parser().parse_args(args)
    except SystemExit:
        return [f"Hydra cannot parse the arguments {args}"]
    flags = [f for f in ("cfg", "resolve", "info", "shell_completion", "config_path", "config_dir",
                         "config_name", "experimental_rerun", "package") if getattr(parsed, f, None)]
    if flags:
        return [f"unexpected Hydra flags {flags}"]
    try:
        overrides = OverridesParser.create().parse_overrides(parsed.overrides)
    except Exception as err:  # noqa: BLE001 - Hydra's OverrideParseException and friends
        return [f"{str(err).splitlines()[0]}"]
    if any(o.is_sweep_override() for o in overrides) and not parsed.multirun:
        return ["a sweep override (a,b) without -m"]
    axes = [[f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()] if o.is_sweep_override()
            else [o.input_line] for o in overrides]
    errors = []
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=CONF, version_base="1.3"):
            for point in itertools.product(*axes):
                try:
                    cfg = compose("config", overrides=list(point))
                    OmegaConf.to_container(cfg, resolve=True)
                except Exception as err:  # noqa: BLE001 - composition errors come in many types
                    errors.append(f"{list(point)}: {type(err).__name__}: {str(err).splitlines()[0]}")
    finally:
        GlobalHydra.instance().clear()
    return errors


def command_problems(cmds: list[dict]) -> list[str]:
    problems = []
    for cmd in cmds:
        argv, where = cmd["argv"], cmd["where"]
        args = orchestrator_args(argv)
        keys = {a.split("=", 1)[0].lstrip("+~"): a.split("=", 1)[1] for a in args or [] if "=" in a}
        joins = keys.get("cluster.address", "null") not in ("null", "", "local", "auto")  # Ray Client
        if (argv[:2] == ["ray", "job"] or joins) and cmd["env"].get("RAY_AUTH_MODE") != "token":
            problems.append(f"{where}\n    -> not prefixed with RAY_AUTH_MODE=token")
        if args is None:
            continue
        if any(k.startswith("ledger.") for k in keys):
            problems.append(f"{where}\n    -> ledger.* no longer exists: set store.uri")
        remote = argv[:3] == ["ray", "job", "submit"] or cmd.get("entrypoint")
        if remote and keys.get("store.uri") in (None, "", "null"):
            problems.append(f"{where}\n    -> a job on a cluster must set store.uri")
        problems += [f"{where}\n    -> {e}" for e in _compose_errors(tuple(args))]
    return problems


def test_every_command_in_deploy_sets_auth_uses_store_uri_and_composes():
    cmds = deploy_commands()
    submits = [c for c in cmds if c["argv"][:3] == ["ray", "job", "submit"]]
    by_file = {w: [c for c in submits if c["where"].startswith(w)]
               for w in ("deploy/README.md", "deploy/submit_examples.sh", "deploy/cluster.yaml", "README.md")}
    assert all(by_file.values()), f"no `ray job submit` found in some file: {by_file}"
    assert all(orchestrator_args(c["argv"]) is not None for c in submits)
    assert any(c.get("entrypoint") for c in cmds)
    problems = command_problems(cmds)
    assert not problems, "\n".join(problems)


def test_no_ledger_path_left_in_deploy():
    for name in sorted(os.listdir(DEPLOY)):
        text = read(name)
        assert "ledger.path" not in text, f"deploy/{name} still mentions ledger.path"


def test_shell_scanner():
    env = {"COMMON": "task=x  store.uri=s3://b/p", "HEAD": "localhost"}
    assert shell_commands("RAY_AUTH_MODE=token ray job submit --address \"http://$HEAD:8265\" -- "
                          "python -m orchestrator $COMMON stage=fit 'a=${masks.alpha}'  # note", env) == [
        ["RAY_AUTH_MODE=token", "ray", "job", "submit", "--address", "http://localhost:8265", "--",
         "python", "-m", "orchestrator", "task=x", "store.uri=s3://b/p", "stage=fit", "a=${masks.alpha}"]]
    assert shell_commands("ray dashboard c.yaml &  # bg", env) == [["ray", "dashboard", "c.yaml"]]
    assert shell_commands("a && b; c", env) == [["a"], ["b"], ["c"]]
    with pytest.raises(ShellSyntax):
        shell_commands("python -m orchestrator $COMMONS", env)
    with pytest.raises(ShellSyntax):
        shell_commands("X=$(kubectl get secret)", env)


@pytest.mark.parametrize("name,old,new", [
    ("submit_examples.sh", "store.uri=$STORE", "store.url=$STORE"),       # misspelled key
    ("submit_examples.sh", "masks.n_train=", "masks.ntrain="),
    ("submit_examples.sh", "train=resnet9_datamodels", "train=resnet9_datamodel"),   # no such option
    ("submit_examples.sh", "RAY_AUTH_MODE=token ray job submit", "ray job submit"),  # no auth
    ("README.md", "RAY_AUTH_MODE=token ray job submit", "RAY_AUTH_MODE=disabled ray job submit"),
    ("README.md", "store.uri=", "ledger.path="),                          # the old key
    ("README.md", "masks.alpha=", "mask.alpha="),
    ("cluster.yaml", "store.uri=", "stor.uri="),
    ("rayjob.yaml", "store.uri=", "store.uri.path="),
    ("rayjob.yaml", "eval.replicas=", "eval.replica="),
])
def test_a_broken_command_is_caught(name, old, new):
    files = {n: read(n) for n in ("README.md", "submit_examples.sh", "cluster.yaml", "rayjob.yaml")}
    assert old in files[name], (name, old)
    files[name] = files[name].replace(old, new, 1)
    assert command_problems(deploy_commands(files))


@pytest.mark.parametrize("args", [
    ["store.ur=s3://b/d"],                                           # misspelled key
    ["task=cifar10_resnet"],                                         # no such config
    ["ledger.path=s3://b/d"],                                        # the old key
    ["store.uri=s3://b/d?endpoint_override=h:9000&scheme=http"],     # Hydra wants it quoted
    ["masks.alpha=0.25,0.5"],                                        # a sweep without -m
    ["-m", "masks.alpha=0.25,0.5", "masks.n_trian=10"],              # a typo in a sweep
    ["--cfg", "job"],                                                # prints, runs nothing
    ["store.uri=s3://b/${mask.alpha}"],                              # a broken interpolation
])
def test_compose_errors_catch_mistakes(args):
    assert compose_errors(args)


def test_compose_accepts_a_sweep_and_an_endpoint_query():
    assert not compose_errors(["-m", "task=digits_mlp", "masks.alpha=0.25,0.5",
                               "store.uri='s3://b/d?endpoint_override=h:9000&scheme=http'"])


# ----------------------------------------------------------------------------- Docker build context
# Docker's .dockerignore rules (moby/patternmatcher and its ignorefile reader, used by BuildKit):
# a line starting with # is a comment; a pattern is trimmed, cleaned like Go's filepath.Clean
# and loses a leading /; it matches a path relative to the context root with filepath.Match
# syntax (* and ? stop at /), where ** matches any number of directories; a path is excluded
# when it or one of its parent directories matches; the last matching pattern wins, and
# !pattern includes again.
DOCKERFILE = os.path.join(DEPLOY, "Dockerfile")
DOCKERIGNORE = os.path.join(DEPLOY, "Dockerfile.dockerignore")
LOCK = os.path.join(REPO, "constraints.txt")


def go_clean(path: str) -> str:
    """Go's filepath.Clean for slash-separated paths."""
    rooted = path.startswith("/")
    parts: list[str] = []
    for part in path.split("/"):
        if part in ("", "."):
            continue
        if part == "..":
            if parts and parts[-1] != "..":
                parts.pop()
            elif not rooted:
                parts.append("..")
            continue
        parts.append(part)
    out = "/".join(parts)
    return "/" + out if rooted else (out or ".")


def go_dir(path: str) -> str:
    """Go's filepath.Dir: everything before the last slash, cleaned."""
    return go_clean(path[:path.rfind("/") + 1])


def dockerignore_patterns(text: str) -> list[str]:
    """The patterns of a .dockerignore file as Docker reads them."""
    patterns = []
    for n, line in enumerate(text.split("\n")):
        if n == 0:
            line = line.removeprefix("\ufeff")
        if line.startswith("#"):
            continue
        line = line.strip()
        if not line:
            continue
        invert = line.startswith("!")
        if invert:
            line = line[1:].strip()
        if line:
            line = go_clean(line)
            if len(line) > 1 and line.startswith("/"):
                line = line[1:]
        patterns.append("!" + line if invert else line)
    return patterns


class DockerPattern:
    """One pattern compiled the way patternmatcher does: an exact, prefix (`dir/**`) or suffix
    (`**/name`) comparison, else a regular expression."""

    def __init__(self, pattern: str):
        p = go_clean(pattern.strip())
        self.exclusion = p.startswith("!")
        if self.exclusion:
            if len(p) == 1:
                raise ValueError('illegal exclusion pattern: "!"')
            p = p[1:]
        self.cleaned = p
        self.kind, self.regex = self._compile(p)

    @staticmethod
    def _compile(p: str):
        regex, kind, i, step = "^", "exact", 0, 0
        while i < len(p):
            ch = p[i]
            i += 1
            if ch == "*":
                if p[i:i + 1] == "*":
                    i += 1
                    if p[i:i + 1] == "/":
                        i += 1
                    if i >= len(p):
                        if kind == "exact":
                            kind = "prefix"
                        else:
                            regex, kind = regex + ".*", "regexp"
                    else:
                        regex, kind = regex + "(.*/)?", "regexp"
                    if step == 0:
                        kind = "suffix"
                else:
                    regex, kind = regex + "[^/]*", "regexp"
            elif ch == "?":
                regex, kind = regex + "[^/]", "regexp"
            elif ch in ".+()|{}$":
                regex += "\\" + ch
            elif ch == "\\":
                if i < len(p):
                    regex, kind, i = regex + "\\" + p[i], "regexp", i + 1
                else:
                    regex += "\\\\"
            elif ch in "[]":
                regex, kind = regex + ch, "regexp"
            else:
                regex += ch
            step += 1
        return kind, (re.compile(regex + "$") if kind == "regexp" else None)

    def match(self, path: str) -> bool:
        if self.kind == "exact":
            return path == self.cleaned
        if self.kind == "prefix":
            return path.startswith(self.cleaned[:-2])
        if self.kind == "suffix":
            suffix = self.cleaned[2:]
            return path.endswith(suffix) or (suffix.startswith("/") and path == suffix[1:])
        return self.regex.search(path) is not None


class DockerIgnore:
    def __init__(self, patterns: list[str]):
        self.patterns = [DockerPattern(p) for p in patterns if p.strip()]
        self.exclusions = any(p.exclusion for p in self.patterns)

    def excludes(self, path: str) -> bool:
        """Whether `path` (relative to the context root, slash-separated) stays out."""
        matched = False
        parent = go_dir(path)
        parents = parent.split("/")
        for pattern in self.patterns:
            if pattern.exclusion != matched:
                continue
            match = pattern.match(path)
            if not match and parent != ".":
                match = any(pattern.match("/".join(parents[:i + 1])) for i in range(len(parents)))
            if match:
                matched = not pattern.exclusion
        return matched


def build_context(root: str, ignore: DockerIgnore) -> set[str]:
    """The files of `root` that a build with this ignore file sends, as relative paths. An
    excluded directory is not entered unless some !pattern may include something in it."""
    files = set()
    for top, dirs, names in os.walk(root):
        rel_top = os.path.relpath(top, root).replace(os.sep, "/")
        rel = (lambda name: name) if rel_top == "." else (lambda name: f"{rel_top}/{name}")  # noqa: B023
        if not ignore.exclusions:
            dirs[:] = [d for d in dirs if not ignore.excludes(rel(d))]
        files |= {rel(n) for n in names if not ignore.excludes(rel(n))}
    return files


@pytest.mark.parametrize("pattern,path,excluded", [
    ("runs", "runs", True),
    ("runs", "runs/x/summary.json", True),            # a matching directory takes its contents
    ("runs", "sub/runs/x", False),                    # root only
    ("/runs/", "runs/x", True),                       # leading and trailing / cleaned away
    ("./a/../runs", "runs/x", True),
    ("**/runs", "runs/x", True),                      # **/ matches zero directories too
    ("**/runs", "sub/dir/runs/y/summary.json", True),
    ("**/runs", "myruns/x", False),
    ("**/runs", "orchestrator/runs.py", False),
    ("*.parquet", "a.parquet", True),
    ("*.parquet", "x/a.parquet", False),              # * does not cross /
    ("**/*.parquet", "x/y/a.parquet", True),
    ("**/mlflow.db*", "tests/tmp/mlflow.db.lock", True),
    ("**/mlflow.db*", "mlflow.db", True),
    ("dir/**", "dir/a/b", True),
    ("abc/**", "abc", False),
    ("a/**/b", "a/b", True),
    ("a/**/b", "a/x/y/b", True),
    ("**file", "dir/dir/file", True),
    ("**/dir2/*", "dir/dir2/file", True),
    ("a**/*.txt", "a/dir/dir/file.txt", True),
    ("a/*.txt", "a/dir/file.txt", False),
    ("?uns", "runs", True),
    ("abc.def", "abcZdef", False),                    # . is literal
    ("a(b)c/def", "a(b)c/def", True),
    ("a[b-d]e", "ace", True),
    ("a[^b-d]e", "ace", False),
    (".*", ".foo", True),
    (".*", "foo", False),
    ("a\\*b", "a*b", True),
    ("**/.foo", "bar.foo", False),
])
def test_dockerignore_pattern(pattern, path, excluded):
    assert DockerIgnore(dockerignore_patterns(pattern)).excludes(path) is excluded


def test_dockerignore_reading_and_negation():
    text = "\ufeff# a comment\n  runs/  \n\n#runs is not a pattern here\n! runs/keep \n/abs/../top\n  # not a comment\n"
    assert dockerignore_patterns(text) == ["runs", "!runs/keep", "top", "# not a comment"]
    ignore = DockerIgnore(dockerignore_patterns(text))
    assert ignore.excludes("runs/x.json") and ignore.excludes("top/y")
    assert not ignore.excludes("runs/keep") and not ignore.excludes("runs/keep/z.json")
    assert not ignore.excludes("# a comment") and ignore.excludes("# not a comment")
    assert DockerIgnore(["!runs/keep", "runs"]).excludes("runs/keep")         # the last match wins
    assert not DockerIgnore(["**/*.pyc", "!keep.pyc"]).excludes("keep.pyc")
    assert DockerIgnore(["**/*.pyc", "!keep.pyc"]).excludes("a/keep.pyc")
    assert DockerIgnore(["**", "!util/web", "util/web/foo"]).excludes("util/web/foo")
    assert not DockerIgnore(["**", "!util/web"]).excludes("util/web/foo")
    with pytest.raises(ValueError):
        DockerIgnore(["!"])


# run outputs planted at several depths of the context
PLANTED_OUTPUTS = [
    "runs/fmnist_mlp-1a2b/ledger/train-00.parquet",
    "runs/fmnist_mlp-1a2b/summary.json",
    "runs/hydra/2025-01-01_00-00-00/.hydra/config.yaml",
    "sub/dir/runs/y/summary.json",
    "outputs/2025-01-01/12-00-00/main.log",
    "bench/outputs/x/main.log",
    "multirun/2025-01-01/0/main.log",
    "examples/multirun/0/log",
    "mlruns/0/meta.yaml",
    "bench/mlruns/1/meta.yaml",
    "mlartifacts/1/abc/artifacts/lds.png",
    "a/b/mlartifacts/1/x.png",
    "mlflow.db",
    "mlflow.db.lock",
    "tests/tmp/mlflow.db",
    "tests/tmp/mlflow.db.lock",
    "store/exp-1/ledger/unit-00.parquet",
    "store/exp-1/ledger/_quarantine/bad.parquet",
    "store/exp-1/checkpoints/train-0000001-r0.pt",
    "store/exp-1/masks/train.npy",
    "store/exp-1/lds_per_target.npz",
    "ledger/old.parquet",
    "x.parquet",
    ".venv/bin/python",
    "a/.venv/bin/python",
    "venv/bin/python",
    "orchestrator/__pycache__/cli.cpython-311.pyc",
    "tests/.pytest_cache/v/cache/lastfailed",
    ".pytest_cache/v/cache/lastfailed",
    "datamodels.egg-info/PKG-INFO",
    ".git/HEAD",
    "data/cifar10/batch_1.bin",
]


def pyproject() -> dict:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def dockerfile_copy_sources() -> list[str]:
    """The context paths of the Dockerfile's COPY lines, `.` (the whole context) left out."""
    with open(DOCKERFILE, encoding="utf-8") as f:
        lines = logical_lines(f.read())
    sources = []
    for line in lines:
        words = line.split()
        if words[:1] == ["COPY"]:
            args = [w for w in words[1:] if not w.startswith("--")]
            sources += [a for a in args[:-1] if a != "."]
    return sources


def needed_in_context(files: list[str]) -> set[str]:
    """What the image build reads from the context: the COPY sources, pyproject.toml's
    readme and every file of the packages it lists."""
    setuptools = pyproject()["tool"]["setuptools"]
    dirs = [setuptools.get("package-dir", {}).get(p, p.replace(".", "/")) for p in setuptools["packages"]]
    needed = {"pyproject.toml", pyproject()["project"]["readme"], *dockerfile_copy_sources()}
    return needed | {f for f in files if any(f.startswith(d + "/") for d in dirs)}


def repo_files() -> list[str]:
    """The repository's files: tracked ones and new ones git does not ignore."""
    if shutil.which("git") is None or not os.path.isdir(os.path.join(REPO, ".git")):
        pytest.skip("needs a git checkout")
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
                         cwd=REPO, capture_output=True, check=True).stdout.decode()
    return sorted(f for f in out.split("\0") if f)


def plant_tree(root, files) -> None:
    for rel in files:
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        open(path, "w").close()


def context_problems(ignore_text: str, tmp_path) -> list[str]:
    files = repo_files()
    plant_tree(tmp_path, files + PLANTED_OUTPUTS)
    context = build_context(str(tmp_path), DockerIgnore(dockerignore_patterns(ignore_text)))
    problems = [f"run output in the build context: {f}" for f in PLANTED_OUTPUTS if f in context]
    problems += [f"needed by the image but not in the build context: {f}"
                 for f in sorted(needed_in_context(files)) if f not in context]
    return problems


def test_build_context_has_the_sources_and_no_run_outputs(tmp_path):
    with open(DOCKERIGNORE, encoding="utf-8") as f:
        text = f.read()
    needed = needed_in_context(repo_files())
    assert {"pyproject.toml", "constraints.txt", "README.md", "conf/config.yaml",
            "orchestrator/storage/ledger.py", "workers/checkpoints.py",
            "hydra_plugins/datamodels_launcher/__init__.py"} <= needed
    problems = context_problems(text, tmp_path)
    assert not problems, "deploy/Dockerfile.dockerignore:\n" + "\n".join(problems)


def test_root_only_patterns_leak_nested_outputs(tmp_path):
    """The same file with every `**/` taken out (root-only patterns, as before) fails."""
    with open(DOCKERIGNORE, encoding="utf-8") as f:
        root_only = f.read().replace("**/", "")
    problems = context_problems(root_only, tmp_path)
    leaked = {p.split(": ", 1)[1] for p in problems if p.startswith("run output")}
    assert {"sub/dir/runs/y/summary.json", "tests/tmp/mlflow.db", "examples/multirun/0/log",
            "a/b/mlartifacts/1/x.png", "a/.venv/bin/python"} <= leaked


# ----------------------------------------------------------------------------- the lock
def read_lock() -> dict[str, str]:
    """constraints.txt as {normalized name: version}."""
    from packaging.utils import canonicalize_name
    pins = {}
    with open(LOCK, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([0-9][^\s;+]*)", line)
            assert m, f"constraints.txt: not a plain name==version pin: {line!r}"
            name = canonicalize_name(m.group(1))
            assert name not in pins, f"constraints.txt: {name} pinned twice"
            pins[name] = m.group(2)
    return pins


def make_variable(name: str) -> str:
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        m = re.search(rf"^{name}\s*[:?]?=\s*(\S+)\s*$", f.read(), flags=re.M)
    assert m, f"Makefile sets no {name}"
    return m.group(1)


def dockerfile_arg(name: str) -> str:
    with open(DOCKERFILE, encoding="utf-8") as f:
        m = re.search(rf"^ARG {name}=(\S+)\s*$", f.read(), flags=re.M)
    assert m, f"deploy/Dockerfile has no ARG {name}"
    return m.group(1)


def test_lock_is_plain_pins_and_leaves_torch_out():
    with open(LOCK, encoding="utf-8") as f:
        header = f.read().split("\n", 8)[:8]
    assert any("make lock" in line for line in header if line.startswith("#"))
    pins = read_lock()
    assert "torch" not in pins                 # pinned by the Makefile and the Dockerfile instead
    assert {"ray", "numpy", "mlflow", "pytest", "playwright", "boto3"} <= set(pins)
    assert pins["ray"] == dockerfile_arg("RAY_VERSION")
    assert make_variable("TORCH") == dockerfile_arg("TORCH_VERSION")


def test_lower_bounds_are_the_locked_versions():
    """Each dependency's lower bound is the version the tests ran with: its pin in the lock
    (torch: the Makefile's TORCH), and the pin satisfies the whole range."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
    pins = read_lock()
    project = pyproject()["project"]
    problems = []
    for spec in project["dependencies"] + project["optional-dependencies"]["dev"]:
        req = Requirement(spec)
        name = canonicalize_name(req.name)
        locked = make_variable("TORCH") if name == "torch" else pins.get(name)
        lower = [s.version for s in req.specifier if s.operator == ">="]
        if locked is None:
            problems.append(f"{spec}: not in constraints.txt")
        elif len(lower) != 1 or Version(lower[0]) != Version(locked):
            problems.append(f"{spec}: the lower bound should be >={locked}, the locked version")
        elif not req.specifier.contains(locked, prereleases=True):
            problems.append(f"{spec}: excludes the locked {locked}")
    assert not problems, "pyproject.toml (after `make lock`, update its bounds):\n" + "\n".join(problems)


def make_dry_run(*args: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("needs make")
    return subprocess.run(["make", "-n", "-B", *args], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout


def make_prerequisites() -> dict[str, list[str]]:
    """target -> prerequisites, from make's own database."""
    if shutil.which("make") is None:
        pytest.skip("needs make")
    out = subprocess.run(["make", "-p", "-n", "-q", "--no-builtin-rules"], cwd=REPO,
                         capture_output=True, text=True).stdout
    rules = {}
    for line in out.splitlines():
        m = re.match(r"^([^\s#:=][^:=]*):(?!=)\s*(.*)$", line)
        if m and not line.startswith("\t"):
            rules.setdefault(m.group(1).strip(), m.group(2).split())
    return rules


def test_make_and_docker_install_from_the_lock():
    rules = make_prerequisites()
    stamp = make_variable("VENV") + "/.installed"
    assert "constraints.txt" in rules[stamp]          # a new lock reinstalls
    assert "browser" in rules["test"] and "browser" not in rules["demo"]
    pip_lines = [ln for ln in make_dry_run("install").splitlines() if "pip install" in ln]
    assert len(pip_lines) >= 2
    assert all("-c constraints.txt" in ln for ln in pip_lines), pip_lines
    assert any('"torch==' + make_variable("TORCH") + '"' in ln for ln in pip_lines)

    with open(DOCKERFILE, encoding="utf-8") as f:
        steps = logical_lines(f.read())
    copies = [i for i, ln in enumerate(steps) if ln.startswith("COPY")]
    lock_copy = next(i for i in copies if "constraints.txt" in steps[i].split())
    code_copy = next(i for i in copies if steps[i].split()[-2] == ".")
    assert "pyproject.toml" in steps[lock_copy].split() and lock_copy < code_copy
    installs = [ln for ln in steps[lock_copy:code_copy] if "pip install -c /tmp/constraints.txt" in ln]
    assert installs and all(w in installs[0] for w in ('"torch==${TORCH_VERSION}"', '"ray[default]==${RAY_VERSION}"'))


def test_every_apt_get_waits_for_the_lock():
    with open(DOCKERFILE, encoding="utf-8") as f:
        docker = f.read()
    for where, text in (("Makefile", make_dry_run("data", "browser")), ("deploy/Dockerfile", docker)):
        calls = re.findall(r"(?<!command -v )apt-get(?: -o \S+)*(?= (?:update|install)\b)", text)
        assert len(calls) >= 2, where
        assert all("-o DPkg::Lock::Timeout=" in c for c in calls), f"{where}: {calls}"


FAKE_APT = """#!/bin/sh
# stands in for apt-get: `update` finds the lists locked the first $BUSY times
echo "$*" >> "$LOG"
case "$*" in
  *" update"*)
    n=$(grep -c " update" "$LOG")
    if [ "$n" -le "$BUSY" ]; then
      echo "$ERROR" >&2; exit 100
    fi;;
esac
exit 0
"""


@pytest.mark.skipif(os.name != "posix" or not hasattr(os, "geteuid") or os.geteuid() != 0,
                    reason="as non-root the Makefile goes through sudo")
@pytest.mark.parametrize("busy,error,ok", [
    (2, "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 1 (apt-get)", True),
    (50, "E: Could not get lock /var/lib/apt/lists/lock. It is held by process 1 (apt-get)", False),
    (1, "E: Failed to fetch http://deb.debian.org/debian/dists/bookworm/InRelease", False),
])
def test_make_browser_retries_apt_get_update_while_apt_is_busy(tmp_path, busy, error, ok):
    if shutil.which("make") is None:
        pytest.skip("needs make")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "apt-get").write_text(FAKE_APT)
    (bin_dir / "apt-get").chmod(0o755)
    log = tmp_path / "apt.log"
    log.touch()
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", LOG=str(log), BUSY=str(busy), ERROR=error)
    run = subprocess.run(["make", "--no-print-directory", "browser", f"CHROMIUM={tmp_path}/no-chromium",
                          "APT_RETRY_S=0.2", "APT_LOCK_TIMEOUT=2"],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=60)
    calls = log.read_text().splitlines()
    updates = [c for c in calls if c.endswith(" update -qq")]
    installs = [c for c in calls if " install " in c]
    assert all("-o DPkg::Lock::Timeout=2 " in c for c in calls), calls
    if ok:
        assert run.returncode == 0, run.stderr
        assert len(updates) == busy + 1 and len(installs) == 1 and installs[0].endswith("chromium")
    else:
        assert run.returncode != 0 and not installs and error in run.stderr
        assert len(updates) == 1 if "lock" not in error else 2 <= len(updates) < busy


# ----------------------------------------------------------------------------- the entry points' import path
# PYTHONPATH set to the repository makes `datamodels` import what the install does not provide
# (it hid an editable install that left Hydra without the sweep launcher).
SETS_PYTHONPATH_TO_REPO = re.compile(r"""PYTHONPATH["']?\]?\s*[=:]\s*[{(]?\s*(?:str\()?REPO\b""")


def test_make_test_ci_and_the_tests_leave_pythonpath_alone():
    with open(os.path.join(REPO, "Makefile"), encoding="utf-8") as f:
        makefile = f.read()
    with open(os.path.join(REPO, ".ci", "run"), encoding="utf-8") as f:
        ci = f.read()
    for where, text in (("Makefile", makefile), (".ci/run", ci), ("make -n test", make_dry_run("test"))):
        assert "PYTHONPATH" not in text, f"{where} sets PYTHONPATH"
    tests_dir = os.path.join(REPO, "tests")
    offenders = []
    for name in sorted(os.listdir(tests_dir)):
        if name.endswith(".py"):
            with open(os.path.join(tests_dir, name), encoding="utf-8") as f:
                offenders += [f"tests/{name}:{i}: {line.strip()}" for i, line in enumerate(f, 1)
                              if SETS_PYTHONPATH_TO_REPO.search(line)]
    assert not offenders, "the repository on PYTHONPATH (run the installed command instead, as " \
                          "tests/test_cli.py's user_command does):\n" + "\n".join(offenders)


@pytest.mark.parametrize("line", ['env = dict(os.environ, PYTHONPATH={where})', 'self.env["PYTHONPATH"] = {where}',
                                  'env = {{"PYTHONPATH": {where}}}', 'f"PYTHONPATH={{{where}}} datamodels"'])
def test_the_pythonpath_scan_sees_the_repository(line):
    assert SETS_PYTHONPATH_TO_REPO.search(line.format(where="REPO"))
    assert not SETS_PYTHONPATH_TO_REPO.search(line.format(where="user_code"))


def test_every_package_of_the_code_is_installed():
    """pyproject.toml lists the packages a regular (non-editable) install ships: every folder
    of orchestrator/, workers/ and hydra_plugins/ with an __init__.py is among them (a missing
    one installs a command that cannot import itself; only the editable install hides it)."""
    import tomllib
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        listed = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    found = set()
    for top in ("orchestrator", "workers", "hydra_plugins"):
        for dirpath, _, files in os.walk(os.path.join(REPO, top)):
            if "__init__.py" in files and "__pycache__" not in dirpath:
                found.add(os.path.relpath(dirpath, REPO).replace(os.sep, "."))
    assert found - listed == set(), f"packages missing from pyproject.toml: {sorted(found - listed)}"
