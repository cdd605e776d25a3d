"""Build `.dvc/plots_offline.html`, the page template `dvc plots show` fills (`.dvc/config`: `plots.html_template`),
with vega, vega-lite and vega-embed inlined, so that the charts render offline (an air-gapped hospital, a closed CI
machine). DVC's own template loads the three from cdn.jsdelivr.net, and offline every chart comes out blank.

The versions are the ones DVC's renderer asks for (dvc_render.vega.VegaRenderer.SCRIPTS). Their licences (BSD-3-Clause,
University of Washington Interactive Data Lab) are kept in the page. To rebuild (needs the npm registry):

    python ci/offline_plots_template.py
"""

from __future__ import annotations

import subprocess
import tarfile
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / ".dvc" / "plots_offline.html"
PACKAGES = {"vega": "5.20.2", "vega-lite": "5.2.0", "vega-embed": "6.18.2"}

PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
{refresh_tag}
<title>cxr-ldm plots (dvc plots show)</title>
<!-- vega, vega-lite and vega-embed inlined from the npm registry by ci/offline_plots_template.py: no network needed.
%(licences)s
-->
%(scripts)s
<style>body{font:14px system-ui,sans-serif;margin:1.5em}table{border-spacing:15px}</style>
</head>
<body>
<h1>cxr-ldm: pipeline plots</h1>
{plot_divs}
</body>
</html>
"""


def package_files(folder: Path) -> tuple[str, str]:
    """The minified build and the licence of each package, fetched with ``npm pack`` into ``folder``."""
    scripts, licences = [], []
    for name, version in PACKAGES.items():
        tgz = subprocess.run(["npm", "pack", "--silent", f"{name}@{version}"], cwd=folder, check=True,
                             capture_output=True, text=True).stdout.strip().splitlines()[-1]
        with tarfile.open(folder / tgz) as tar:
            js = tar.extractfile(f"package/build/{name}.min.js").read().decode()
            licence = tar.extractfile("package/LICENSE").read().decode()
        for marker in ("</script", "{plot_divs}", "{scripts}", "{refresh_tag}", "-->"):
            if marker in js or (marker == "-->" and marker in licence):
                raise SystemExit(f"{name}@{version}: its build contains {marker!r}, which would break the page")
        scripts.append(f"<script>/* {name}@{version} */\n{js}\n</script>")
        licences.append(f"{name}@{version}:\n{licence.strip()}")
    return "\n".join(scripts), "\n\n".join(licences)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        scripts, licences = package_files(Path(tmp))
    OUT.write_text(PAGE % {"scripts": scripts, "licences": licences})
    print(f"{OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
