"""The package is a library: no command line inside it, one name per knob."""

import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "sami_adapter")


def _modules():
    for folder, _, files in os.walk(PACKAGE):
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path) as f:
                    yield os.path.relpath(path, ROOT), ast.parse(f.read(), path)


def test_no_command_line_in_the_library():
    """argparse, Namespace and SystemExit belong to examples/; library functions take parameters and raise."""
    found = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and any(alias.name == "argparse" for alias in node.names):
                found.append(f"{path}:{node.lineno} imports argparse")
            elif isinstance(node, ast.ImportFrom) and node.module == "argparse":
                found.append(f"{path}:{node.lineno} imports from argparse")
            elif isinstance(node, ast.Name) and node.id in ("SystemExit", "Namespace"):
                found.append(f"{path}:{node.lineno} uses {node.id}")
            elif isinstance(node, ast.Attribute) and node.attr in ("Namespace", "ArgumentParser", "parse_args"):
                found.append(f"{path}:{node.lineno} uses .{node.attr}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "exit":
                found.append(f"{path}:{node.lineno} calls exit()")
    assert not found, "command-line code inside sami_adapter/: " + "; ".join(found)


def test_the_sami_knob_is_sami_scale_everywhere():
    """No function or keyword of the library calls the SAMI knob ``guidance_scale``: that name is
    classifier-free guidance, and only the pipeline (which has CFG) takes it."""
    takers = []
    for path, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                names = [a.arg for a in node.args.args + node.args.kwonlyargs]
                if "guidance_scale" in names:
                    takers.append(f"{path}:{node.name}")
            elif isinstance(node, ast.keyword) and node.arg in ("guidance_scale", "cfg_scale"):
                takers.append(f"{path}:{node.lineno} passes {node.arg}=")
    assert sorted(takers) == ["sami_adapter/pipeline.py:__call__", "sami_adapter/pipeline.py:_denoise", "sami_adapter/pipeline.py:_prepare_codes",
                              "sami_adapter/pipeline.py:check_inputs", "sami_adapter/pipeline.py:guided_model_output"], takers


EXAMPLES = os.path.join(ROOT, "examples")


def _sources():
    """Every module of the library and of examples/, parsed, with its text."""
    for folder in (PACKAGE, EXAMPLES):
        for path in sorted(os.path.join(d, f) for d, _, files in os.walk(folder) for f in files if f.endswith(".py")):
            with open(path) as f:
                text = f.read()
            yield os.path.relpath(path, ROOT), ast.parse(text, path), text


def _functions(tree):
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_caller_of_reconstruct_branches_on_the_model():
    """SAMI, the β-VAE and DiffAE take one reconstruct(images, generator=...) call, so no function that calls
    ``.reconstruct(`` asks which model it holds: no isinstance/type, no comparison with a name."""
    found = []
    for path, tree, _ in _sources():
        for fn in _functions(tree):
            calls = [n for n in ast.walk(fn) if isinstance(n, ast.Call)]
            if not any(isinstance(c.func, ast.Attribute) and c.func.attr == "reconstruct" for c in calls):
                continue
            if any(isinstance(c.func, ast.Name) and c.func.id in ("isinstance", "type") for c in calls):
                found.append(f"{path}:{fn.name} calls isinstance/type")
            for node in ast.walk(fn):
                if isinstance(node, ast.Compare) and any(isinstance(c, ast.Constant) and isinstance(c.value, str)
                                                         for c in [node.left, *node.comparators]):
                    found.append(f"{path}:{fn.name}:{node.lineno} compares with a name")
    assert not found, found


def test_the_active_threshold_is_one_constant_imported_everywhere():
    """The 0.1-nat "active dimension" rule is ``encoder.ACTIVE_KL_NATS``: defined once, imported, never retyped."""
    retyped, defined = [], []
    for path, tree, text in _sources():
        for number, line in enumerate(text.splitlines(), 1):
            if re.search(r"0\.1", line) and re.search(r"kl|active", line, re.IGNORECASE) and not line.startswith("ACTIVE_KL_NATS = "):
                retyped.append(f"{path}:{number}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "ACTIVE_KL_NATS" for t in node.targets):
                defined.append(path)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.args + node.args.kwonlyargs
                defaults = [None] * (len(node.args.args) - len(node.args.defaults)) + node.args.defaults + node.args.kw_defaults
                for arg, default in zip(args, defaults):
                    if "threshold" in arg.arg and isinstance(default, ast.Constant) and default.value == 0.1:
                        retyped.append(f"{path}:{node.name}({arg.arg}=0.1)")
    assert defined == [os.path.join("sami_adapter", "encoder.py")], defined
    assert not retyped, retyped


def test_long_functions_say_why_at_their_top():
    """A function of more than 80 lines of code (its docstring aside) starts with a ``# Long ...`` comment saying why."""
    unexplained = []
    for path, tree, text in _sources():
        lines = text.splitlines()
        for fn in _functions(tree):
            body = fn.body[1:] if ast.get_docstring(fn, clean=False) is not None else fn.body
            if not body or fn.end_lineno - body[0].lineno + 1 <= 80:
                continue
            first = body[0].lineno - 1
            above = lines[first - 1].strip() if first > 0 else ""
            if not above.startswith("# Long"):
                unexplained.append(f"{path}:{fn.name} ({fn.end_lineno - body[0].lineno + 1} lines)")
    assert not unexplained, unexplained



def test_scripts_import_the_installed_package():
    """The example scripts import ``sami_adapter`` as installed and the library for what they share: no ``sys.path``
    edits, and no script executed from another (``runpy`` on a path other than the script's own)."""
    found = []
    for path in sorted(os.listdir(EXAMPLES)):
        if not path.endswith(".py"):
            continue
        with open(os.path.join(EXAMPLES, path)) as f:
            text = f.read()
        found += [f"{path}: sys.path.{verb}" for verb in ("insert", "append") if f"sys.path.{verb}(" in text]
        found += [f"{path}: runs {target}" for target in re.findall(r"runpy\.run_path\(([^,)]*)", text) if "__file__" not in target]
    assert not found, found


# ---------------------------------------------------------------------------------------- the import graph
def _file_of(parts) -> list:
    """``[path]`` of the module or package named by ``parts`` (from ROOT), or [] when it is no file of the tree."""
    for candidate in (os.path.join(*parts) + ".py", os.path.join(*parts, "__init__.py")):
        if os.path.isfile(os.path.join(ROOT, candidate)):
            return [candidate]
    return []


def _imported_files(importer: str, node) -> list:
    """The files of sami_adapter/ that an import statement of ``importer`` (a path from ROOT) loads."""
    if isinstance(node, ast.Import):
        return [f for alias in node.names if alias.name.split(".")[0] == "sami_adapter" for f in _file_of(alias.name.split("."))]
    if node.level:
        parts = importer.split(os.sep)[:-node.level] + (node.module.split(".") if node.module else [])
    elif node.module and node.module.split(".")[0] == "sami_adapter":
        parts = node.module.split(".")
    else:
        return []
    # ``from .pkg import name``: a submodule when ``name`` is one, else the package or module itself
    return [f for alias in node.names for f in (_file_of(parts + [alias.name]) or _file_of(parts))]


def import_graph() -> dict:
    """``{file: {files it imports}}`` over sami_adapter/, imports inside functions included (they run too)."""
    graph = {}
    for path, tree in _modules():
        graph[path] = {target for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom))
                       for target in _imported_files(path, node) if target != path}
    return graph


