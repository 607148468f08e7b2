"""The `tgi-space` command line (typer)."""

from __future__ import annotations

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)


def _register_subcommands() -> None:
    """Attach the commands that live with their own modules."""
    from tgi_space.bench import register as register_bench
    from tgi_space.bench_engine import register as register_bench_engine
    from tgi_space.generate_cli import register as register_generate
    from tgi_space.invariance import register as register_invariance
    from tgi_space.train.cli import register as register_train
    from tgi_space.datastore import register_command as register_datastore
    from tgi_space.train.distill import register as register_distill

    register_bench(app)
    register_bench_engine(app)
    register_generate(app)
    register_invariance(app)
    register_train(app)
    register_distill(app)
    register_datastore(app)
    from tgi_space.http.cli import register as register_serve

    register_serve(app)


_register_subcommands()

if __name__ == "__main__":
    app()
