"""The documentation site against the code: the generated CLI page is current, every page is in
the navigation, the README stays short, and the h5py snippet of "Your data" writes a file that
loads."""

import re
from pathlib import Path

import numpy as np

from mpifed.cli.reference import cli_reference

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"


def test_the_cli_reference_is_current():
    assert (DOCS / "reference" / "cli.md").read_text() == cli_reference(), \
        "run: python -m mpifed.cli.reference > docs/reference/cli.md (or make docs-reference)"


def test_the_cli_reference_names_every_command_and_option():
    text = cli_reference()
    for heading in ("## `mpifed train`", "## `mpifed data from-numpy`", "## `mpifed keys roster`",
                    "## `mpifed config reference`", "## `mpifed bench`"):
        assert heading in text
    assert "`--num-classes N`" in text and "`--set SECTION.KEY=VALUE`" in text
    assert "required. " in text and "(one of: iid" in text  # --institutions, --scheme


def test_every_page_is_in_the_navigation_and_every_entry_exists():
    listed = set(re.findall(r":\s*([\w/.-]+\.md)\s*$", (ROOT / "mkdocs.yml").read_text(), re.M))
    pages = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert listed == pages, (sorted(pages - listed), sorted(listed - pages))


def test_the_readme_has_at_most_200_lines():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_the_h5py_snippet_writes_the_contract(tmp_path, monkeypatch):
    import h5py

    from mpifed.data.shards import describe  # the checks training makes on data.train

    text = (DOCS / "data.md").read_text()
    code = re.search(r"```python\n(.*?)```", text.split("## Writing the file yourself")[1],
                     re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "data.md", "exec"), {})
    with h5py.File(tmp_path / "mine.h5", "r") as f:
        assert f["x"].shape == (1000, 20) and f["x"].dtype == np.float32
        assert f["x"].chunks[1:] == (20,)  # whole rows
        assert f["y"].dtype == np.int64 and f.attrs["num_classes"] == 3
    info = describe(str(tmp_path / "mine.h5"))
    assert (info.samples, info.features, info.num_classes) == (1000, 20, 3)
