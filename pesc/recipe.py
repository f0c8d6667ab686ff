"""Recipes: YAML files holding a `method:` key, the method's settings under `moe:` (what `pesc convert --config`
reads) and training settings (what `pesc train` reads).

One file holds several top-level sections. Each command reads only its own section and ignores the
others; inside its section an unknown key is an error that names it, so a typo never silently falls back
to a default.

pesc ships recipes inside the package (pesc/recipes/*.yaml, accelerate launch configs under
pesc/recipes/accelerate/), named by their path there without `.yaml` (`tiny`, `accelerate/ddp`); a name is
accepted wherever a recipe's path is, and an existing file wins over a name. Each file's first line, a
`# ` comment, says what it is for (`pesc recipes` lists it). Demo data ships beside them
(pesc/recipes/data/); a dataset path `pesc:NAME` names it from any recipe, shipped or copied, so a copy
made with `pesc recipes show NAME > my.yaml` trains anywhere. Every other relative path in a recipe
(base_model, output_dir, a dataset of your own) is relative to the folder the command runs in.
"""

from pathlib import Path

from pesc.errors import PescError

RECIPES = Path(__file__).parent / "recipes"
DEMO_DATA = RECIPES / "data"
DEMO_PREFIX = "pesc:"


def recipe_names() -> list[str]:
    """The shipped recipes' names, the training recipes first, then the launch configs (`accelerate/...`)."""
    names = (path.relative_to(RECIPES).with_suffix("").as_posix() for path in RECIPES.rglob("*.yaml"))
    return sorted(names, key=lambda name: ("/" in name, name))


def shipped_recipe(name: str, what: str = "recipe") -> Path:
    """The file of the shipped recipe `name`; a PescError listing the names when pesc ships none of that name."""
    names = recipe_names()
    if name not in names:
        raise PescError(f"{what} {name} does not exist, nor is it a recipe pesc ships (one of: {', '.join(names)})")
    return RECIPES / f"{name}.yaml"


def recipe_file(path_or_name: str | Path, what: str = "recipe") -> Path:
    """The YAML file a command was given: an existing file, else the shipped recipe of that name."""
    path = Path(path_or_name)
    if path.is_file():
        return path
    if path.is_dir() and str(path_or_name) not in recipe_names():
        raise PescError(f"{what} {path} is a folder: give the YAML file or a recipe name (`pesc recipes` lists them)")
    return shipped_recipe(str(path_or_name), what)


def recipe_summary(path: Path) -> str:
    """What a recipe is for: its first line, a `# ` comment."""
    first = path.read_text(encoding="utf-8").split("\n", 1)[0]
    return first[2:].strip() if first.startswith("# ") else ""


def demo_data(path: str) -> str:
    """A dataset path with `pesc:NAME` replaced by the demo data file NAME shipped in the package."""
    if not path.startswith(DEMO_PREFIX):
        return path
    shipped = sorted(file.name for file in DEMO_DATA.iterdir() if file.is_file())
    name = path[len(DEMO_PREFIX):]
    if name not in shipped:
        known = ", ".join(DEMO_PREFIX + file for file in shipped)
        raise PescError(f"dataset {path}: pesc ships no demo data of that name (it ships {known})")
    return str(DEMO_DATA / name)


def load_recipe(path: str | Path) -> dict:
    """The whole recipe (a file or a shipped recipe's name) as a mapping (clear errors for a missing file or bad
    YAML)."""
    import yaml

    path = recipe_file(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        detail = " ".join(str(error).split())
        raise PescError(f"recipe {path} is not valid YAML ({detail}): fix the file") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PescError(f"recipe {path} must be a mapping of sections (moe:, ...), not a {type(data).__name__}")
    return data


def load_moe_settings(path: str | Path, method_name: str | None = None) -> dict:
    """The `moe:` section, checked against the settings of `method_name` (a --method flag), else of the file's
    `method:`, else of pesc; other sections are ignored."""
    from pesc.methods import get_method

    data = load_recipe(path)
    if "moe" not in data:
        raise PescError(f"recipe {path} has no `moe:` section: put num_experts, top_k, adapter_dim, ... under `moe:`")
    moe = data["moe"] or {}
    if not isinstance(moe, dict):
        raise PescError(f"recipe {path}: `moe:` must be a mapping of settings, not a {type(moe).__name__}")
    file_method = data.get("method")
    if file_method is not None and not isinstance(file_method, str):
        raise PescError(f"recipe {path}: `method:` must be a method name such as pesc, not {file_method!r}")
    method = get_method(method_name or file_method)
    known = [s.name for s in method.all_settings()]
    unknown = sorted(str(key) for key in moe if key not in known)
    if unknown:
        raise PescError(
            f"recipe {path}: unknown key(s) in moe: {', '.join(unknown)} (known: {', '.join(known)})"
        )
    return dict(moe)
