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
    """The 0.1-nat "active dimension" rule is ``evaluation.ACTIVE_KL_NATS``: defined once, imported, never retyped."""
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
    assert defined == [os.path.join("sami_adapter", "evaluation.py")], defined
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