def test_no_import_circle_and_no_arrow_up():
    """The modules of sami_adapter/ import each other without a loop, so every one stands on a floor above all it
    imports (the math at the bottom, the pipeline and the harness on top) and no import runs back up."""
    graph = import_graph()
    assert os.path.join("sami_adapter", "card.py") in graph and graph[os.path.join("sami_adapter", "card.py")], "the graph reads no imports"
    floors, visiting = {}, []

    def floor(path):
        if path in visiting:
            raise AssertionError("import circle: " + " -> ".join(visiting[visiting.index(path):] + [path]))
        if path not in floors:
            visiting.append(path)
            floors[path] = 1 + max((floor(target) for target in graph.get(path, ())), default=0)
            visiting.pop()
        return floors[path]

    for path in graph:
        floor(path)
    up = [f"{a} -> {b}" for a, targets in graph.items() for b in targets if floors[b] >= floors[a]]
    assert not up, up
    # The heavy side (metrics and their scikit-learn) stays above what the pipeline stands on.
    core = ("pipeline.py", "decoding.py", "hub.py", "card.py", "adapter.py", "lora.py", "base_model.py", "encoder.py", "guidance.py",
            "latent.py", "objective.py", "rate.py", "training.py")
    reach = {os.path.join("sami_adapter", name) for name in core}
    stack = list(reach)
    while stack:
        for target in graph.get(stack.pop(), ()):
            if target not in reach:
                reach.add(target)
                stack.append(target)
    assert not [p for p in reach if p.startswith(os.path.join("sami_adapter", "metrics"))], sorted(reach)


