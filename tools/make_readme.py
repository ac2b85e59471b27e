"""Write README.md from nbs/index.ipynb (the home page), without Quarto.

`nbdev_readme` renders the README through Quarto, which is not available on every machine. This script
produces the same content from the notebook's cells: markdown cells as they are (the title cell's
`> summary` line stays a quote), code cells as fenced Python with their text outputs. Hidden cells
(`#| hide`) are skipped.

    python tools/make_readme.py          # write README.md
    python tools/make_readme.py --check  # exit 1 if README.md is out of date
"""
import json, sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEADER = "<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, not this file. -->\n\n"

def render(nb_path: Path) -> str:
    nb = json.loads(nb_path.read_text(encoding='utf-8'))
    parts = []
    for cell in nb['cells']:
        src = ''.join(cell['source']).strip('\n')
        if not src: continue
        first = src.splitlines()[0].replace(' ', '')
        if first.startswith('#|') and 'hide' in first: continue
        if cell['cell_type'] == 'markdown':
            parts.append(src)
        elif cell['cell_type'] == 'code':
            code = '\n'.join(l for l in src.splitlines() if not l.startswith('#|'))
            parts.append(f'```python\n{code}\n```')
            for out in cell.get('outputs', []):
                text = out.get('text') or out.get('data', {}).get('text/plain')
                if text: parts.append('    ' + ''.join(text).rstrip('\n').replace('\n', '\n    '))
    return HEADER + '\n\n'.join(parts) + '\n'

def main(argv):
    readme, text = ROOT / 'README.md', render(ROOT / 'nbs' / 'index.ipynb')
    if '--check' in argv:
        if not readme.exists() or readme.read_text(encoding='utf-8') != text:
            print('README.md is out of date with nbs/index.ipynb: run `python tools/make_readme.py`', file=sys.stderr)
            return 1
        return 0
    readme.write_text(text, encoding='utf-8')
    return 0

if __name__ == '__main__': sys.exit(main(sys.argv[1:]))
