"""cpu_env.py: OpenMP's waiting is set before torch loads, in every script, unless the user set it.

    python -m pytest tests/test_cpu_env.py -q
"""
import ast
import glob
import os
import subprocess
import sys

import pytest

import cpu_env
from conftest import REPO

WAITING = ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')
SHOW = "import cpu_env, os; print([os.environ.get(k) for k in ('OMP_WAIT_POLICY', 'GOMP_SPINCOUNT')])"


def env_after_import(**given):
    env = {k: v for k, v in os.environ.items() if k not in WAITING}
    env.update(given)
    out = subprocess.run([sys.executable, '-c', SHOW], cwd=REPO, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_sets_the_defaults_where_nothing_is_set():
    expected = [cpu_env.DEFAULTS.get(k) for k in WAITING]
    assert env_after_import() == str(expected)


@pytest.mark.parametrize('given', [dict(OMP_WAIT_POLICY='ACTIVE'), dict(GOMP_SPINCOUNT='300000')])
def test_the_users_setting_wins(given):
    assert env_after_import(**given) == str([given.get(k) for k in WAITING])


def scripts():
    paths = glob.glob(os.path.join(REPO, '*.py')) + glob.glob(os.path.join(REPO, 'bench', '*.py'))
    return sorted(os.path.relpath(p, REPO) for p in paths if "if __name__ == '__main__':" in open(p).read())


@pytest.mark.parametrize('script', scripts())
def test_every_script_imports_it_before_torch(script):
    """Before torch, and before any module that imports torch: cpu_env first among the repository's
    modules and torch (bench scripts first put the repository on sys.path)."""
    tree = ast.parse(open(os.path.join(REPO, script)).read())
    names = [(a.name if isinstance(node, ast.Import) else node.module or '').split('.')[0]
             for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))
             for a in (node.names if isinstance(node, ast.Import) else node.names[:1])]
    ours = {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, '*.py'))}
    ours |= {os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, 'bench', '*.py'))}
    first = next((n for n in names if n in ours | {'torch', 'torchvision'}), None)  # None: it never loads torch
    assert first in ('cpu_env', None), f'{script}: {first} is imported before cpu_env'
