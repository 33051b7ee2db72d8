"""Import paths: `bandpo_trl.utils.import_object` and `band_divergence` given as a module path."""

from __future__ import annotations

import importlib
import math
import sys
import textwrap
import warnings

import pytest
import torch

from bandpo_trl import BandGRPOConfig, available_divergences, band_bounds, register_divergence
from bandpo_trl.utils import import_object

JS = "0.5 * (torch.xlogy(u, u) - torch.xlogy(u + 1, (u + 1) / 2))"


@pytest.fixture
def workdir(tmp_path, monkeypatch, divergence_registry):
    """A fresh working directory for modules written by the test; sys.path, sys.modules and the divergence
    registry are restored afterwards."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    modules = set(sys.modules)
    importlib.invalidate_caches()
    yield tmp_path
    for name in set(sys.modules) - modules:
        del sys.modules[name]


def write(directory, relative, source):
    path = directory / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(source))
    importlib.invalidate_caches()
    return path


def config(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", steps_per_generation=4)
    kwargs.update(overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return BandGRPOConfig(**kwargs)


LOGPS = torch.log(torch.tensor([1e-4, 0.01, 0.2, 0.5, 0.9, 0.999], dtype=torch.float64))


# ---------------------------------------------------------------------------------------------------------------
# import_object
# ---------------------------------------------------------------------------------------------------------------


def test_import_object_both_forms(workdir):
    write(workdir, "pkg_io/__init__.py", "")
    write(workdir, "pkg_io/things.py", "class Box:\n    def open(self):\n        return 'open'\nVALUE = 3\n")
    # The module is found in the current working directory, which is not on sys.path until import_object runs.
    assert str(workdir) not in sys.path
    assert import_object("pkg_io.things:Box.open")(None) == "open"
    assert import_object("pkg_io.things.VALUE") == 3
    assert str(workdir) in sys.path
    import_object("pkg_io.things.VALUE")
    assert sys.path.count(str(workdir)) == 1  # put there once
    assert import_object("math.sqrt") is math.sqrt
    assert import_object("math:sqrt") is math.sqrt
    assert import_object("os.path.join") is import_object("os.path:join")


@pytest.mark.parametrize(
    "path, message",
    [
        ("sqrt", r"expected an import path 'module.attribute' or 'module:attribute', got 'sqrt'"),
        ("math.", r"expected an import path"),
        (":sqrt", r"expected an import path"),
        ("math:", r"expected an import path"),
        ("a..b", r"expected an import path"),
        ("math:sqrt:x", r"expected an import path"),
        ("no_such_module_xyz.f", r"'no_such_module_xyz.f': module 'no_such_module_xyz' not found \(looked in the "),
        ("os.no_such_sub.f", r"module 'os.no_such_sub' not found"),
        ("math.no_such_function", r"'math.no_such_function': module 'math' has no attribute 'no_such_function'"),
        ("os.path:join.nope", r"os.path:join has no attribute 'nope'"),
    ],
)
def test_import_object_errors(path, message, workdir):
    with pytest.raises(ValueError, match=message):
        import_object(path)


def test_import_object_require_callable(workdir):
    assert import_object("math.pi") == math.pi
    with pytest.raises(ValueError, match=r"'math.pi': attribute 'pi' of module 'math' is not callable, got float"):
        import_object("math.pi", require_callable=True)


def test_import_object_keeps_errors_of_an_existing_module(workdir):
    """A module that exists but fails to import (a missing dependency, a bug) is not reported as "not found"."""
    write(workdir, "broken_dep_io.py", "import no_such_dependency_xyz\n")
    with pytest.raises(ModuleNotFoundError, match="no_such_dependency_xyz"):
        import_object("broken_dep_io.f")
    write(workdir, "broken_code_io.py", "1 / 0\n")
    with pytest.raises(ZeroDivisionError):
        import_object("broken_code_io.f")


# ---------------------------------------------------------------------------------------------------------------
# band_divergence as an import path, resolved when the config is built
# ---------------------------------------------------------------------------------------------------------------


def test_colon_path_selects_the_divergence_the_module_registers(workdir):
    write(
        workdir,
        "divs_registering/__init__.py",
        f"import torch\nfrom bandpo_trl import register_divergence\n\n"
        f"register_divergence('js_registered', lambda u: {JS})\n",
    )
    args = config(workdir, band_divergence="divs_registering:js_registered")
    assert args.band_divergence == "divs_registering:js_registered"  # the path is kept: reproducible config
    assert "js_registered" in available_divergences()
    assert "divs_registering:js_registered" not in available_divergences()  # an alias, not a second entry
    torch.testing.assert_close(
        band_bounds(LOGPS, "divs_registering:js_registered", 0.02), band_bounds(LOGPS, "js_registered", 0.02)
    )
    config(workdir, band_divergence="divs_registering:js_registered")  # resolving again is a no-op


def test_colon_path_registers_the_module_function(workdir):
    write(workdir, "divs_plain.py", f"import torch\n\ndef js(u):\n    return {JS}\n")
    config(workdir, band_divergence="divs_plain:js")
    assert "divs_plain:js" in available_divergences()
    register_divergence("js_direct", lambda u: 0.5 * (torch.xlogy(u, u) - torch.xlogy(u + 1, (u + 1) / 2)))
    torch.testing.assert_close(band_bounds(LOGPS, "divs_plain:js", 0.02), band_bounds(LOGPS, "js_direct", 0.02))


def test_colon_path_does_not_pick_an_unrelated_registration(workdir):
    """'module:kl' with a module that defines its own kl (and registers nothing) means the module's kl."""
    write(workdir, "divs_own_kl.py", "import torch\n\ndef kl(u):\n    return (u - 1).square()\n")
    config(workdir, band_divergence="divs_own_kl:kl")
    torch.testing.assert_close(band_bounds(LOGPS, "divs_own_kl:kl", 0.05), band_bounds(LOGPS, "chi2", 0.05))


