"""Persistent compilation cache: a second process loads what the first compiled; the variable
turns it off; the default directory follows XDG."""
import json
import os
import subprocess
import sys

import jax
from jax.experimental.compilation_cache import compilation_cache as jax_cache

from fdistill import compilation_cache

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles one small program with the cache on and reports the cache events of this process.
SCRIPT = """
import json, sys
import jax, jax.numpy as jnp
from fdistill import compilation_cache
events = []
jax.monitoring.register_event_listener(lambda name, **kw: events.append(name))
path = compilation_cache.enable(sys.argv[1], min_compile_time_secs=0.0)
f = jax.jit(lambda x: jnp.sin(x) @ jnp.cos(x).T + jnp.tanh(x).sum())
f(jnp.ones((8, 8))).block_until_ready()
print('RESULT' + json.dumps({'path': path,
      'hits': events.count('/jax/compilation_cache/cache_hits'),
      'misses': events.count('/jax/compilation_cache/cache_misses')}))
"""


def run(cache_dir, **env):
    proc = subprocess.run([sys.executable, '-c', SCRIPT, str(cache_dir)], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS='cpu', **env),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.split('RESULT')[-1])


def test_second_process_loads_the_compiled_program(tmp_path):
    cache = tmp_path / 'cache'
    first = run(cache)
    assert first['path'] == str(cache) and first['hits'] == 0 and first['misses'] >= 1
    assert len(os.listdir(cache)) >= first['misses']
    second = run(cache)
    assert (second['hits'], second['misses']) == (first['misses'], 0)


def test_environment_variable_turns_it_off(monkeypatch, tmp_path):
    saved = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir,
             jax.config.jax_persistent_cache_min_compile_time_secs,
             jax.config.jax_persistent_cache_min_entry_size_bytes)
    try:
        monkeypatch.setenv('FDISTILL_COMPILATION_CACHE', 'off')
        assert compilation_cache.enable(str(tmp_path / 'cache')) is None
        assert not compilation_cache.is_enabled()
        assert not (tmp_path / 'cache').exists()
        monkeypatch.setenv('FDISTILL_COMPILATION_CACHE', str(tmp_path / 'elsewhere'))
        assert compilation_cache.enable() == str(tmp_path / 'elsewhere')
        assert compilation_cache.is_enabled()
    finally:   # this process's settings as they were
        for name, value in zip(('jax_enable_compilation_cache', 'jax_compilation_cache_dir',
                                'jax_persistent_cache_min_compile_time_secs',
                                'jax_persistent_cache_min_entry_size_bytes'), saved):
            jax.config.update(name, value)
        jax_cache.reset_cache()


def test_default_directory_follows_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv('XDG_CACHE_HOME', str(tmp_path))
    assert compilation_cache.default_cache_dir() == str(tmp_path / 'fdistill' / 'jax')
    monkeypatch.delenv('XDG_CACHE_HOME')
    assert compilation_cache.default_cache_dir() == os.path.join(
        os.path.expanduser('~'), '.cache', 'fdistill', 'jax')
