"""Points the notebooks' install cells and the README's Colab badges at setup.py's ``url``.

setup.py's ``url`` is the one place the repository's address is written; after changing it (a
fork, a new home), run

    python notebooks/set_repository_url.py            # rewrite the notebooks and README.md
    python notebooks/set_repository_url.py --check    # exit 1 if anything disagrees (tested)

Every other mention of the previous address in README.md and the notebooks follows too. The
install cell of each notebook pip-installs ``git+<url>`` when fdistill is not importable, and
each badge opens ``https://colab.research.google.com/github/<owner>/<name>/blob/<branch>/notebooks/
<notebook>`` (``--branch``, default ``main``).
"""
from __future__ import annotations

import argparse
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_URL = re.compile(r'^\s*url="(https://github\.com/([\w.-]+)/([\w.-]+?))/?",?\s*$', re.M)
_INSTALL = re.compile(r'(REPOSITORY = \\?")([^"\\]*)(\\?")')
_BADGE = re.compile(r"(https://colab\.research\.google\.com/github/)([\w.-]+/[\w.-]+)/blob/"
                    r"([\w.-]+)/(notebooks/[\w.-]+\.ipynb)")


def repository_url() -> tuple[str, str]:
    """``(url, 'owner/name')`` from setup.py."""
    with open(os.path.join(ROOT, "setup.py")) as f:
        m = _URL.search(f.read())
    if m is None:
        raise SystemExit('setup.py has no url="https://github.com/<owner>/<name>"')
    return m.group(1), f"{m.group(2)}/{m.group(3)}"


def _files() -> list[str]:
    return [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "notebooks",
                                                                             "*.ipynb")))


def current_urls() -> set[str]:
    """The addresses the notebooks' install cells and the README's badges use now."""
    found = set()
    for path in _files():
        with open(path) as f:
            text = f.read()
        found |= {m.group(2) for m in _INSTALL.finditer(text)}
        found |= {f"https://github.com/{m.group(2)}" for m in _BADGE.finditer(text)}
    return found


def rewrite(text: str, url: str, slug: str, branch: str, previous=()) -> str:
    """``text`` with its install cells, Colab badges and any other mention of a ``previous``
    address pointing at ``url`` (``https://github.com/<slug>``) and ``branch``."""
    text = _INSTALL.sub(lambda m: m.group(1) + url + m.group(3), text)
    text = _BADGE.sub(lambda m: f"{m.group(1)}{slug}/blob/{branch}/{m.group(4)}", text)
    for old in previous:
        if old != url:
            text = re.sub(re.escape(old) + r"(?![\w.-])", url, text)
    return text


def disagreements(branch: str = "main") -> list[str]:
    """Files whose install cell or badges do not follow setup.py, and notebooks without a badge
    or an install cell."""
    url, slug = repository_url()
    previous = current_urls()
    bad = []
    readme = open(os.path.join(ROOT, "README.md")).read()
    for path in _files():
        with open(path) as f:
            text = f.read()
        if rewrite(text, url, slug, branch, previous) != text:
            bad.append(f"{os.path.relpath(path, ROOT)} does not use {url}")
        if path.endswith(".ipynb"):
            name = os.path.relpath(path, ROOT)
            if not _INSTALL.search(text):
                bad.append(f"{name} has no install cell (REPOSITORY = ...)")
            if f"/blob/{branch}/{name})" not in readme:
                bad.append(f"README.md has no Colab badge for {name}")
    return bad


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--check", action="store_true", help="report disagreements, change nothing")
    p.add_argument("--branch", default="main")
    args = p.parse_args(argv)
    if args.check:
        bad = disagreements(args.branch)
        print("\n".join(bad) or f"every notebook and badge uses {repository_url()[0]}")
        return 1 if bad else 0
    url, slug = repository_url()
    previous = current_urls()
    for path in _files():
        with open(path) as f:
            text = f.read()
        new = rewrite(text, url, slug, args.branch, previous)
        if new != text:
            with open(path, "w") as f:
                f.write(new)
            print(f"updated {os.path.relpath(path, ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
