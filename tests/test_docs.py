"""The documents stay in step with the code: every setting documented, every page linked, the README short."""
import re
from pathlib import Path

from utils.settings import DEFAULTS, FREE_MAPPINGS

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
QUICK_START = ("pip install -r requirements.txt && python run_pipeline.py --config configs/demo.yaml",
               "pip install -r requirements.txt && python -m pytest -q")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def setting_keys(node=DEFAULTS, prefix=""):
    """Dotted names of every setting: a mapping of settings (stage2.iicb) by its sub-keys, a free mapping
    whose keys the user chooses (stage1.backbone_kwargs, data.split_titles) as one key."""
    for key, value in node.items():
        dotted = prefix + key
        if isinstance(value, dict) and dotted not in FREE_MAPPINGS:
            yield from setting_keys(value, dotted + ".")
        else:
            yield dotted


def test_setting_keys_walk_nested_mappings():
    keys = set(setting_keys())
    assert {"seed", "stage2.iicb.alpha", "stage1.backbone_kwargs", "data.split_titles"} <= keys
    assert "stage2.iicb" not in keys and not any(k.startswith("stage1.backbone_kwargs.") for k in keys)


def test_every_setting_is_documented():
    text = (DOCS / "settings.md").read_text(encoding="utf-8")
    missing = [key for key in setting_keys() if f"`{key}`" not in text]
    assert not missing, f"docs/settings.md does not document: {', '.join(missing)}"


def test_every_doc_is_linked_from_the_readme():
    targets = {(README.parent / link.split("#")[0]).resolve()
               for link in LINK.findall(README.read_text(encoding="utf-8"))}
    unlinked = [page.name for page in sorted(DOCS.glob("*.md")) if page.resolve() not in targets]
    assert not unlinked, f"README.md links to none of: {', '.join(unlinked)}"


def test_readme_is_short_with_the_quick_start_first():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 300, f"README.md has {len(lines)} lines; move detail into docs/"
    head = "\n".join(lines[:40])
    for command in QUICK_START:
        assert command in head, f"the README's first 40 lines lack: {command}"


def github_anchor(heading):
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def test_relative_links_resolve():
    pages = [README, ROOT / "init_weights" / "README.md", ROOT / "datasets" / "README.md",
             *sorted(DOCS.glob("*.md"))]
    broken = []
    for page in pages:
        text = page.read_text(encoding="utf-8")
        for link in LINK.findall(text):
            if re.match(r"[a-z]+:", link):
                continue
            path, _, anchor = link.partition("#")
            target = (page.parent / path).resolve() if path else page
            if not target.exists():
                broken.append(f"{page.relative_to(ROOT)}: {link}")
            elif anchor and target.suffix == ".md":
                headings = re.findall(r"^#+ (.+)$", target.read_text(encoding="utf-8"), flags=re.M)
                if anchor not in {github_anchor(h) for h in headings}:
                    broken.append(f"{page.relative_to(ROOT)}: {link} (no such heading)")
    assert not broken, "broken links: " + "; ".join(broken)