def test_dotted_path_registers_the_function_under_the_full_name(workdir):
    write(workdir, "my_pkg/__init__.py", "")
    write(workdir, "my_pkg/divergences.py", f"import torch\n\ndef js_generator(u):\n    return {JS}\n")
    config(workdir, band_divergence="my_pkg.divergences.js_generator")
    assert "my_pkg.divergences.js_generator" in available_divergences()
    lower, upper = band_bounds(LOGPS, "my_pkg.divergences.js_generator", 0.02)
    assert (lower < 1).all() and (upper > 1).all()
    config(workdir, band_divergence="my_pkg.divergences.js_generator")  # resolving again is a no-op


@pytest.mark.parametrize(
    "module, path, message",
    [
        (None, "no_such_divs.js", r"module 'no_such_divs' not found"),
        (None, "no_such_divs:js", r"module 'no_such_divs' not found"),
        ("import torch\n", "divs_err.js", r"module 'divs_err' has no attribute 'js'"),
        (
            "import torch\n",
            "divs_err:js",
            r"importing module 'divs_err' registered no divergence 'js', and the module",
        ),
        ("import torch\nJS = 0.5\n", "divs_err.JS", r"attribute 'JS' of module 'divs_err' is not callable"),
        ("import torch\nJS = 0.5\n", "divs_err:JS", r"attribute 'JS' of module 'divs_err' is not callable"),
        (
            "import torch\n\ndef concave(u):\n    return torch.minimum((u - 1).abs(), torch.ones_like(u))\n",
            "divs_err.concave",
            r"divergence 'divs_err.concave': the generator f must be convex",
        ),
        (
            "import torch\n\ndef ulogu(u):\n    return torch.xlogy(u, u)\n",
            "divs_err:ulogu",
            r"divergence 'divs_err:ulogu': the generator f must be non-negative",
        ),
    ],
)
def test_bad_paths_refused_at_start_up(module, path, message, workdir):
    if module is not None:
        write(workdir, "divs_err.py", module)
    with pytest.raises(ValueError, match=rf"band_divergence '{path}' is not a registered divergence .*: .*{message}"):
        config(workdir, band_divergence=path)
    assert path not in available_divergences()


def test_trainer_uses_a_path_divergence(workdir, tiny_model_dir, tiny_train_dataset):
    from bandpo_trl import BandGRPOTrainer

    write(workdir, "divs_trainer.py", f"import torch\n\ndef js(u):\n    return {JS}\n")
    args = config(
        workdir,
        band_divergence="divs_trainer:js",
        band_delta=0.02,
        per_device_train_batch_size=4,
        num_generations=4,
        max_completion_length=6,
        gradient_accumulation_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = BandGRPOTrainer(
            model=str(tiny_model_dir),
            reward_funcs=lambda completions, **kw: [0.0] * len(completions),
            args=args,
            train_dataset=tiny_train_dataset,
        )
    lower, upper = trainer.compute_clip_bounds(LOGPS.float(), {})
    torch.testing.assert_close((lower, upper), band_bounds(LOGPS.float(), "divs_trainer:js", 0.02, 10.0))
