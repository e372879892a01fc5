"""The package is a library: no command line inside it, one name per knob."""

import ast
import os

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
