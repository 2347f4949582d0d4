"""Who may import whom (docs/DESIGN.md, "Layers"): the data flow config -> mesh -> model +
optimizer -> step <- batches, kept by the imports. A new top-level module of neo/ needs a row
here (and a line in DESIGN.md) before it can be imported by anything."""

import ast
from pathlib import Path

NEO = Path(__file__).resolve().parent.parent / "neo"

# module -> the neo modules it may import (its own package is always allowed)
ALLOWED = {
    "errors": set(),
    "config": {"errors"},
    "mesh": {"errors"},
    "devices": {"errors"},
    "distributed": {"errors"},
    "memory": set(),
    "host_memory": set(),
    "checksum": set(),
    "imports": set(),
    "kernels": set(),
    "model": {"config", "kernels", "mesh", "errors"},
    "data": {"config", "errors", "imports"},
    "optim": {"config", "errors"},
    "loss": {"errors"},
    "mlm": {"config", "errors"},
    "flops": {"config", "errors"},
    "curriculum": {"config"},
    "tracking": {"config", "errors", "imports"},
    "checkpoint": {"checksum", "config", "errors", "memory", "mesh", "model"},
    "train": {"config", "errors", "loss", "mesh", "mlm", "model", "optim"},
    "auto_layout": {"config", "errors", "loss", "mesh", "model"},
    "predict": {"checkpoint", "config", "data", "errors", "kernels", "memory", "mesh", "model"},
    "interactive": {"checkpoint", "config", "data", "errors", "mesh", "predict"},
    "convert": {"checkpoint", "config", "data", "errors", "mesh", "model"},
    "evaluate": {"checkpoint", "config", "data", "distributed", "errors", "loss", "mesh", "model", "predict"},
    "loop": {"auto_layout", "checkpoint", "config", "curriculum", "data", "errors", "evaluate", "flops", "memory",
             "mesh", "predict", "tracking", "train"},
    "lm_eval": {"evaluate"},
    "cli": None,  # the command line may call anything
}


def top_level(path: Path) -> str:
    return path.relative_to(NEO).parts[0].removesuffix(".py")


def neo_imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        out |= {n.split(".")[1] for n in names if n.startswith("neo.")}
    return out


def test_every_module_imports_only_the_layers_below_it():
    wrong = []
    for path in sorted(NEO.rglob("*.py")):
        if path.parent == NEO and path.name == "__init__.py":
            continue
        module = top_level(path)
        assert module in ALLOWED, f"neo/{module} is not in ALLOWED (tests/test_layering.py): give it a layer"
        allowed = ALLOWED[module]
        if allowed is None:
            continue
        for imported in neo_imports(path) - {module} - allowed:
            wrong.append(f"{path.relative_to(NEO.parent)} imports neo.{imported}")
    assert not wrong, "imports against the layers of docs/DESIGN.md:\n" + "\n".join(wrong)


def test_the_model_sees_only_its_architecture():
    """neo/model may read the config's sections module, never the loader or the other sections."""
    for path in (NEO / "model").rglob("*.py"):
        source = path.read_text()
        for section in ("OptimizerConfig", "RunConfig", "DataConfig", "SamplingConfig", "load_model_config"):
            assert section not in source, f"{path.name} mentions {section}"
