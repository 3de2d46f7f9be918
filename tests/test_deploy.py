"""deploy/ checked by machines, not by eye (no network, no Ray cluster, a few seconds):

* deploy/cluster.yaml against the cluster-launcher JSON schema of the installed Ray
  (ray/autoscaler/ray-schema.json, the schema `ray up` itself validates with);
* deploy/rayjob.yaml against KubeRay's RayJob CRD schema (served version v1), vendored in
  tests/schemas/ (see tests/schemas/README.md), turned from OpenAPI v3 into JSON Schema here;
* every `ray job` command in deploy/README.md, deploy/submit_examples.sh and the comments of
  deploy/cluster.yaml sets RAY_AUTH_MODE=token; every one that runs the orchestrator puts the
  experiment in `store.uri`; and every `python -m orchestrator ...` / `datamodels ...` there
  and in rayjob.yaml's entrypoint parses with Hydra's own argument parser and composes
  against conf/ (each point of a -m sweep), so a misspelled key or group fails here.
"""
from __future__ import annotations

import functools
import itertools
import json
import os
import re

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


@functools.lru_cache(maxsize=None)
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