# ---------------------------------------------------------------------------------------- the core install
def _optional_modules():
    """The top-level modules of every optional dependency in pyproject.toml (and scipy, which scikit-learn brings)."""
    with open(os.path.join(ROOT, "pyproject.toml")) as f:
        text = f.read()
    core = set(re.findall(r'^\s*"([A-Za-z0-9_.-]+)', text.split("dependencies = [", 1)[1].split("]", 1)[0], re.MULTILINE))
    extras = text.split("[project.optional-dependencies]", 1)[1].split("\n[", 1)[0]
    names = set(re.findall(r'"([A-Za-z0-9_.-]+)[<>=!~\[]?', extras)) - {name.lower() for name in core} - {"pytest"}
    module = {"scikit-learn": "sklearn"}
    return sorted({module.get(name, name.replace("-", "_")) for name in names} | {"scipy"})


CORE_CHECK = r"""
import importlib.util, os, sys, tempfile
missing = [m for m in sys.argv[1:] if importlib.util.find_spec(m) is None]
assert missing == sys.argv[1:], "still importable: " + str(sorted(set(sys.argv[1:]) - set(missing)))
import torch
import sami_adapter
from sami_adapter import SAMIPipeline, sami_loss
from sami_adapter import adapter, base_model, card, decoding, encoder, extras, guidance, hub, images, latent, lora, objective
from sami_adapter import pipeline, rate, training
from tiny import save_tiny_base, tiny_encoder
with tempfile.TemporaryDirectory() as tmp:
    base = save_tiny_base(os.path.join(tmp, "base"))
    adapter.save_adapter(os.path.join(tmp, "adapter"), tiny_encoder(), base)
    pipe = SAMIPipeline.from_pretrained(os.path.join(tmp, "adapter"))
    pipe.set_progress_bar_config(disable=True)
    z = pipe.encode(torch.rand(2, 1, 8, 8)).mean
    out = pipe(z=z, num_inference_steps=2, output_type="pt").images
    pipe.save_pretrained(os.path.join(tmp, "again"))
    again = SAMIPipeline.from_pretrained(os.path.join(tmp, "again"))
    assert torch.equal(again.encoder.head.weight, pipe.encoder.head.weight) and out.shape == (2, 1, 8, 8)
    loss = sami_loss(pipe.unet, pipe.encoder, pipe.scheduler, torch.rand(2, 1, 8, 8) * 2 - 1, beta=1.0)
for name, extra in (("sami_adapter.metrics", "eval"), ("sami_adapter.evaluation", "eval")):
    try:
        __import__(name)
    except ImportError as e:
        assert f'pip install "sami-adapter[{extra}]"' in str(e), str(e)
    else:
        raise AssertionError(name + " imported without its extra")
from sami_adapter import hf_data
try:
    hf_data.hub_offline()
except ImportError as e:
    assert 'pip install "sami-adapter[train]"' in str(e), str(e)
else:
    raise AssertionError("datasets imported")
print("core ok")
"""


def test_the_core_install_needs_no_extra(tmp_path):
    """Without any optional dependency installed (a site-packages that lacks them, as after a plain ``pip install .``), the
    package, the pipeline, the encoder, training and Hub loading and saving work, and what needs an extra names it."""
    import site
    import subprocess
    import sys

    blocked = _optional_modules()
    assert {"sklearn", "scipy", "matplotlib", "datasets", "gradio", "tensorboard"} <= set(blocked), blocked
    packages = tmp_path / "site-packages"
    packages.mkdir()
    for folder in site.getsitepackages():
        for name in os.listdir(folder):
            top = re.split(r"[-.]", name, maxsplit=1)[0].lower().replace("scikit_learn", "sklearn")
            if top not in blocked and not name.endswith(".pth") and not (packages / name).exists():
                (packages / name).symlink_to(os.path.join(folder, name))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([ROOT, os.path.join(ROOT, "tests"), str(packages)])
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    # CORE_CHECK first checks the isolation itself: none of the blocked modules can be found there.
    result = subprocess.run([sys.executable, "-S", "-c", CORE_CHECK, *blocked], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "core ok" in result.stdout, result.stderr[-3000:]
